"""The data path: virtio-net rings through the region table, bridged to a TAP device.

Theory of operation
-------------------
One :class:`NetDevice` per process holds the TAP device (``vhostmem --tap``) and the nursery the
ring tasks run in. Each front-end connection gets a :class:`NetAttachment`. A TAP carries one
guest's frames, so it bridges the rings of one connection: the first that starts its rings
(connecting alone claims nothing, so a probe or an idle leftover front-end holds nothing). It
keeps the TAP until it ends. Another connection whose rings become ready meanwhile gets them
refused: they are not started, and one ``datapath-refused`` event and one log line name both
peers and the reason. When the holder ends, the TAP goes to the connection refused first that
still has rings ready (a ``datapath-handover`` event), so a QEMU restarted before the old one
died gets traffic as soon as the old one is gone.

The shell calls :meth:`NetAttachment.sync` after every handled request, *before* it awaits
anything: that is where rings start and stop as the protocol says (a ring runs while it is
started by SET_VRING_KICK, enabled, and has an address and a size; GET_VRING_BASE and
RESET_DEVICE stop it). Queue pair 0 moves traffic: vring 0 receives (TAP -> guest), vring 1
transmits (guest -> TAP).

Rules that keep guest memory safe while the table changes:

1. Guest memory is touched only in synchronous *steps* (a bounded batch of chains). A step
   takes memoryviews through :class:`RegionMemory` and releases every one of them before the
   task awaits, so ``Mapping.close()`` (REM_MEM_REG, SET_MEM_TABLE, disconnect) never finds an
   exported view, and every step looks regions up in the table as it is now: a region is never
   touched after the REM_MEM_REG that removed it was handled, let alone acked.
2. After every await a task checks that it is still wanted (``stopped``, ring started and
   enabled) before its next step: a cancelled task that trio had already rescheduled does not
   process one more chain after GET_VRING_BASE answered.
3. ``vring.base`` (the session's answer to GET_VRING_BASE) is brought up to date within every
   step (after each RX frame, at the end of a TX step), and no chain is in flight across an
   await, so the answer is always where the ring stopped.
4. A ring error (a descriptor in no region or crossing into a hole, a corrupt ring) stops that
   ring, signals its err eventfd and records an event naming the GPA and the nearest regions;
   it is not restarted until the front-end restarts the ring. Nothing a ring does can raise out
   of its task.
5. The kick eventfd is dup'ed when a ring starts, so the session may close or replace its own
   copy at any time without pulling an fd out from under a task waiting on it.
6. A ring whose SET_VRING_BASE differs from its used ring's index resumes at the used index
   (:meth:`SplitQueue.resume_at_used`: this device completes chains in order, so the used index
   is where the ring stopped), with a ``protocol-deviation`` event (``vring-base-mismatch``)
   and a log line once per connection; with ``--strict-protocol`` it starts at the base and an
   avail index more than a ring ahead of it is a ring error, as before. DPDK's virtio-user
   sends base 0 for rings it kept running when it reconnects in server mode.

Throughput is bounded per step (``_BUDGET`` chains or frames, then a checkpoint), so the
connection's control traffic is never starved by a busy ring.

The connection that holds the TAP books its running totals as a ``datapath-stats`` line at
most once per ``stats_interval`` while they change, and once when it ends: nothing while the
guest is quiet, no line per packet, and the timeline gets its packets per second.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, final

import trio

from vhostmem import journal
from vhostmem.device import LOG_PAGE, Device
from vhostmem.protocol import VirtioFeature
from vhostmem.regions import Region, RegionTable
from vhostmem.session import Session, SessionState, Vring
from vhostmem.virtqueue import (
    GuestMemoryError,
    PacketError,
    RingError,
    RingLayout,
    RxResult,
    SplitQueue,
    net_header_size,
    rarp_frame,
    rx_deliver,
    tx_frame,
)

if TYPE_CHECKING:
    from vhostmem.events import Handled
    from vhostmem.mapping import Mapping

__all__ = ["DirtyMarker", "NetAttachment", "NetDevice", "RegionMemory", "TapLike"]

#: Chains (TX) or frames (RX) per step before a checkpoint.
_BUDGET = 64
#: Largest Ethernet frame moved either way (no GSO is offered; 64 KiB covers any MTU).
MAX_FRAME = 65535
#: Seconds a ring waits for a kick (or the TAP) before looking at the ring anyway: the safety
#: net for a notification lost in a race (EVENT_IDX arming has no memory fence from Python).
POLL_INTERVAL = 0.25
#: Seconds at least between two ``datapath-stats`` lines of a connection (its running totals,
#: booked while they change: a rate for the timeline without a line per packet).
STATS_INTERVAL = 1.0
#: Seconds between looks at a ring that has no kick eventfd (VHOST_USER_VRING_NOFD_MASK).
_NOFD_POLL = 0.001
_ONE = (1).to_bytes(8, "little")
#: Why a ring resumes at its used index (rule 6): the ``rule`` of its protocol-deviation event.
VRING_BASE_RULE = (
    "vhost-user.rst has SET_VRING_BASE give the next index to process; this device completes "
    "chains in order, so its used ring says where it stopped, and it resumes there, as "
    "libvhost-user (vu_set_vring_addr_exec, for a queue processed in order) and DPDK's vhost "
    "library (translate_ring_addresses) do (DPDK's virtio-user reconnecting in server mode "
    "sends base 0 for rings it kept running: virtio_user_dev_server_reconnect); "
    "--strict-protocol starts at the base"
)


class TapLike(Protocol):
    """What the data path needs of the host-side device: a non-blocking fd of whole frames."""

    @property
    def fd(self) -> int:
        """Non-blocking fd; one read returns one Ethernet frame, one write sends one."""

    @property
    def name(self) -> str:
        """The interface name, for messages."""

    def as_json(self) -> dict[str, Any]:
        """What to show in ``stats``."""

    def close(self) -> None:
        """Release the device (and whatever was created for it)."""


@dataclass(slots=True)
class RegionCounter:
    """Translations the data path made into one region, and the bytes moved through them."""

    translations: int = 0
    bytes: int = 0


@final
class RegionMemory:
    """:class:`vhostmem.virtqueue.GuestMemory` over the region table, counting per region.

    Views are cached per region until :meth:`release`, which every step calls before its task
    awaits (rule 1 of the module docstring).

    Args:
        table: the session's region table (looked up on every access).
        counters: per-region counters, updated on every translation.
    """

    def __init__(
        self, table: RegionTable[Mapping], counters: dict[Region[object], RegionCounter]
    ) -> None:
        self.table = table
        self.counters = counters
        self._views: dict[Region[Mapping], memoryview] = {}

    def _region(self, at: int, start: int, length: int) -> Region[Mapping]:
        region = self.table.lookup_gpa(at)
        if region is None:
            nearest = self.table.neighbours(at)
            crossing = at != start
            text = f"guest physical address 0x{at:x} is in no region"
            if crossing:
                text += f" (0x{start:x}+0x{length:x} crosses into a hole there)"
            raise GuestMemoryError(
                f"{text}; nearest regions: {nearest}",
                gpa=at,
                kind="crosses-hole" if crossing else "hole",
                details={"gpa": at, "start": start, "length": length, "nearest": nearest},
            )
        counter = self.counters.get(region)
        if counter is None:
            counter = self.counters[region] = RegionCounter()
        counter.translations += 1
        return region

    def _view(self, region: Region[Mapping]) -> memoryview:
        view = self._views.get(region)
        if view is None:
            view = self._views[region] = region.handle.view(0, region.size)
        return view

    def read(self, gpa: int, length: int) -> bytes:
        at, end = gpa, gpa + length
        parts: list[bytes] = []
        while at < end:
            region = self._region(at, gpa, length)
            off = at - region.gpa
            n = min(end, region.gpa_end) - at
            parts.append(bytes(self._view(region)[off : off + n]))
            self.counters[region].bytes += n
            at += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, gpa: int, data: bytes) -> None:
        at, end = gpa, gpa + len(data)
        while at < end:
            region = self._region(at, gpa, len(data))
            off = at - region.gpa
            n = min(end, region.gpa_end) - at
            self._view(region)[off : off + n] = data[at - gpa : at - gpa + n]
            self.counters[region].bytes += n
            at += n

    def uaddr_to_gpa(self, uaddr: int, length: int) -> int | None:
        """The GPA of a ring given by front-end address (SET_VRING_ADDR carries QEMU's).

        Returns:
            ``None`` when ``[uaddr, uaddr + length)`` is not inside one region.
        """
        region = self.table.lookup_uaddr(uaddr)
        if region is None or uaddr + length > region.uaddr_end:
            return None
        return region.gpa + (uaddr - region.uaddr)

    def release(self) -> None:
        """Release every view handed out since the last call."""
        for view in self._views.values():
            view.release()
        self._views.clear()


#: VHOST_VRING_F_LOG (linux/vhost_types.h): SET_VRING_ADDR's flag to log used ring writes.
_VRING_F_LOG = 1


@final
class DirtyMarker:
    """:class:`vhostmem.virtqueue.DirtyLog` over the device's mapped log (SET_LOG_BASE).

    The rule (vhost-user.rst "Dirty pages logging"): while VHOST_F_LOG_ALL is acked, the
    back-end sets, for every page of guest memory it writes, bit ``page % 8`` of byte
    ``page // 8`` of the log (a page is :data:`~vhostmem.device.LOG_PAGE` bytes of guest
    physical memory), with an atomic OR, because the front-end reads and clears the log while
    the back-end writes it (QEMU ``vhost_dev_sync_region`` takes 64 bits at a time with
    ``qatomic_xchg``) and other back-ends of the same guest may share it (``vhost_log_get``).
    libvhost-user ``vu_log_page`` uses ``__sync_fetch_and_or``. vhostmem has one writer (the
    trio thread) but shares the bytes with those processes, so a read-modify-write from Python
    could put back a bit QEMU had just taken or drop one another back-end had just set:
    :meth:`~vhostmem.mapping.Mapping.atomic_or` calls libatomic's ``__atomic_fetch_or_1``, the
    same locked OR. The device's log is looked up on every mark, so a log replaced by
    SET_LOG_BASE while rings run is the one written from the next mark on.
    """

    def __init__(self, device: Device[Mapping]) -> None:
        self.device = device

    def mark(self, gpa: int, length: int) -> None:
        device = self.device
        area = device.log
        if area is None or not device.log_all or length <= 0:
            return
        handle = area.handle
        size = area.size
        for page in range(gpa // LOG_PAGE, (gpa + length - 1) // LOG_PAGE + 1):
            byte = page >> 3
            if byte >= size:
                area.beyond += 1
                continue
            bit = 1 << (page & 7)
            if not handle.atomic_or(byte, bit) & bit:
                area.marked += 1


class _Wait(enum.Enum):
    MORE = "more"  # budget used up: checkpoint and go on
    KICK = "kick"  # ring empty: wait for the driver
    TAP = "tap"  # RX: buffers posted, no frame: wait for the TAP
    PAUSE = "pause"  # the TAP failed: wait a little


@final
class _Ring:
    """One running ring: its task, its queue, its dup of the kick fd."""

    def __init__(self, att: NetAttachment, vring: Vring, key: tuple[Any, ...], kick: int | None):
        self.att = att
        self.vring = vring
        self.key = key
        self.index = vring.index
        self.role = "rx" if vring.index % 2 == 0 else "tx"
        self.name = f"vring {vring.index} ({self.role})"
        self.kick = kick
        self.stopped = False
        self.finished = False
        self.scope = trio.CancelScope()
        self.queue: SplitQueue | None = None
        self.pending: bytes | None = None
        features = att.session.acked_features
        self.mergeable = bool(features & VirtioFeature.NET_F_MRG_RXBUF)
        self.event_idx = bool(features & VirtioFeature.RING_F_EVENT_IDX)
        self.header_size = net_header_size(features)

    def wanted(self) -> bool:
        vring = self.vring
        return not self.stopped and vring.started and vring.enabled

    def stop(self) -> None:
        self.stopped = True
        self.scope.cancel()

    async def run(self) -> None:
        att = self.att
        try:
            with self.scope:
                if not self.wanted():
                    return
                self._start()
                await self._run(self._tx_step if self.role == "tx" else self._rx_step)
        except RingError as err:  # SplitQueue turns every GuestMemoryError into one
            att.ring_failed(self, err)
        except Exception as err:  # a bug of ours stops this ring only
            att.log.exception("%s: internal error; ring stopped", self.name)
            att.ring_failed(self, err)
        finally:
            att.mem.release()
            self.finished = True
            if self.pending is not None:
                att.count("rx_dropped")
                self.pending = None
            if self.kick is not None:
                trio.lowlevel.notify_closing(self.kick)
                os.close(self.kick)
                self.kick = None

    def _ring_gpa(self, uaddr: int, length: int, what: str) -> int:
        gpa = self.att.mem.uaddr_to_gpa(uaddr, length)
        if gpa is None:
            raise RingError(
                f"{self.name}: {what} at front-end address 0x{uaddr:x} (+0x{length:x}) is not "
                "inside one region of the memory table",
                kind="layout",
                details={"uaddr": uaddr, "length": length},
            )
        return gpa

    def _start(self) -> None:
        vring = self.vring
        addr = vring.addr
        assert addr is not None
        mem = self.att.mem
        desc_size, avail_size, used_size = RingLayout.sizes(vring.num)
        layout = RingLayout(
            vring.num,
            self._ring_gpa(addr.desc_user_addr, desc_size, "descriptor table"),
            self._ring_gpa(addr.avail_user_addr, avail_size, "available ring"),
            self._ring_gpa(addr.used_user_addr, used_size, "used ring"),
        )
        try:
            self.queue = SplitQueue(
                mem,
                layout,
                last_avail_idx=vring.base,
                event_idx=self.event_idx,
                name=self.name,
                log=self.att.dirty,
                used_log=addr.log_guest_addr if addr.flags & _VRING_F_LOG else None,
            )
        finally:
            mem.release()
        if self.queue.used_idx != self.queue.last_avail_idx and not self.att.session.config.strict:
            self.att.base_mismatch(self, self.queue.last_avail_idx, self.queue.used_idx)
            self.queue.resume_at_used()
            vring.base = self.queue.last_avail_idx
        self.att.log.info(
            "%s running: size %d, desc gpa 0x%x, avail gpa 0x%x, used gpa 0x%x, base %d, "
            "used idx %d%s%s",
            self.name,
            layout.num,
            layout.desc,
            layout.avail,
            layout.used,
            vring.base,
            self.queue.used_idx,
            ", mrg_rxbuf" if self.mergeable else "",
            ", event_idx" if self.event_idx else "",
        )

    # -- waiting --

    async def _wait_kick(self) -> None:
        if self.kick is None:
            await trio.sleep(_NOFD_POLL)
            return
        with trio.move_on_after(self.att.device.poll_interval) as scope:
            await trio.lowlevel.wait_readable(self.kick)
        if scope.cancelled_caught:
            self.att.count("poll_wakeups")
            return
        try:
            os.read(self.kick, 8)
        except BlockingIOError:
            pass
        self.att.count("kicks")

    async def _wait_tap(self) -> None:
        # trio allows one reader per fd. The RX ring this one replaced no longer waits on the
        # TAP: stop() cancels its scope, and trio drops a cancelled wait at once, before sync
        # starts this ring (test_rx_ring_restarted_while_waiting_on_the_tap).
        with trio.move_on_after(self.att.device.poll_interval) as scope:
            await trio.lowlevel.wait_readable(self.att.device.tap.fd)
        if scope.cancelled_caught:
            self.att.count("poll_wakeups")

    async def _next(self, wait: _Wait) -> None:
        if wait is _Wait.MORE:
            await trio.lowlevel.checkpoint()
        elif wait is _Wait.KICK:
            await self._wait_kick()
        elif wait is _Wait.TAP:
            await self._wait_tap()
        else:
            await trio.sleep(self.att.device.poll_interval)

    # -- steps (synchronous; every view is released before returning) --

    def _signal(self) -> None:
        queue = self.queue
        assert queue is not None
        if queue.needs_notify() and self.vring.call is not None:
            try:
                os.write(self.vring.call, _ONE)
                self.att.count("calls")
            except BlockingIOError:  # counter saturated: the driver is being told anyway
                pass

    async def _run(self, step: Callable[[], _Wait]) -> None:
        while self.wanted():
            try:
                wait = step()
            finally:
                self.att.mem.release()
            self.att.report_stats()
            await self._next(wait)

    def _tx_step(self) -> _Wait:
        queue = self.queue
        assert queue is not None
        att = self.att
        fd = att.device.tap.fd
        done: list[tuple[int, int]] = []
        wait = _Wait.MORE
        try:
            while len(done) < _BUDGET:
                chain = queue.pop()
                if chain is None:
                    if queue.empty_after_arming():
                        wait = _Wait.KICK
                        break
                    continue
                try:
                    frame = tx_frame(
                        queue, chain, max_frame=MAX_FRAME, header_size=self.header_size
                    )
                except PacketError as err:
                    att.drop("tx_errors", str(err))
                    frame = None
                except RingError:
                    queue.unpop(1)  # stop at the bad chain: GET_VRING_BASE names it
                    raise
                if frame is not None:
                    try:
                        os.write(fd, frame)
                    except OSError as err:
                        att.drop("tx_dropped", f"write to {att.device.tap.name}: {err}")
                    else:
                        att.count("tx_packets")
                        att.count("tx_bytes", len(frame))
                done.append((chain.head, 0))
        finally:
            if done:
                queue.push(done)
                self.vring.base = queue.last_avail_idx
        if done:
            self._signal()
        return wait

    def _rx_step(self) -> _Wait:
        queue = self.queue
        assert queue is not None
        att = self.att
        fd = att.device.tap.fd
        delivered = 0
        wait = _Wait.MORE
        while delivered < _BUDGET:
            if self.pending is None:
                if not queue.available() and queue.empty_after_arming():
                    wait = _Wait.KICK
                    break
                try:
                    frame = os.read(fd, MAX_FRAME + 1)
                except BlockingIOError:
                    wait = _Wait.TAP
                    break
                except OSError as err:
                    att.drop("rx_errors", f"read from {att.device.tap.name}: {err}")
                    wait = _Wait.PAUSE
                    break
                if not frame:
                    wait = _Wait.PAUSE
                    break
                if len(frame) > MAX_FRAME:
                    att.drop("rx_dropped", f"frame of {len(frame)} bytes or more from the TAP")
                    continue
                self.pending = frame
            outcome = rx_deliver(
                queue, self.pending, mergeable=self.mergeable, header_size=self.header_size
            )
            if outcome.result is RxResult.DELIVERED:
                att.count("rx_packets")
                att.count("rx_bytes", len(self.pending))
                self.pending = None
                self.vring.base = queue.last_avail_idx
                delivered += 1
            elif outcome.result is RxResult.TOO_BIG:
                att.drop(
                    "rx_dropped",
                    f"{self.name}: a {len(self.pending)}-byte frame fits no posted buffer",
                )
                self.pending = None
            else:  # NO_BUFFERS: too few posted; retry only if the driver posted more
                if not queue.empty_after_arming():
                    continue
                wait = _Wait.KICK
                break
        if delivered:
            self._signal()
        return wait


@final
class NetAttachment:
    """One connection's data path.

    Args:
        device: the process's TAP and nursery.
        session: the connection's session (rings, features, table).
        socket_name: for events.
        conn: connection number, for events.
        log: the connection's logger.
        peer: the front-end's credentials (``{"pid", "uid", "gid"}``), for messages.
    """

    def __init__(
        self,
        device: NetDevice,
        session: Session[Mapping],
        *,
        socket_name: str,
        conn: int,
        log: logging.Logger,
        peer: dict[str, Any] | None = None,
    ) -> None:
        self.device = device
        self.session = session
        self.socket_name = socket_name
        self.conn = conn
        self.peer = peer
        self.log = log.getChild("net")
        #: This connection's rings use the TAP (it holds it).
        self.active = False
        #: Its rings were refused and it waits for the TAP (told once, until it gets it).
        self.refused = False
        #: A vring-base-mismatch was logged on this connection (rule 6; events say each).
        self.base_mismatch_told = False
        self.region_counters: dict[Region[object], RegionCounter] = {}
        self.removed = RegionCounter()
        self.mem = RegionMemory(session.table, self.region_counters)
        self.dirty = DirtyMarker(session.device)
        self.rings: dict[int, _Ring] = {}
        self.broken: dict[int, tuple[Any, ...]] = {}
        self.errors: dict[int, str] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "rx_packets",
                "rx_bytes",
                "rx_dropped",
                "rx_errors",
                "tx_packets",
                "tx_bytes",
                "tx_dropped",
                "tx_errors",
                "kicks",
                "calls",
                "poll_wakeups",
                "ring_errors",
                "rarp_sent",
            ),
            0,
        )
        self._last_drop_log = 0.0
        #: The totals the last ``datapath-stats`` line carried, and when the change since
        #: then began (monotonic seconds).
        self._stats_sent = tuple(self.counters[name] for name in journal.DATAPATH_COUNTERS)
        self._stats_since = time.monotonic()
        self.closed = False

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def drop(self, name: str, why: str) -> None:
        """Count a dropped packet; log at most one such line per second."""
        self.counters[name] += 1
        now = time.monotonic()
        if now - self._last_drop_log >= 1.0:
            self._last_drop_log = now
            self.log.warning("%s (%s so far: %d)", why, name, self.counters[name])

    def report_stats(self, *, final: bool = False) -> None:
        """Book a ``datapath-stats`` line (the running totals) when they changed and
        ``stats_interval`` has passed since the change began, or, ``final``, whenever they
        changed. While nothing moves the interval restarts, so a line's ``interval`` covers
        the traffic it counts and at most one idle look before it (rings look at least every
        ``poll_interval``). Rings call it after every step; :meth:`close` with ``final``.
        Booking failures are logged: they never stop a ring or a release."""
        now = time.monotonic()
        counters = self.counters
        totals = tuple(counters[name] for name in journal.DATAPATH_COUNTERS)
        if totals == self._stats_sent:
            self._stats_since = now
            return
        if not final and now - self._stats_since < self.device.stats_interval:
            return
        doc = journal.datapath_stats(
            socket=self.socket_name,
            conn=self.conn,
            tap=self.device.tap.name,
            counters=counters,
            interval=round(now - self._stats_since, 6),
        )
        self._stats_sent, self._stats_since = totals, now
        try:
            self.device.record(doc)
        except Exception:
            self.log.exception("could not book the data path's counters")

    # -- the shell's hook --

    def sync(self, handled: Handled) -> None:
        """Start and stop rings to match the session; call after every handled request.

        Must run before the shell awaits anything after ``next_event`` (module rule 2).
        """
        if handled.change is not None:
            for region in handled.change.removed:
                counter = self.region_counters.pop(region, None)
                if counter is not None:
                    self.removed.translations += counter.translations
                    self.removed.bytes += counter.bytes
        self.sync_rings()
        if self.session.device.rarp and self.active:
            self.send_rarp()

    def send_rarp(self) -> None:
        """Send the RARP announcements SEND_RARP queued, out of the TAP (the guest's frames go
        there, so the network learns where the guest is now: vhost-user.rst SEND_RARP). A
        connection that does not hold the TAP keeps them until it does."""
        queued = self.session.device.rarp
        while queued:
            mac = queued.pop(0)
            name = ":".join(f"{b:02x}" for b in mac)
            try:
                os.write(self.device.tap.fd, rarp_frame(mac))
            except OSError as err:
                self.drop("tx_dropped", f"RARP for {name} to {self.device.tap.name}: {err}")
            else:
                self.count("rarp_sent")
                self.log.info("RARP announcement for %s sent on %s", name, self.device.tap.name)

    def _runnable(self, vring: Vring) -> bool:
        # A live session, owned or not: a vring is started, enabled and placed only by requests
        # the session served, and it serves them before SET_OWNER where a real front-end sends
        # them so (DPDK's virtio-user reconnecting in server mode never sends SET_OWNER); with
        # --strict-protocol it refuses them and the vring never gets here.
        return (
            self.session.state in (SessionState.AWAIT_OWNER, SessionState.OWNED)
            and vring.started
            and vring.enabled
            and vring.addr is not None
            and vring.num > 0
        )

    def wants_tap(self) -> bool:
        """Whether a ring of queue pair 0 is ready to run (so this connection needs the TAP)."""
        return not self.closed and any(self._runnable(v) for v in self.session.vrings[:2])

    def sync_rings(self) -> None:
        """Start and stop rings to match the session (claiming the TAP first, if free)."""
        if self.closed:
            return
        if not self.active:
            if not self.wants_tap() or not self.device.claim(self):
                return
        session = self.session
        for vring in session.vrings[:2]:
            index = vring.index
            runnable = self._runnable(vring)
            key = (vring.kick, vring.addr, vring.num, session.acked_features)
            ring = self.rings.get(index)
            if ring is not None and (ring.finished or not runnable or ring.key != key):
                ring.stop()
                del self.rings[index]
            if not vring.started:
                self.broken.pop(index, None)
            if runnable and index not in self.rings and self.broken.get(index) != key:
                self._start(vring, key)

    def _start(self, vring: Vring, key: tuple[Any, ...]) -> None:
        kick = None
        if vring.kick is not None:
            try:
                kick = os.dup(vring.kick)
            except OSError as err:
                self.log.error("vring %d: cannot dup its kick fd: %s", vring.index, err)
                return
            os.set_blocking(kick, False)
        ring = _Ring(self, vring, key, kick)
        try:
            if self.device.nursery is None:
                raise RuntimeError("the data path has no nursery yet")
            self.device.nursery.start_soon(ring.run, name=f"vhostmem-{ring.name}")
        except RuntimeError as err:  # the nursery is closing: we are shutting down
            if kick is not None:
                os.close(kick)
            self.log.info("%s not started: %s", ring.name, err)
            return
        self.rings[vring.index] = ring
        self.errors.pop(vring.index, None)

    def base_mismatch(self, ring: _Ring, base: int, used_idx: int) -> None:
        """Record that ``ring`` resumes at its used index ``used_idx``, not at the front-end's
        ``base`` (rule 6): an event each time, a log line once per connection."""
        state = self.session.state.value
        if not self.base_mismatch_told:
            self.base_mismatch_told = True
            peer = self.peer or {}
            self.log.warning(
                "PROTOCOL DEVIATION (vring-base-mismatch): %s started with SET_VRING_BASE %d "
                "but its used ring is at %d, in state %s, from pid %s uid %s; resumed at %d: "
                "%s; further ones on this connection go to the event log only",
                ring.name,
                base,
                used_idx,
                state,
                peer.get("pid", "?"),
                peer.get("uid", "?"),
                used_idx,
                VRING_BASE_RULE,
            )
        doc = journal.vring_base_mismatch(
            socket=self.socket_name,
            conn=self.conn,
            peer=self.peer,
            state=state,
            rule=VRING_BASE_RULE,
            vring=ring.index,
            details={"base": base, "used_idx": used_idx},
        )
        self.device.record(doc)

    def ring_failed(self, ring: _Ring, err: Exception) -> None:
        """Record a ring error, signal the err eventfd, and keep the ring stopped."""
        self.broken[ring.index] = ring.key
        self.counters["ring_errors"] += 1
        text = str(err)
        self.errors[ring.index] = text
        self.log.error("%s stopped: %s", ring.name, text)
        gpa = getattr(err, "gpa", None)
        doc = journal.ring_error(
            socket=self.socket_name,
            conn=self.conn,
            vring=ring.index,
            queue=ring.role,
            error=text,
            error_kind=getattr(err, "kind", type(err).__name__),
            base=ring.vring.base,
            gpa=gpa if isinstance(gpa, int) else None,
            details=getattr(err, "details", None),
        )
        self.device.record(doc)
        err_fd = ring.vring.err
        if err_fd is not None:
            try:
                os.write(err_fd, _ONE)
            except OSError:
                pass

    def close(self) -> None:
        """Stop every ring (the connection is ending); idempotent."""
        if self.closed:
            return
        self.closed = True
        for ring in self.rings.values():
            ring.stop()
        self.rings.clear()
        self.mem.release()
        if self.active:
            self.report_stats(final=True)  # the rings' steps are synchronous: totals are final
        self.device.detach(self)

    def as_json(self) -> dict[str, Any]:
        """Counters, rings and per-region translations, for ``vhostmem-ctl stats``."""
        rings = []
        for vring in self.session.vrings[:2]:
            ring = self.rings.get(vring.index)
            queue = ring.queue if ring is not None else None
            rings.append(
                {
                    "index": vring.index,
                    "queue": "rx" if vring.index % 2 == 0 else "tx",
                    "running": ring is not None and not ring.finished,
                    "base": vring.base,
                    "used_idx": queue.used_idx if queue is not None else None,
                    "error": self.errors.get(vring.index),
                }
            )
        regions = [
            {
                "gpa": region.gpa,
                "size": region.size,
                "translations": self.region_counters[region].translations,
                "bytes": self.region_counters[region].bytes,
            }
            for region in self.session.table
            if region in self.region_counters
        ]
        features = self.session.acked_features
        return {
            "socket": self.socket_name,
            "conn": self.conn,
            "tap": self.device.tap.name,
            "active": self.active,
            "refused": self.refused,
            "mrg_rxbuf": bool(features & VirtioFeature.NET_F_MRG_RXBUF),
            "event_idx": bool(features & VirtioFeature.RING_F_EVENT_IDX),
            "rings": rings,
            **self.counters,
            "regions": regions,
            "removed_regions": {
                "translations": self.removed.translations,
                "bytes": self.removed.bytes,
            },
        }


@final
class NetDevice:
    """The process's TAP device and the nursery its rings run in.

    Args:
        tap: the host side (a :class:`vhostmem.tap.Tap`, or a socketpair in unit tests).
        record: the back-end's event recorder (``Booking.book``).
        nursery: where ring tasks run; it must outlive every connection. The shell may set
            ``nursery`` later (it opens the TAP before its nursery exists).
        poll_interval: seconds a waiting ring looks at its ring anyway.
        stats_interval: seconds at least between two ``datapath-stats`` lines of the
            connection that holds the TAP.
    """

    def __init__(
        self,
        tap: TapLike,
        record: Callable[[dict[str, Any]], None],
        nursery: trio.Nursery | None = None,
        *,
        poll_interval: float = POLL_INTERVAL,
        stats_interval: float = STATS_INTERVAL,
    ) -> None:
        self.tap = tap
        self.nursery = nursery
        self.record = record
        self.poll_interval = poll_interval
        self.stats_interval = stats_interval
        #: The connection whose rings the TAP bridges (the first to start them).
        self.owner: NetAttachment | None = None
        #: Connections whose rings were refused, in refusal order (they wait for the TAP).
        self.waiting: list[NetAttachment] = []
        self.closed = False

    def attach(
        self,
        session: Session[Mapping],
        *,
        socket_name: str,
        conn: int,
        log: logging.Logger,
        peer: dict[str, Any] | None = None,
    ) -> NetAttachment:
        """A data path for one connection. It holds nothing yet: the TAP goes to the first
        connection whose rings are ready to run (:meth:`claim`), when they are."""
        return NetAttachment(self, session, socket_name=socket_name, conn=conn, log=log, peer=peer)

    def claim(self, att: NetAttachment) -> bool:
        """Give ``att`` the TAP if nobody holds it; otherwise refuse, loudly, once.

        Returns:
            whether ``att`` now holds the TAP (its rings may start).
        """
        owner = self.owner
        if owner is None or owner is att:
            self.owner = att
            att.active = True
            att.refused = False
            if att in self.waiting:
                self.waiting.remove(att)
            return True
        if not att.refused:
            att.refused = True
            self.waiting.append(att)
            self._refuse(att, owner)
        return False

    def _refuse(self, att: NetAttachment, owner: NetAttachment) -> None:
        reason = (
            f"TAP {self.tap.name} already bridges the rings of conn {owner.conn} on "
            f"{owner.socket_name} ({_who(owner.peer)}), which started its rings first; "
            f"conn {att.conn}'s rings are not started (no traffic) until that connection ends. "
            "A leftover or second front-end on the same TAP: stop the one that should not run"
        )
        att.log.warning(
            "rings of conn %d on %s (%s) refused: %s",
            att.conn,
            att.socket_name,
            _who(att.peer),
            reason,
        )
        self.record(
            journal.datapath_refused(
                socket=att.socket_name,
                conn=att.conn,
                peer=att.peer,
                tap=self.tap.name,
                holder=_party(owner),
                reason=reason,
            )
        )

    def detach(self, att: NetAttachment) -> None:
        """``att``'s connection ended: if it held the TAP, the first waiting connection whose
        rings are still ready gets it."""
        if att in self.waiting:
            self.waiting.remove(att)
        if self.owner is not att:
            return
        self.owner = None
        if self.closed or (self.nursery is not None and self.nursery.cancel_scope.cancel_called):
            return  # shutting down: nobody gets the TAP any more
        for waiting in list(self.waiting):
            if not waiting.wants_tap():
                continue
            self.waiting.remove(waiting)
            waiting.refused = False
            self.owner = waiting
            waiting.active = True
            waiting.log.warning(
                "TAP %s now bridges the rings of conn %d on %s (%s): conn %d on %s (%s), "
                "which held it, ended",
                self.tap.name,
                waiting.conn,
                waiting.socket_name,
                _who(waiting.peer),
                att.conn,
                att.socket_name,
                _who(att.peer),
            )
            waiting.sync_rings()
            try:
                self.record(
                    journal.datapath_handover(
                        socket=waiting.socket_name,
                        conn=waiting.conn,
                        peer=waiting.peer,
                        tap=self.tap.name,
                        previous=_party(att),
                    )
                )
            except Exception:  # detach runs while a connection releases: that must go on
                waiting.log.exception("could not book the TAP's handover")
            return

    def as_json(self) -> dict[str, Any]:
        return {**self.tap.as_json(), "owner_conn": self.owner.conn if self.owner else None}

    def close(self) -> None:
        """Stop the owner's rings and release the TAP (and what was created for it)."""
        self.closed = True
        if self.owner is not None:
            self.owner.close()
        try:
            trio.lowlevel.notify_closing(self.tap.fd)
        except (RuntimeError, OSError, ValueError):  # outside trio, or already closed
            pass
        self.tap.close()


def _who(peer: dict[str, Any] | None) -> str:
    if peer is None:
        return "pid ?, uid ? (SO_PEERCRED unreadable)"
    return f"pid {peer.get('pid', '?')}, uid {peer.get('uid', '?')}"


def _party(att: NetAttachment) -> dict[str, Any]:
    return journal.party(socket=att.socket_name, conn=att.conn, peer=att.peer)
