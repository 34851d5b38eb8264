"""Split virtqueues for vhost-user-net, without I/O.

Theory of operation
-------------------
A split virtqueue (virtio 1.x section 2.7) is three areas of guest memory that the driver and the
device share: the descriptor table (``num`` entries of 16 bytes), the available ring (driver to
device) and the used ring (device to driver). All fields are little-endian (VERSION_1)::

    desc[i]   addr u64 | len u32 | flags u16 | next u16
    avail     flags u16 | idx u16 | ring[num] u16 | used_event u16      (EVENT_IDX)
    used      flags u16 | idx u16 | ring[num] {id u32, len u32} | avail_event u16

:class:`SplitQueue` is the device side of one such queue. It never touches memory itself: every
access goes through a :class:`GuestMemory` (``read(gpa, n)``, ``write(gpa, data)``) that the shell
implements over the region table, so this module works the same on a ``bytearray`` in a unit test
and on QEMU's guest RAM. ``last_avail_idx`` is the front-end's "vring base" (GET_VRING_BASE
answers it): the shell copies it into the session's vring after every chain, so a ring stopped at
any moment reports exactly where it stopped. Chains are completed synchronously (no chain is ever
in flight across a wait), so ``last_avail_idx == used_idx`` whenever the shell awaits.

Rules, each a :class:`RingError` that stops the ring (never the process):

1. A head or ``next`` index outside the table, a chain longer than ``num`` (a loop), an avail
   index that moved by more than ``num``, or an indirect descriptor (INDIRECT_DESC is not
   offered) means the ring cannot be trusted.
2. A buffer whose guest physical range is in no region, or crosses into a hole, is named with
   its GPA, the descriptor, and the regions around the address (:class:`GuestMemoryError` from
   the memory object, wrapped with the ring context).

Packet-level problems (a TX chain shorter than the virtio-net header, a frame larger than the
limit, an RX frame that fits no posted buffer) drop that packet and are counted; the ring goes on.

virtio-net specifics (virtio 1.x section 5.1.6): every packet starts with a 12-byte
``virtio_net_hdr`` (with VERSION_1 it always has ``num_buffers``, MRG_RXBUF or not). TX strips it;
RX writes one with no offloads and ``num_buffers`` = the chains used (1 without MRG_RXBUF).

Notifications follow libvhost-user ``vu_queue_notify``/``vring_notify`` and QEMU's
``virtio_should_notify``: without EVENT_IDX the driver's ``VRING_AVAIL_F_NO_INTERRUPT`` decides;
with it, ``vring_need_event(used_event, new, old)``. We never set ``VRING_USED_F_NO_NOTIFY``, and
with EVENT_IDX :meth:`SplitQueue.arm_kicks` publishes ``avail_event`` = the ``avail.idx`` last
seen so the driver kicks for its next buffer; :meth:`SplitQueue.empty_after_arming` arms and then
looks again (the driver may have added a buffer just before it saw the new ``avail_event``).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, Protocol, final

from vhostmem.errors import VhostMemError
from vhostmem.protocol import VirtioFeature

__all__ = [
    "NET_HDR_SIZE",
    "Buffer",
    "Chain",
    "GuestMemory",
    "GuestMemoryError",
    "PacketError",
    "RingError",
    "RingLayout",
    "RxResult",
    "SplitQueue",
    "build_net_header",
    "need_event",
    "net_header_size",
    "rx_deliver",
    "tx_frame",
]

#: virtq_desc.flags: the chain continues at ``next``.
VIRTQ_DESC_F_NEXT = 1
#: virtq_desc.flags: device-writable buffer (RX); otherwise device-readable (TX).
VIRTQ_DESC_F_WRITE = 2
#: virtq_desc.flags: the buffer is a table of descriptors (INDIRECT_DESC; not offered).
VIRTQ_DESC_F_INDIRECT = 4
#: virtq_avail.flags: the driver asks for no interrupt (ignored with EVENT_IDX).
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

#: struct virtio_net_hdr_mrg_rxbuf: flags, gso_type, hdr_len, gso_size, csum_start,
#: csum_offset, num_buffers (virtio 1.x 5.1.6; 12 bytes with VERSION_1).
NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_SIZE = NET_HDR.size
#: Without VERSION_1 and without MRG_RXBUF the header has no num_buffers (legacy, 10 bytes).
NET_HDR_LEGACY_SIZE = 10
#: virtio_net_hdr.gso_type: no segmentation offload.
VIRTIO_NET_HDR_GSO_NONE = 0

#: Largest split ring (virtio 1.x: "Queue Size ... maximum 32768").
MAX_QUEUE_SIZE = 32768

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_IDX_MASK = 0xFFFF


class GuestMemory(Protocol):
    """Guest physical memory as the ring sees it; the shell implements it over the region table."""

    def read(self, gpa: int, length: int) -> bytes:
        """``length`` bytes at ``gpa`` (they may span adjacent regions).

        Raises:
            GuestMemoryError: some byte is in no region.
        """

    def write(self, gpa: int, data: bytes) -> None:
        """Store ``data`` at ``gpa``.

        Raises:
            GuestMemoryError: some byte is in no region.
        """


class DirtyLog(Protocol):
    """Where the ring reports the guest memory it wrote, for live migration (the shell's dirty
    log; vhost-user.rst "Dirty pages logging")."""

    def mark(self, gpa: int, length: int) -> None:
        """Mark the pages of ``[gpa, gpa + length)`` dirty (nothing while logging is off)."""


class GuestMemoryError(VhostMemError):
    """A guest physical range is not (wholly) in the memory table.

    Args:
        msg: the address and the regions around it, in words.
        gpa: the first guest physical address that is in no region.
        kind: ``hole`` (starts in a hole) or ``crosses-hole`` (starts in a region, runs into one).
        details: numbers for JSON consumers.
    """

    def __init__(
        self, msg: str, *, gpa: int, kind: str = "hole", details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(msg)
        self.gpa = gpa
        self.kind = kind
        self.details = details or {}


@final
class RingError(VhostMemError):
    """The ring cannot be processed any further; the shell stops it and reports this.

    Args:
        msg: what is wrong, with the ring, descriptor and addresses.
        kind: ``hole``, ``crosses-hole``, ``bad-index``, ``loop``, ``avail-idx``, ``indirect``,
            ``layout``.
        gpa: the guest physical address at fault, when there is one.
        details: numbers for JSON consumers.
    """

    def __init__(
        self,
        msg: str,
        *,
        kind: str,
        gpa: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(msg)
        self.kind = kind
        self.gpa = gpa
        self.details = details or {}


@final
class PacketError(VhostMemError):
    """One packet cannot be moved; it is dropped and counted, the ring goes on.

    Args:
        msg: why.
        kind: ``short-header``, ``too-long``.
    """

    def __init__(self, msg: str, *, kind: str) -> None:
        super().__init__(msg)
        self.kind = kind


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's ``vring_need_event``: did the index pass ``event`` going from ``old`` to ``new``?"""
    return ((new - event - 1) & _IDX_MASK) < ((new - old) & _IDX_MASK)


@final
@dataclass(frozen=True, slots=True)
class RingLayout:
    """Where a split ring's three areas are, in guest physical addresses.

    Attributes:
        num: queue size (a power of two, at most 32768).
        desc: descriptor table.
        avail: available ring.
        used: used ring.
    """

    num: int
    desc: int
    avail: int
    used: int

    @staticmethod
    def sizes(num: int) -> tuple[int, int, int]:
        """Bytes of the descriptor table, available ring and used ring (with the event fields)."""
        return 16 * num, 6 + 2 * num, 6 + 8 * num

    def check(self) -> None:
        """Raise :class:`RingError` if the size or the alignment breaks virtio 1.x 2.7.

        Raises:
            RingError: ``kind="layout"``.
        """
        num = self.num
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise RingError(
                f"ring size {num} is not a power of two in 1..{MAX_QUEUE_SIZE} (split rings "
                "index slots modulo the size, which must divide 65536)",
                kind="layout",
                details={"num": num},
            )
        for part, gpa, align in (
            ("desc", self.desc, 16),
            ("avail", self.avail, 2),
            ("used", self.used, 4),
        ):
            if gpa % align:
                raise RingError(
                    f"{part} ring at gpa 0x{gpa:x} is not {align}-byte aligned (virtio 1.x 2.7)",
                    kind="layout",
                    gpa=gpa,
                    details={"part": part, "gpa": gpa, "align": align},
                )


@final
@dataclass(frozen=True, slots=True)
class Buffer:
    """One descriptor of a chain: a guest physical range and its direction."""

    gpa: int
    length: int
    writable: bool


@final
@dataclass(frozen=True, slots=True)
class Chain:
    """A descriptor chain taken from the available ring.

    Attributes:
        head: index of its first descriptor (what the used ring reports back).
        buffers: its descriptors in order.
    """

    head: int
    buffers: tuple[Buffer, ...]

    @property
    def readable(self) -> int:
        """Device-readable bytes."""
        return sum(b.length for b in self.buffers if not b.writable)

    @property
    def writable(self) -> int:
        """Device-writable bytes."""
        return sum(b.length for b in self.buffers if b.writable)


@final
class SplitQueue:
    """The device side of one split virtqueue.

    Args:
        mem: guest memory.
        layout: the ring's guest physical addresses (already checked).
        last_avail_idx: where to resume (the front-end's SET_VRING_BASE).
        event_idx: EVENT_IDX was negotiated.
        name: how messages name the ring (``vring 1 (tx)``).
        log: where writes into guest memory are marked for migration, or ``None``.
        used_log: ``log_guest_addr`` of SET_VRING_ADDR when its flags carry VHOST_VRING_F_LOG,
            else ``None``.

    Dirty logging (vhost-user.rst "Dirty pages logging"; Linux ``drivers/vhost/vhost.c``
    ``vhost_add_used_n``/``log_used``): every write is marked in ``log`` right after it is
    made, so the entries of a used ring update are marked before the ``used.idx`` write that
    publishes them, and QEMU, which clears the log while copying pages, never clears a bit
    before the write it stands for. Buffers are marked at their own GPA; the used ring
    (entries, ``used.idx``, ``avail_event``) at ``used_log`` plus the offset into the ring, and
    only when the front-end set VHOST_VRING_F_LOG (the kernel's ``vq->log_used``).

    The used index is read from guest memory, as libvhost-user ``vu_set_vring_addr_exec`` does:
    the driver may have been running with another back-end before.

    Raises:
        RingError: the layout is invalid, or the used ring is not readable.
    """

    def __init__(
        self,
        mem: GuestMemory,
        layout: RingLayout,
        *,
        last_avail_idx: int,
        event_idx: bool,
        name: str = "vring",
        log: DirtyLog | None = None,
        used_log: int | None = None,
    ) -> None:
        layout.check()
        self.mem = mem
        self.log = log
        self.used_log = used_log
        self._used_end = layout.used + RingLayout.sizes(layout.num)[2]
        self.layout = layout
        self.num = layout.num
        self.name = name
        self.event_idx = event_idx
        self.last_avail_idx = last_avail_idx & _IDX_MASK
        self._shadow_avail_idx = self.last_avail_idx
        self.used_idx = self._read_u16(layout.used + 2, "used.idx")
        self._signalled_used = self.used_idx
        self._signalled_valid = False

    def resume_at_used(self) -> None:
        """Resume where the used ring is, not where the front-end's base said.

        Every chain this device takes is completed in order before the next, so the used
        index is exactly where processing stopped; libvhost-user does the same for a queue
        processed in order (``vu_set_vring_addr_exec``), DPDK's vhost library always
        (lib/vhost/vhost_user.c ``translate_ring_addresses``).
        """
        self.last_avail_idx = self.used_idx
        self._shadow_avail_idx = self.used_idx

    # -- memory with context --

    def _read(self, gpa: int, length: int, what: str) -> bytes:
        try:
            return self.mem.read(gpa, length)
        except GuestMemoryError as err:
            raise RingError(
                f"{self.name}: {what} at gpa 0x{gpa:x} (+0x{length:x}): {err}",
                kind=err.kind,
                gpa=err.gpa,
                details={**err.details, "ring": self.name, "what": what},
            ) from err

    def _write(self, gpa: int, data: bytes, what: str) -> None:
        try:
            self.mem.write(gpa, data)
        except GuestMemoryError as err:
            raise RingError(
                f"{self.name}: {what} at gpa 0x{gpa:x} (+0x{len(data):x}): {err}",
                kind=err.kind,
                gpa=err.gpa,
                details={**err.details, "ring": self.name, "what": what},
            ) from err
        log = self.log
        if log is not None:
            used = self.layout.used
            if not used <= gpa < self._used_end:
                log.mark(gpa, len(data))
            elif self.used_log is not None:
                log.mark(self.used_log + (gpa - used), len(data))

    def _read_u16(self, gpa: int, what: str) -> int:
        value: int = _U16.unpack(self._read(gpa, 2, what))[0]
        return value

    # -- available side --

    def avail_idx(self) -> int:
        """The driver's ``avail.idx`` now (re-read from memory)."""
        self._shadow_avail_idx = self._read_u16(self.layout.avail + 2, "avail.idx")
        return self._shadow_avail_idx

    def available(self) -> int:
        """Chains the driver has made available that we have not taken.

        Raises:
            RingError: ``avail.idx`` ran more than ``num`` ahead (a corrupt ring).
        """
        count = (self.avail_idx() - self.last_avail_idx) & _IDX_MASK
        if count > self.num:
            raise RingError(
                f"{self.name}: avail.idx {self._shadow_avail_idx} is {count} ahead of "
                f"last_avail_idx {self.last_avail_idx}, more than the ring size {self.num}",
                kind="avail-idx",
                details={
                    "avail_idx": self._shadow_avail_idx,
                    "last_avail_idx": self.last_avail_idx,
                    "num": self.num,
                },
            )
        return count

    def pop(self) -> Chain | None:
        """Take the next available chain, or ``None`` when the ring is empty.

        Raises:
            RingError: the chain or the ring is corrupt, or a descriptor is in no region.
        """
        if self._shadow_avail_idx == self.last_avail_idx and self.available() == 0:
            return None
        slot = self.last_avail_idx % self.num
        head = self._read_u16(self.layout.avail + 4 + 2 * slot, f"avail.ring[{slot}]")
        chain = self._walk(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & _IDX_MASK
        return chain

    def unpop(self, count: int) -> None:
        """Give back the last ``count`` chains taken (libvhost-user ``vu_queue_rewind``)."""
        self.last_avail_idx = (self.last_avail_idx - count) & _IDX_MASK

    def _walk(self, head: int) -> Chain:
        num = self.num
        if head >= num:
            raise RingError(
                f"{self.name}: avail ring names head descriptor {head}, outside the table of {num}",
                kind="bad-index",
                details={"head": head, "num": num},
            )
        buffers: list[Buffer] = []
        index = head
        desc = self.layout.desc
        for _ in range(num):
            addr, length, flags, nxt = _DESC.unpack(
                self._read(desc + 16 * index, 16, f"descriptor {index}")
            )
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise RingError(
                    f"{self.name}: descriptor {index} (chain head {head}) is indirect, but "
                    "INDIRECT_DESC was not offered",
                    kind="indirect",
                    details={"head": head, "index": index},
                )
            buffers.append(Buffer(addr, length, bool(flags & VIRTQ_DESC_F_WRITE)))
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, tuple(buffers))
            if nxt >= num:
                raise RingError(
                    f"{self.name}: descriptor {index} (chain head {head}) continues at {nxt}, "
                    f"outside the table of {num}",
                    kind="bad-index",
                    details={"head": head, "index": index, "next": nxt},
                )
            index = nxt
        raise RingError(
            f"{self.name}: chain at head {head} is longer than the ring ({num} descriptors): a "
            "loop",
            kind="loop",
            details={"head": head, "num": num},
        )

    def arm_kicks(self) -> None:
        """Ask the driver to kick for its next buffer (EVENT_IDX: ``avail_event``).

        ``avail_event`` is the ``avail.idx`` last seen, not re-read (Linux
        ``drivers/vhost/vhost.c`` ``vhost_enable_notify`` publishes its cached ``vq->avail_idx``
        and only then reads ``avail.idx`` again, as :meth:`empty_after_arming` does; libvhost-user
        ``vu_queue_set_notification`` instead re-reads ``avail.idx`` and publishes that): it is
        ``last_avail_idx`` when the ring is empty, and past chains seen but not taken (too few
        RX buffers for a frame) when it is not.
        """
        if self.event_idx:
            self._write(
                self.layout.used + 4 + 8 * self.num,
                _U16.pack(self._shadow_avail_idx),
                "used.avail_event",
            )

    def empty_after_arming(self) -> bool:
        """Arm kicks (:meth:`arm_kicks`), then look at ``avail.idx`` again.

        Returns:
            ``True`` when the driver made nothing available beyond what was last seen: wait for
            its kick. ``False`` when it added chains just before it saw the new ``avail_event``.

        Raises:
            RingError: ``avail.idx`` ran more than ``num`` ahead, or the ring is in no region.
        """
        seen = self._shadow_avail_idx
        self.arm_kicks()
        self.available()
        return self._shadow_avail_idx == seen

    # -- used side --

    def push(self, done: list[tuple[int, int]]) -> None:
        """Return chains: ``(head, bytes written)`` each, then publish ``used.idx`` once.

        The elements are written before the index, so the driver never sees an index that
        covers an element not written yet (several elements per frame with MRG_RXBUF).
        """
        used = self.layout.used
        idx = self.used_idx
        for head, written in done:
            slot = idx % self.num
            self._write(used + 4 + 8 * slot, _USED_ELEM.pack(head, written), f"used.ring[{slot}]")
            idx = (idx + 1) & _IDX_MASK
        self._write(used + 2, _U16.pack(idx), "used.idx")
        self.used_idx = idx

    def needs_notify(self) -> bool:
        """Whether to signal the call eventfd for what was pushed since the last signal."""
        if self.event_idx:
            old, new = self._signalled_used, self.used_idx
            valid = self._signalled_valid
            self._signalled_used = new
            self._signalled_valid = True
            if not valid:
                return True
            event = self._read_u16(self.layout.avail + 4 + 2 * self.num, "avail.used_event")
            return need_event(event, new, old)
        flags = self._read_u16(self.layout.avail, "avail.flags")
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT


#: EtherType of RARP (RFC 903) and its opcode "request reverse".
_ETH_P_RARP = 0x8035
_RARP_REQUEST_REVERSE = 3
_RARP = struct.Struct("!6s6sHHHBBH6s4s6s4s")
#: Shortest Ethernet frame without its FCS: the RARP frame is padded to it.
_ETH_MIN = 60


def rarp_frame(mac: bytes) -> bytes:
    """The RARP announcement for ``mac`` that a back-end sends after live migration (vhost-user.rst
    SEND_RARP: "broadcast a fake RARP to notify the migration is terminated"), as DPDK's
    ``make_rarp_packet`` builds it: broadcast from ``mac``, RARP request reverse (RFC 903) with
    ``mac`` as sender and target hardware address and zero protocol addresses, padded to 60 bytes.

    Raises:
        ValueError: ``mac`` is not 6 bytes.
    """
    if len(mac) != 6:
        raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
    frame = _RARP.pack(
        b"\xff" * 6,  # destination: broadcast
        mac,  # source
        _ETH_P_RARP,
        1,  # hardware type: Ethernet
        0x0800,  # protocol type: IPv4
        6,  # hardware address length
        4,  # protocol address length
        _RARP_REQUEST_REVERSE,
        mac,  # sender hardware address
        bytes(4),  # sender protocol address
        mac,  # target hardware address
        bytes(4),  # target protocol address
    )
    return frame + bytes(_ETH_MIN - len(frame))


def net_header_size(features: int) -> int:
    """Bytes of the virtio-net header for these negotiated features (virtio 1.x 5.1.6.1)."""
    if features & (VirtioFeature.VERSION_1 | VirtioFeature.NET_F_MRG_RXBUF):
        return NET_HDR_SIZE
    return NET_HDR_LEGACY_SIZE


def build_net_header(num_buffers: int, header_size: int = NET_HDR_SIZE) -> bytes:
    """A virtio-net header with no offloads."""
    return NET_HDR.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0, num_buffers)[:header_size]


def tx_frame(
    queue: SplitQueue, chain: Chain, *, max_frame: int, header_size: int = NET_HDR_SIZE
) -> bytes:
    """The Ethernet frame a TX chain carries: its readable bytes after the virtio-net header.

    Device-writable descriptors in a TX chain are ignored (the driver never posts them).

    Raises:
        PacketError: shorter than the header, or a frame longer than ``max_frame``.
        RingError: a buffer is in no region.
    """
    readable = [b for b in chain.buffers if not b.writable and b.length]
    total = sum(b.length for b in readable)
    if total < header_size:
        raise PacketError(
            f"{queue.name}: chain at head {chain.head} has {total} readable bytes, less than "
            f"the {header_size}-byte virtio-net header",
            kind="short-header",
        )
    if total - header_size > max_frame:
        raise PacketError(
            f"{queue.name}: chain at head {chain.head} carries a {total - header_size}-byte "
            f"frame, above the {max_frame}-byte limit",
            kind="too-long",
        )
    parts = [
        queue._read(b.gpa, b.length, f"buffer of chain {chain.head} (descriptor {i})")
        for i, b in enumerate(readable)
    ]
    return b"".join(parts)[header_size:]


class RxResult(enum.Enum):
    """What :func:`rx_deliver` did with a frame."""

    #: Written into posted buffers and pushed to the used ring.
    DELIVERED = "delivered"
    #: Not enough buffers posted; nothing was taken (try again after a kick).
    NO_BUFFERS = "no-buffers"
    #: Fits no posted chain without MRG_RXBUF; the frame is dropped, the chain given back.
    TOO_BIG = "too-big"


@dataclass(slots=True)
class RxDelivery:
    """Outcome of one :func:`rx_deliver`: the result and how many chains it used."""

    result: RxResult
    chains: int = 0


def rx_deliver(
    queue: SplitQueue, frame: bytes, *, mergeable: bool, header_size: int = NET_HDR_SIZE
) -> RxDelivery:
    """Put one Ethernet frame, behind a virtio-net header, into posted RX buffers.

    Without MRG_RXBUF the frame goes into one chain; with it, into as many chains as it takes
    (``num_buffers`` in the header says how many). Chains are taken only when the whole frame
    fits, so a frame waiting for buffers takes none.

    Raises:
        RingError: a buffer is in no region, or the ring is corrupt.
    """
    needed = header_size + len(frame)
    chains: list[Chain] = []
    capacity = 0
    while capacity < needed:
        if chains and not mergeable:
            queue.unpop(len(chains))
            return RxDelivery(RxResult.TOO_BIG)
        chain = queue.pop()
        if chain is None:
            queue.unpop(len(chains))
            if len(chains) >= queue.num:  # every slot is posted and still too small: never fits
                return RxDelivery(RxResult.TOO_BIG)
            return RxDelivery(RxResult.NO_BUFFERS)
        chains.append(chain)
        capacity += chain.writable
    data = build_net_header(len(chains), header_size) + frame
    offset = 0
    done: list[tuple[int, int]] = []
    for chain in chains:
        start = offset
        for i, buf in enumerate(chain.buffers):
            if not buf.writable or offset >= needed:
                continue
            n = min(buf.length, needed - offset)
            queue._write(
                buf.gpa, data[offset : offset + n], f"buffer of chain {chain.head} (descriptor {i})"
            )
            offset += n
        done.append((chain.head, offset - start))
    queue.push(done)
    return RxDelivery(RxResult.DELIVERED, len(chains))
