"""The device behind the session: the effect of each request, as typed methods.

Theory of operation
-------------------
The split of rust-vmm's vhost crates: ``vhost/src/vhost_user/backend_req_handler.rs`` frames
messages, checks each one's size and fds and sends the one ack, and calls a backend whose
methods (``vhost-user-backend/src/handler.rs``: ``set_mem_table``, ``add_mem_region``,
``set_vring_kick``, ...) take decoded values. Here :class:`~vhostmem.session.Session` is the
former and :class:`Device` the latter: the session decides whether a request may run (state,
feature and fd gates) and what to answer; the device does what it asks, with the decoded model
in hand, and raises a :class:`~vhostmem.errors.RequestRefused` when it cannot.

The device never maps memory itself: it asks its :class:`Host` (the shell) to map a region,
unmap it or close an fd, so unit tests can hand it a fake host. ``Host``, ``Device`` and the
device's region table are generic over the shell's mapping handle, so a region's handle has the
shell's type wherever it is read (``region.handle.peek(...)`` in the server's control socket).

Memory-table semantics (DESIGN.md section 4): a failed ADD_MEM_REG leaves nothing mapped and
nothing in the table; a failed REM_MEM_REG leaves the region; SET_MEM_TABLE replaces the table by
difference, mapping every new region before it unmaps an old one, and is all-or-nothing until
the old regions are unmapped; the table survives RESET_DEVICE and ring stop/start and is dropped
only by :meth:`Device.close`.

The table tells the truth about what is mapped: an unmap that fails (the kernel's munmap, or a
view still in use) leaves its region in the table, marked with the reason
(:attr:`~vhostmem.regions.Region.unmap_failed`), and is tried again by the next REM_MEM_REG of
that region, the next SET_MEM_TABLE or :meth:`Device.close`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, final

from vhostmem.errors import MappingError, RequestRefused, TableError
from vhostmem.events import TableChange
from vhostmem.protocol import (
    Log,
    MemoryRegion,
    MemoryTable,
    Request,
    VirtioFeature,
    VringAddress,
    VringState,
)
from vhostmem.regions import H, Identity, Region, RegionTable, identity
from vhostmem.virtqueue import MAX_QUEUE_SIZE

__all__ = ["LOG_PAGE", "Device", "DirtyLogArea", "ErrnoHost", "Host", "PartialChange", "Vring"]

#: Bytes of guest memory per bit of the dirty log (VHOST_LOG_PAGE, hw/virtio/vhost.c).
LOG_PAGE = 0x1000


class Host(Protocol[H]):
    """What the device needs from its shell: the only way it reaches the operating system."""

    def map_region(
        self, request: str, region: MemoryRegion, fd: int, fail_errno: int | None = None
    ) -> tuple[H, dict[str, Any]]:
        """Map ``region`` from ``fd``; always consumes ``fd``.

        ``fail_errno`` makes the mapping step fail as if the kernel returned it (fault
        injection), so the whole diagnosis runs.

        Returns:
            The mapping handle and what to report about the backing (kind, page size, ...).

        Raises:
            MappingError: with the whole diagnosis as its text.
        """

    def unmap_region(self, handle: H) -> None:
        """Release a mapping made by :meth:`map_region`.

        Raises:
            MappingError: the mapping is still there (the kernel refused munmap, or a view of
                it is in use); calling again with the same handle tries again.
        """

    def close_fd(self, fd: int) -> None:
        """Close a file descriptor the device or the session owns."""

    def file_id(self, fd: int) -> tuple[int, int] | None:
        """``(st_dev, st_ino)`` of the file behind ``fd``, ``None`` if it cannot be told."""


@final
class ErrnoHost(Generic[H]):
    """A :class:`Host` whose ``map_region`` fails as if the kernel returned ``errno``.

    Fault injection (``errno=`` in :mod:`vhostmem.faults`) wraps the host instead of reaching
    into dispatch: the shell still runs the whole diagnosis, so the failure reads as a real one.
    Everything else goes to the wrapped host unchanged.

    Args:
        host: the host to decorate.
        errno: the errno every mapping fails with.
    """

    def __init__(self, host: Host[H], errno: int) -> None:
        self.host = host
        self.errno = errno

    def map_region(
        self, request: str, region: MemoryRegion, fd: int, fail_errno: int | None = None
    ) -> tuple[H, dict[str, Any]]:
        return self.host.map_region(request, region, fd, self.errno)

    def unmap_region(self, handle: H) -> None:
        self.host.unmap_region(handle)

    def close_fd(self, fd: int) -> None:
        self.host.close_fd(fd)

    def file_id(self, fd: int) -> tuple[int, int] | None:
        return self.host.file_id(fd)


@dataclass(slots=True)
class Vring:
    """What the front-end told us about one virtqueue."""

    index: int
    num: int = 0
    base: int = 0
    addr: VringAddress | None = None
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    started: bool = False

    def as_json(self) -> dict[str, Any]:
        addr = self.addr
        return {
            "index": self.index,
            "num": self.num,
            "base": self.base,
            "enabled": self.enabled,
            "started": self.started,
            "desc": addr.desc_user_addr if addr else None,
            "avail": addr.avail_user_addr if addr else None,
            "used": addr.used_user_addr if addr else None,
            "kick_fd": self.kick is not None,
            "call_fd": self.call is not None,
        }


@final
@dataclass(slots=True)
class DirtyLogArea(Generic[H]):
    """The dirty log of SET_LOG_BASE, mapped (vhost-user.rst "Dirty pages logging").

    One bit per :data:`LOG_PAGE` of guest physical memory: page ``p`` is bit ``p % 8`` of byte
    ``p // 8``. The shell's data path sets the bits (``mark``); the front-end reads and clears
    them.

    Attributes:
        size: ``mmap_size`` of SET_LOG_BASE, bytes of log (it covers ``size * 8`` pages).
        offset: ``mmap_offset`` of SET_LOG_BASE.
        handle: the host's mapping.
        info: what the host reported about the backing.
        marked: bits this back-end found clear and set.
        beyond: pages written past what the log covers (not marked; QEMU sizes the log for
            all its memory, so this stays 0 unless the front-end sent a log too small).
    """

    size: int
    offset: int
    handle: H
    info: dict[str, Any]
    marked: int = 0
    beyond: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "mmap_offset": self.offset,
            "pages": self.size * 8,
            "backing": self.info.get("backing"),
            "marked": self.marked,
            "beyond": self.beyond,
        }


@final
class PartialChange(RequestRefused):
    """A table request that changed the table yet failed: the failure reply carries the change.

    Args:
        error: why the request failed.
        change: what it changed all the same.
    """

    def __init__(self, error: MappingError, change: TableChange) -> None:
        super().__init__(str(error), kind=error.kind, details=error.details)
        self.change = change


@final
class Device(Generic[H]):
    """The memory table and the vrings of one connection, changed by typed requests.

    Args:
        host: the shell's services (map, unmap, close).
        max_slots: how many regions the table holds (GET_MAX_MEM_SLOTS answer).
        vrings: how many virtqueues the device has.
    """

    def __init__(self, host: Host[H], max_slots: int, vrings: int) -> None:
        self.host = host
        self.table: RegionTable[H] = RegionTable(max_slots)
        self.vrings = [Vring(i) for i in range(vrings)]
        self.status = 0
        self._seq = 0
        #: The mapped dirty log (SET_LOG_BASE), or ``None``.
        self.log: DirtyLogArea[H] | None = None
        #: VHOST_F_LOG_ALL is acked: the data path marks what it writes in :attr:`log`.
        self.log_all = False
        #: Logs whose unmap failed; tried again by the next SET_LOG_BASE and by close.
        self.stale_logs: list[DirtyLogArea[H]] = []
        #: MAC addresses SEND_RARP asked to announce, not yet sent (the data path sends them).
        self.rarp: list[bytes] = []

    # -- features and device state --------------------------------------------------------------

    def set_features(self, features: int) -> None:
        """Features acked by the front-end (the session checked them against the offer).

        VHOST_F_LOG_ALL turns dirty logging on and off (hw/virtio/vhost.c
        ``vhost_dev_set_log`` sends the features with it set or clear).
        """
        self.log_all = bool(features & VirtioFeature.LOG_ALL)
        if not features & VirtioFeature.PROTOCOL_FEATURES:
            # Without PROTOCOL_FEATURES rings start enabled (vhost-user.rst "Ring states").
            for vring in self.vrings:
                vring.enabled = True

    def reset(self) -> None:
        """RESET_DEVICE (and the deprecated RESET_OWNER): stop the rings, keep the table.

        QEMU does not resend unchanged regions afterwards (vhost_user_reset_device leaves its
        shadow table alone), so dropping ours would lose them.
        """
        for vring in self.vrings:
            vring.started = False
            vring.enabled = False
            vring.base = 0
        self.status = 0

    def set_status(self, status: int) -> None:
        """SET_STATUS: the virtio device status byte."""
        self.status = status & 0xFF

    # -- memory table -------------------------------------------------------------------------

    def add_mem_reg(self, wire: MemoryRegion, fd: int) -> TableChange:
        """ADD_MEM_REG: map one region from ``fd`` (consumed) and put it in the table.

        Raises:
            TableError: the region is malformed, overlaps or the table is full; nothing mapped.
            MappingError: the mapping failed; nothing in the table.
        """
        table = self.table
        try:
            table.check_add(*_numbers(wire))
        except BaseException:
            self.host.close_fd(fd)
            raise
        region = self._map(Request.ADD_MEM_REG, wire, fd, self.host.file_id(fd))
        table.insert(region)
        return TableChange((), (region,), (), self._ring_notes_after_change())

    def rem_mem_reg(self, wire: MemoryRegion) -> TableChange:
        """REM_MEM_REG: unmap the region matching (gpa, uaddr, size) and take it out.

        Raises:
            TableError: no region matches.
            MappingError: the unmap failed; the region stays, marked ``unmap_failed``.
        """
        region = self.table.find_or_refuse(
            wire.guest_phys_addr, wire.userspace_addr, wire.memory_size
        )
        notes = self._rings_in(region)
        # Unmap first: a region whose unmap fails stays mapped, so it stays in the table, marked,
        # and the request fails (DESIGN.md section 4: "a failed REM leaves the region"). QEMU
        # keeps it in its shadow table too and sends REM_MEM_REG for it again with its next
        # change (hw/virtio/vhost-user.c send_remove_regions deletes a shadow entry only after a
        # zero ack), which retries the unmap here.
        err = self._unmap(region)
        if err is not None:
            raise MappingError(
                f"the unmap of region {region.describe()} failed, so the region stays mapped and "
                f"stays in the table, marked unmap_failed; a REM_MEM_REG of the same region tries "
                f"the unmap again. Cause: {err}",
                errno=err.errno,
                kind=err.kind,
                details={"unmap_failed": [region.as_json()]},
            )
        self.table.remove(region)
        return TableChange((region,), (), (), notes)

    def set_mem_table(self, wanted: MemoryTable, fds: list[int]) -> TableChange:
        """SET_MEM_TABLE: make the table ``wanted``, region ``i`` mapped from ``fds[i]``.

        Unchanged regions keep their mapping; every new region is mapped before an old one is
        unmapped. ``fds`` are consumed (the session checked there is one per region).

        Raises:
            TableError: the new table is inconsistent or too large; nothing changed.
            MappingError: a new region could not be mapped; nothing changed.
            PartialChange: the new table is in force but an old region stayed mapped.
        """
        regions = wanted.regions
        # Validate the new table on its own first: nothing is mapped until it is consistent.
        # The resulting table must fit in max_slots: refuse before anything is mapped.
        try:
            self.table.check_table([_numbers(wire) for wire in regions])
        except BaseException:
            self._close_all(fds)
            raise
        current: dict[Identity, Region[H]] = {}
        # A region an earlier unmap left mapped cannot be kept: its mapping may be half torn
        # down (Mapping.close released it before munmap failed). It goes, with another try.
        doomed: list[Region[H]] = []
        for region in self.table:
            if region.unmap_failed is None:
                current[region.identity] = region
            else:
                doomed.append(region)
        kept: list[Region[H]] = []
        added: list[Region[H]] = []
        try:
            for wire in regions:  # fd i belongs to region i (the count was checked)
                fd = fds.pop(0)  # from here on ours: closed, kept or mapped below
                file_id = self.host.file_id(fd)
                same = (
                    current.pop(identity(*_numbers(wire), file_id), None)
                    if file_id is not None
                    else None
                )
                if same is not None:
                    # Unchanged region: keep its mapping, as DPDK's vhost_memory_changed and
                    # libvhost-user's "regions that did not change" shortcut intend.
                    self.host.close_fd(fd)
                    kept.append(same)
                    continue
                added.append(self._map(Request.SET_MEM_TABLE, wire, fd, file_id))
        except BaseException as err:
            self._close_all(fds)
            # All or nothing: the old table is untouched; what this request mapped goes again.
            stuck = [region for region in added if self._unmap(region) is not None]
            if not stuck:
                raise
            self.table.set_unreleased(self.table.unreleased + tuple(stuck))
            if not isinstance(err, (MappingError, TableError)):
                raise
            raise MappingError(
                f"{err}; undoing it, {_stuck_text(stuck, 'new')}",
                errno=getattr(err, "errno", None),
                kind=err.kind,
                details={**err.details, "unmap_failed": [r.as_json() for r in stuck]},
            ) from err
        removed = tuple(current.values()) + tuple(doomed)
        earlier = self.table.unreleased  # left mapped by an earlier SET_MEM_TABLE: try again
        self.table.replace(kept + added)  # checked above as a whole
        # Every old region is tried, whatever happens to the others; those that stay mapped stay
        # in the table (RegionTable.unreleased, marked), so the table equals what is mapped.
        failures = [(region, self._unmap(region)) for region in removed]
        stuck = [region for region, err in failures if err is not None]
        still = [region for region in earlier if self._unmap(region) is not None]
        self.table.set_unreleased(still + stuck)
        notes = self._ring_notes_after_change()
        if still:
            notes += (
                f"still mapped after an earlier failed unmap: {_stuck_text(still, 'earlier')}",
            )
        change = TableChange(removed, tuple(added), tuple(kept), notes)
        if stuck:
            # The new table is in force (every new region is mapped and translates), yet the
            # request did not do all it asks: memory the front-end dropped is still mapped here,
            # so its pages stay allocated. vhost-user.rst (REPLY_ACK): the back-end replies
            # "zero on success or non-zero on failure", so it is a failure ack. QEMU logs it
            # ("vhost_set_mem_table failed", hw/virtio/vhost.c vhost_commit; reference/
            # vhost-user-facts.md 1.8) and goes on with its new table, so the two sides stay in
            # step; the error and the event say which regions stayed mapped and why.
            raise PartialChange(
                MappingError(
                    f"the new table is in force, but {_stuck_text(stuck)}; the next "
                    "SET_MEM_TABLE or the end of the connection tries again",
                    kind=next(err.kind for _, err in failures if err is not None),
                    details={"unmap_failed": [region.as_json() for region in stuck]},
                ),
                change,
            )
        return change

    def _map(
        self, request: Request, wire: MemoryRegion, fd: int, file_id: tuple[int, int] | None
    ) -> Region[H]:
        handle, info = self.host.map_region(request.name, wire, fd)
        self._seq += 1
        return Region(
            wire.guest_phys_addr,
            wire.memory_size,
            wire.userspace_addr,
            wire.mmap_offset,
            handle,
            file_id,
            info,
            self._seq,
        )

    def _unmap(self, region: Region[H]) -> MappingError | None:
        """Unmap ``region``; on failure mark it (:attr:`Region.unmap_failed`) and return why."""
        try:
            self.host.unmap_region(region.handle)
        except MappingError as err:
            region.unmap_failed = str(err)
            return err
        region.unmap_failed = None
        return None

    def _close_all(self, fds: list[int]) -> None:
        while fds:
            self.host.close_fd(fds.pop())

    # -- dirty log ----------------------------------------------------------------------------

    @property
    def logging(self) -> bool:
        """The data path marks what it writes: LOG_ALL acked and a log mapped."""
        return self.log_all and self.log is not None

    def set_log_base(self, log: Log, fd: int | None) -> DirtyLogArea[H]:
        """SET_LOG_BASE: map the dirty log from ``fd`` (consumed); it replaces the old one.

        The new log is mapped before the old one is unmapped (hw/virtio/vhost.c
        ``vhost_dev_log_resize`` sends the new base while the old log is still in use).

        Raises:
            RequestRefused: no fd, or a size of 0; nothing changed.
            MappingError: the log could not be mapped (the whole diagnosis); nothing changed.
        """
        where = f"mmap_size 0x{log.mmap_size:x}, mmap_offset 0x{log.mmap_offset:x}"
        if fd is None:
            raise RequestRefused(
                f"({where}) came without a file descriptor: with LOG_SHMFD the dirty log is "
                "shared memory passed as one fd; send the log's memfd with the message"
            )
        if log.mmap_size == 0:
            self.host.close_fd(fd)
            raise RequestRefused(
                f"({where}) asks for a dirty log of 0 bytes, which covers no page; the log "
                f"needs one bit per 0x{LOG_PAGE:x} bytes of guest memory (QEMU "
                "vhost_get_log_size); send its real size"
            )
        region = MemoryRegion(0, log.mmap_size, 0, log.mmap_offset)
        handle, info = self.host.map_region(Request.SET_LOG_BASE.name, region, fd)
        old, self.log = self.log, DirtyLogArea(log.mmap_size, log.mmap_offset, handle, info)
        if old is not None:
            self.stale_logs.append(old)
        self._release_stale_logs()
        return self.log

    def send_rarp(self, value: int) -> bytes:
        """SEND_RARP: announce the guest's MAC (the first 6 bytes of the u64, as QEMU's
        ``vhost_user_migration_done`` copies it) once the data path can send it.

        Returns:
            The MAC address.
        """
        mac = value.to_bytes(8, "little")[:6]
        self.rarp.append(mac)
        return mac

    def log_json(self) -> dict[str, Any] | None:
        """The mapped dirty log for ``vhostmem-ctl stats``/``regions``, ``None`` when none is."""
        area = self.log
        if area is None:
            return None
        return {**area.as_json(), "logging": self.logging}

    def set_log_fd(self, fd: int) -> None:
        """SET_LOG_FD: an eventfd to signal after logging. QEMU never sends it (hw/virtio/
        vhost-user.c has no sender) and the spec asks nothing of a back-end that does not use
        it, so it is closed: vhostmem marks the log and signals nothing."""
        self.host.close_fd(fd)

    def _release_stale_logs(self) -> None:
        kept = []
        for area in self.stale_logs:
            try:
                self.host.unmap_region(area.handle)
            except MappingError:
                kept.append(area)
        self.stale_logs = kept

    # -- vrings -------------------------------------------------------------------------------

    def vring(self, index: int) -> Vring:
        """The vring ``index``.

        Raises:
            RequestRefused: the device has no such vring.
        """
        if not 0 <= index < len(self.vrings):
            raise RequestRefused(
                f"vring index {index} is out of range: the device has {len(self.vrings)} "
                f"vrings (--queues {len(self.vrings) // 2})"
            )
        return self.vrings[index]

    def set_vring_num(self, state: VringState) -> None:
        """SET_VRING_NUM: the ring size, 1 to the largest a split ring may have."""
        vring = self.vring(state.index)
        if not 0 < state.num <= MAX_QUEUE_SIZE:
            raise RequestRefused(
                f"vring {state.index} size {state.num} is not in 1..{MAX_QUEUE_SIZE}"
            )
        vring.num = state.num

    def set_vring_base(self, state: VringState) -> None:
        """SET_VRING_BASE: the next available index the device reads."""
        self.vring(state.index).base = state.num

    def get_vring_base(self, state: VringState) -> VringState:
        """GET_VRING_BASE stops the ring (vhost-user.rst "Ring states") and tells its base."""
        vring = self.vring(state.index)
        vring.started = False
        return VringState(vring.index, vring.base)

    def set_vring_addr(self, addr: VringAddress) -> None:
        """SET_VRING_ADDR: where the ring's three parts are, in front-end addresses."""
        self.vring(addr.index).addr = addr

    def set_vring_enable(self, state: VringState) -> None:
        """SET_VRING_ENABLE: 1 enables the ring, 0 disables it."""
        vring = self.vring(state.index)
        if state.num not in (0, 1):
            raise RequestRefused(f"SET_VRING_ENABLE num must be 0 or 1, got {state.num}")
        vring.enabled = bool(state.num)

    def set_vring_kick(self, index: int, fd: int | None) -> tuple[str, ...]:
        """SET_VRING_KICK: the ring's kick eventfd; the ring starts (vhost-user.rst "Ring
        states").

        Returns:
            Notes on ring parts that lie in no region of the table.
        """
        vring = self._swap_fd(index, "kick", fd)
        vring.started = True
        return self._check_ring(vring)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """SET_VRING_CALL: the ring's call eventfd (``None``: polling, NOFD set)."""
        self._swap_fd(index, "call", fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """SET_VRING_ERR: the ring's error eventfd."""
        self._swap_fd(index, "err", fd)

    def _swap_fd(self, index: int, slot: str, fd: int | None) -> Vring:
        try:
            vring = self.vring(index)
        except BaseException:
            if fd is not None:
                self.host.close_fd(fd)
            raise
        old = getattr(vring, slot)
        setattr(vring, slot, fd)
        if old is not None:
            self.host.close_fd(old)
        return vring

    def _check_ring(self, vring: Vring) -> tuple[str, ...]:
        addr = vring.addr
        if addr is None:
            return (f"vring {vring.index} started without SET_VRING_ADDR",)
        problems = []
        for part, uaddr in (
            ("desc", addr.desc_user_addr),
            ("avail", addr.avail_user_addr),
            ("used", addr.used_user_addr),
        ):
            if self.table.lookup_uaddr(uaddr) is None:
                problems.append(
                    f"vring {vring.index} {part} ring at front-end address 0x{uaddr:x} is in no "
                    "region of the memory table"
                )
        return tuple(problems)

    def _rings_in(self, region: Region[H]) -> tuple[str, ...]:
        notes = []
        for vring in self.vrings:
            addr = vring.addr
            if vring.started and addr is not None:
                for uaddr in (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr):
                    if region.uaddr <= uaddr < region.uaddr_end:
                        notes.append(
                            f"running vring {vring.index} lies in removed region "
                            f"{region.describe()}"
                        )
                        break
        return tuple(notes)

    def _ring_notes_after_change(self) -> tuple[str, ...]:
        notes: list[str] = []
        for vring in self.vrings:
            if vring.started:
                notes.extend(self._check_ring(vring))
        return tuple(notes)

    # -- end of life ----------------------------------------------------------------------------

    def close(self) -> tuple[Region[H], ...]:
        """Release every mapping and fd the device holds.

        Returns:
            The regions that were in the table (:attr:`RegionTable.unreleased` included), each
            unmapped, or still mapped with :attr:`Region.unmap_failed` saying why.
        """
        gone = self.table.clear()
        for region in gone:
            self._unmap(region)  # each one tried; a failure is marked on it, nothing skipped
        if self.log is not None:
            self.stale_logs.append(self.log)
            self.log = None
        self._release_stale_logs()
        for vring in self.vrings:
            for slot in ("kick", "call", "err"):
                fd = getattr(vring, slot)
                if fd is not None:
                    setattr(vring, slot, None)
                    self.host.close_fd(fd)
        return gone


def _stuck_text(regions: Sequence[Region[object]], which: str = "old") -> str:
    """Words for regions whose unmap failed: how many, each region, then its reason."""
    parts = [
        f"region {region.describe()} stays mapped: {region.unmap_failed}" for region in regions
    ]
    return f"{len(regions)} {which} region(s) could not be unmapped ({'; '.join(parts)})"


def _numbers(wire: MemoryRegion) -> tuple[int, int, int, int]:
    """A wire region's (gpa, size, uaddr, mmap_offset), the order the table takes them in."""
    return (wire.guest_phys_addr, wire.memory_size, wire.userspace_addr, wire.mmap_offset)
