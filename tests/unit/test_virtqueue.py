"""Split rings without I/O: a driver written from the virtio spec against SplitQueue.

The memory is a few ``bytearray`` regions with holes between them, so every test can put a
buffer across a region boundary or into a hole. :class:`Driver` is the guest side (it builds
descriptor chains and reads the used ring the way a virtio driver does); test_datapath reuses it
over memfd-backed memory.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostmem.protocol import VirtioFeature
from vhostmem.virtqueue import (
    NET_HDR,
    NET_HDR_SIZE,
    GuestMemory,
    GuestMemoryError,
    PacketError,
    RingError,
    RingLayout,
    RxResult,
    SplitQueue,
    build_net_header,
    need_event,
    net_header_size,
    rx_deliver,
    tx_frame,
)

KiB = 1 << 10
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class FakeMemory:
    """Guest memory made of bytearrays at GPAs; a hole anywhere else."""

    def __init__(self, regions: Sequence[tuple[int, int]]) -> None:
        self.regions = [(gpa, bytearray(size)) for gpa, size in regions]
        self.accesses = 0

    def _find(self, at: int, start: int) -> tuple[int, bytearray]:
        for gpa, data in self.regions:
            if gpa <= at < gpa + len(data):
                return gpa, data
        raise GuestMemoryError(
            f"guest physical address 0x{at:x} is in no region",
            gpa=at,
            kind="crosses-hole" if at != start else "hole",
        )

    def read(self, gpa: int, length: int) -> bytes:
        self.accesses += 1
        out = bytearray()
        at = gpa
        while at < gpa + length:
            base, data = self._find(at, gpa)
            n = min(gpa + length, base + len(data)) - at
            out += data[at - base : at - base + n]
            at += n
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        self.accesses += 1
        at = gpa
        while at < gpa + len(data):
            base, region = self._find(at, gpa)
            n = min(gpa + len(data), base + len(region)) - at
            region[at - base : at - base + n] = data[at - gpa : at - gpa + n]
            at += n


class Driver:
    """The guest side of one split ring, written from virtio 1.x 2.7 (driver requirements)."""

    def __init__(self, mem: GuestMemory, layout: RingLayout) -> None:
        self.mem = mem
        self.layout = layout
        self.num = layout.num
        desc, avail, used = RingLayout.sizes(layout.num)
        mem.write(layout.desc, bytes(desc))
        mem.write(layout.avail, bytes(avail))
        mem.write(layout.used, bytes(used))
        self.free = list(range(layout.num))
        self.avail_idx = 0
        self.last_used = 0
        self.chains: dict[int, list[int]] = {}

    def write_desc(self, index: int, gpa: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(self.layout.desc + 16 * index, struct.pack("<QIHH", gpa, length, flags, nxt))

    def post(self, buffers: Sequence[tuple[int, int, bool]], *, publish: bool = True) -> int:
        """Chain ``(gpa, length, writable)`` buffers, put the head in the avail ring."""
        ids = [self.free.pop(0) for _ in buffers]
        for k, (gpa, length, writable) in enumerate(buffers):
            last = k == len(buffers) - 1
            flags = (0 if last else F_NEXT) | (F_WRITE if writable else 0)
            self.write_desc(ids[k], gpa, length, flags, 0 if last else ids[k + 1])
        self.put_head(ids[0], publish=publish)
        self.chains[ids[0]] = ids
        return ids[0]

    def put_head(self, head: int, *, publish: bool = True) -> None:
        slot = self.avail_idx % self.num
        self.mem.write(self.layout.avail + 4 + 2 * slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self) -> None:
        self.mem.write(self.layout.avail + 2, struct.pack("<H", self.avail_idx))

    def used(self) -> list[tuple[int, int]]:
        """New used elements ``(id, len)``; their descriptors go back to the free list."""
        (idx,) = struct.unpack("<H", self.mem.read(self.layout.used + 2, 2))
        out = []
        while self.last_used != idx:
            slot = self.last_used % self.num
            elem = struct.unpack("<II", self.mem.read(self.layout.used + 4 + 8 * slot, 8))
            out.append(elem)
            self.free.extend(self.chains.pop(elem[0], []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write(self.layout.avail, struct.pack("<H", flags))

    def set_used_event(self, value: int) -> None:
        self.mem.write(self.layout.avail + 4 + 2 * self.num, struct.pack("<H", value))

    def avail_event(self) -> int:
        value: int = struct.unpack("<H", self.mem.read(self.layout.used + 4 + 8 * self.num, 2))[0]
        return value


# Regions: A [0, 64 KiB), B [64 KiB, 128 KiB) adjacent to A, hole [128 KiB, 256 KiB),
# C [256 KiB, 320 KiB).
A, B, HOLE, C = 0, 64 * KiB, 128 * KiB, 256 * KiB
LAYOUT = RingLayout(num=8, desc=0x1000, avail=0x2000, used=0x3000)
BUF = 0x8000  # free space in A for buffers


def ring(
    *, event_idx: bool = False, base: int = 0, num: int = 8
) -> tuple[FakeMemory, Driver, SplitQueue]:
    mem = FakeMemory([(A, 64 * KiB), (B, 64 * KiB), (C, 64 * KiB)])
    layout = RingLayout(num, LAYOUT.desc, LAYOUT.avail, LAYOUT.used)
    driver = Driver(mem, layout)
    driver.avail_idx = base
    driver.last_used = base
    mem.write(layout.used + 2, struct.pack("<H", base))
    driver.publish()
    queue = SplitQueue(mem, layout, last_avail_idx=base, event_idx=event_idx, name="vring 1 (tx)")
    return mem, driver, queue


def header(num_buffers: int = 0) -> bytes:
    return build_net_header(num_buffers)


# -- TX ------------------------------------------------------------------------------------


def test_tx_single_descriptor_header_and_frame() -> None:
    mem, driver, queue = ring()
    frame = bytes(range(60))
    mem.write(BUF, header() + frame)
    head = driver.post([(BUF, NET_HDR_SIZE + len(frame), False)])
    chain = queue.pop()
    assert chain is not None and chain.head == head
    assert tx_frame(queue, chain, max_frame=1514) == frame
    queue.push([(chain.head, 0)])
    assert queue.last_avail_idx == 1
    assert driver.used() == [(head, 0)]
    assert queue.pop() is None


def test_tx_chain_across_a_region_boundary() -> None:
    mem, driver, queue = ring()
    frame = bytes((i * 7) & 0xFF for i in range(1500))
    # header alone in C, then the payload in one descriptor that starts 100 bytes before the end
    # of A and continues into B (adjacent regions: one guest-physical range, two regions)
    mem.write(C + 0x100, header())
    start = B - 100
    mem.write(start, frame)
    driver.post([(C + 0x100, NET_HDR_SIZE, False), (start, len(frame), False)])
    chain = queue.pop()
    assert chain is not None and len(chain.buffers) == 2
    assert tx_frame(queue, chain, max_frame=1514) == frame


def test_tx_buffer_in_a_hole_is_a_ring_error_naming_the_gpa() -> None:
    _, driver, queue = ring()
    driver.post([(HOLE + 0x40, 100, False)])
    chain = queue.pop()
    assert chain is not None
    with pytest.raises(RingError) as info:
        tx_frame(queue, chain, max_frame=1514)
    assert info.value.kind == "hole"
    assert info.value.gpa == HOLE + 0x40
    assert f"0x{HOLE + 0x40:x}" in str(info.value) and "vring 1 (tx)" in str(info.value)


def test_tx_buffer_crossing_into_a_hole() -> None:
    _, driver, queue = ring()
    driver.post([(B + 64 * KiB - 10, 100, False)])
    chain = queue.pop()
    assert chain is not None
    with pytest.raises(RingError) as info:
        tx_frame(queue, chain, max_frame=1514)
    assert info.value.kind == "crosses-hole"
    assert info.value.gpa == HOLE


def test_tx_short_header_and_long_frame_are_packet_errors() -> None:
    _, driver, queue = ring()
    driver.post([(BUF, 8, False)])
    driver.post([(BUF, NET_HDR_SIZE + 2000, False)])
    chain = queue.pop()
    assert chain is not None
    with pytest.raises(PacketError) as info:
        tx_frame(queue, chain, max_frame=1514)
    assert info.value.kind == "short-header"
    chain = queue.pop()
    assert chain is not None
    with pytest.raises(PacketError) as info:
        tx_frame(queue, chain, max_frame=1514)
    assert info.value.kind == "too-long"


def test_tx_ignores_writable_descriptors() -> None:
    mem, driver, queue = ring()
    mem.write(BUF, header() + b"abc")
    driver.post([(BUF, NET_HDR_SIZE + 3, False), (BUF + 0x100, 64, True)])
    chain = queue.pop()
    assert chain is not None and chain.readable == NET_HDR_SIZE + 3 and chain.writable == 64
    assert tx_frame(queue, chain, max_frame=1514) == b"abc"


# -- corrupt rings ---------------------------------------------------------------------------


def test_head_outside_the_table() -> None:
    _, driver, queue = ring()
    driver.put_head(8)
    with pytest.raises(RingError) as info:
        queue.pop()
    assert info.value.kind == "bad-index"
    assert queue.last_avail_idx == 0  # not consumed: GET_VRING_BASE points at it


def test_next_outside_the_table() -> None:
    _, driver, queue = ring()
    driver.write_desc(0, BUF, 10, F_NEXT, 9)
    driver.put_head(0)
    with pytest.raises(RingError) as info:
        queue.pop()
    assert info.value.kind == "bad-index" and info.value.details["next"] == 9


def test_descriptor_loop() -> None:
    _, driver, queue = ring()
    driver.write_desc(0, BUF, 10, F_NEXT, 1)
    driver.write_desc(1, BUF, 10, F_NEXT, 0)
    driver.put_head(0)
    with pytest.raises(RingError) as info:
        queue.pop()
    assert info.value.kind == "loop"


def test_indirect_descriptor_is_refused() -> None:
    _, driver, queue = ring()
    driver.write_desc(0, BUF, 32, F_INDIRECT, 0)
    driver.put_head(0)
    with pytest.raises(RingError) as info:
        queue.pop()
    assert info.value.kind == "indirect"


def test_avail_idx_running_ahead_of_the_ring() -> None:
    _, driver, queue = ring()
    driver.avail_idx = 9
    driver.publish()
    with pytest.raises(RingError) as info:
        queue.available()
    assert info.value.kind == "avail-idx"


def test_ring_in_a_hole() -> None:
    mem = FakeMemory([(A, 64 * KiB)])
    with pytest.raises(RingError) as info:
        SplitQueue(mem, RingLayout(8, 0x1000, 0x2000, HOLE), last_avail_idx=0, event_idx=False)
    assert info.value.gpa == HOLE + 2


@pytest.mark.parametrize(
    ("layout", "what"),
    [
        (RingLayout(6, 0x1000, 0x2000, 0x3000), "power of two"),
        (RingLayout(0, 0x1000, 0x2000, 0x3000), "power of two"),
        (RingLayout(65536, 0x1000, 0x2000, 0x3000), "power of two"),
        (RingLayout(8, 0x1008, 0x2000, 0x3000), "desc ring"),
        (RingLayout(8, 0x1000, 0x2001, 0x3000), "avail ring"),
        (RingLayout(8, 0x1000, 0x2000, 0x3002), "used ring"),
    ],
)
def test_layout_checks(layout: RingLayout, what: str) -> None:
    with pytest.raises(RingError, match=what) as info:
        layout.check()
    assert info.value.kind == "layout"


# -- indices -------------------------------------------------------------------------------


def test_indices_wrap_at_65536() -> None:
    mem, driver, queue = ring(base=65534)
    heads = []
    for i in range(4):
        mem.write(BUF + 0x100 * i, header() + bytes([i]) * 20)
        heads.append(driver.post([(BUF + 0x100 * i, NET_HDR_SIZE + 20, False)]))
    assert queue.available() == 4
    got = []
    while (chain := queue.pop()) is not None:
        got.append(tx_frame(queue, chain, max_frame=1514)[0])
        queue.push([(chain.head, 0)])
    assert got == [0, 1, 2, 3]
    assert queue.last_avail_idx == 2 and queue.used_idx == 2
    assert [h for h, _ in driver.used()] == heads


def test_unpop_gives_chains_back() -> None:
    _, driver, queue = ring()
    driver.post([(BUF, 100, True)])
    driver.post([(BUF + 0x100, 100, True)])
    first = queue.pop()
    second = queue.pop()
    assert first is not None and second is not None
    queue.unpop(2)
    assert queue.last_avail_idx == 0
    again = queue.pop()
    assert again is not None and again.head == first.head


def test_used_idx_is_read_from_memory() -> None:
    mem, _, _ = ring()
    mem.write(LAYOUT.used + 2, struct.pack("<H", 5))
    queue = SplitQueue(mem, LAYOUT, last_avail_idx=5, event_idx=False)
    assert queue.used_idx == 5 and queue.last_avail_idx == 5


# -- RX --------------------------------------------------------------------------------------


def test_rx_one_chain_without_mrg_rxbuf() -> None:
    mem, driver, queue = ring()
    head = driver.post([(BUF, NET_HDR_SIZE + 1514, True)])
    frame = bytes(range(256)) * 2
    out = rx_deliver(queue, frame, mergeable=False)
    assert out.result is RxResult.DELIVERED and out.chains == 1
    assert driver.used() == [(head, NET_HDR_SIZE + len(frame))]
    data = mem.read(BUF, NET_HDR_SIZE + len(frame))
    assert NET_HDR.unpack(data[:NET_HDR_SIZE])[-1] == 1  # num_buffers is 1 with VERSION_1
    assert data[NET_HDR_SIZE:] == frame


def test_rx_header_and_data_in_separate_descriptors_across_regions() -> None:
    mem, driver, queue = ring()
    head = driver.post([(C, NET_HDR_SIZE, True), (B - 50, 1514, True)])
    frame = b"\xaa" * 300
    assert rx_deliver(queue, frame, mergeable=False).result is RxResult.DELIVERED
    assert driver.used() == [(head, NET_HDR_SIZE + 300)]
    assert mem.read(C, NET_HDR_SIZE) == build_net_header(1)
    assert mem.read(B - 50, 300) == frame


def test_rx_too_big_without_mrg_gives_the_chain_back() -> None:
    _, driver, queue = ring()
    driver.post([(BUF, 100, True)])
    out = rx_deliver(queue, b"x" * 200, mergeable=False)
    assert out.result is RxResult.TOO_BIG
    assert queue.last_avail_idx == 0 and driver.used() == []
    assert rx_deliver(queue, b"y" * 50, mergeable=False).result is RxResult.DELIVERED


def test_rx_no_buffers_takes_nothing() -> None:
    _, driver, queue = ring()
    assert rx_deliver(queue, b"x" * 60, mergeable=True).result is RxResult.NO_BUFFERS
    driver.post([(BUF, 40, True)])
    assert rx_deliver(queue, b"x" * 60, mergeable=True).result is RxResult.NO_BUFFERS
    assert queue.last_avail_idx == 0  # the one chain was given back
    driver.post([(BUF + 0x100, 40, True)])
    out = rx_deliver(queue, b"x" * 60, mergeable=True)
    assert out.result is RxResult.DELIVERED and out.chains == 2


def test_rx_mergeable_spreads_over_chains_and_counts_them() -> None:
    mem, driver, queue = ring()
    heads = [driver.post([(BUF + 0x1000 * i, 512, True)]) for i in range(4)]
    frame = bytes((3 * i) & 0xFF for i in range(1400))
    out = rx_deliver(queue, frame, mergeable=True)
    assert out.result is RxResult.DELIVERED and out.chains == 3
    used = driver.used()
    assert used == [(heads[0], 512), (heads[1], 512), (heads[2], NET_HDR_SIZE + 1400 - 1024)]
    got = b"".join(mem.read(BUF + 0x1000 * i, n) for i, (_, n) in enumerate(used))
    assert NET_HDR.unpack(got[:NET_HDR_SIZE])[-1] == 3
    assert got[NET_HDR_SIZE:] == frame
    assert queue.last_avail_idx == 3


def test_rx_frame_bigger_than_the_whole_ring_is_dropped() -> None:
    _, driver, queue = ring(num=2)
    driver.post([(BUF, 64, True)])
    driver.post([(BUF + 0x100, 64, True)])
    assert rx_deliver(queue, b"z" * 500, mergeable=True).result is RxResult.TOO_BIG
    assert queue.last_avail_idx == 0


@settings(max_examples=60, deadline=None)
@given(
    frame_len=st.integers(14, 4000),
    sizes=st.lists(st.integers(1, 1600), min_size=1, max_size=8),
    split=st.booleans(),
)
def test_rx_mergeable_round_trip(frame_len: int, sizes: list[int], split: bool) -> None:
    """Whatever the posted buffer sizes, the driver reads back header + frame or nothing."""
    mem, driver, queue = ring(num=16)
    where = []
    heads = []
    at = BUF
    for size in sizes:
        if split and size > 1:
            parts = [(at, size // 2, True), (at + 0x1000, size - size // 2, True)]
        else:
            parts = [(at, size, True)]
        where.append(parts)
        heads.append(driver.post(parts))
        at += 0x2000
    frame = bytes((i * 31 + frame_len) & 0xFF for i in range(frame_len))
    out = rx_deliver(queue, frame, mergeable=True)
    used = driver.used()
    if NET_HDR_SIZE + frame_len > sum(sizes):
        assert out.result is not RxResult.DELIVERED and used == []
        assert queue.last_avail_idx == 0
        return
    assert out.result is RxResult.DELIVERED
    assert [head for head, _ in used] == heads[: len(used)]
    got = bytearray()
    for (_, n), parts in zip(used, where, strict=False):
        for gpa, length, _ in parts:
            take = min(length, n)
            got += mem.read(gpa, take)
            n -= take
    assert bytes(got[NET_HDR_SIZE:]) == frame
    assert NET_HDR.unpack(bytes(got[:NET_HDR_SIZE]))[-1] == len(used)


def test_legacy_header_without_version_1() -> None:
    assert net_header_size(int(VirtioFeature.VERSION_1)) == 12
    assert net_header_size(int(VirtioFeature.NET_F_MRG_RXBUF)) == 12
    assert net_header_size(0) == 10
    mem, driver, queue = ring()
    mem.write(BUF, bytes(10) + b"legacy")
    driver.post([(BUF, 16, False)])
    chain = queue.pop()
    assert chain is not None
    assert tx_frame(queue, chain, max_frame=1514, header_size=10) == b"legacy"


# -- notifications -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),  # crossed event 0
        (1, 1, 0, False),  # not yet past event 1
        (5, 10, 3, True),
        (10, 10, 3, False),
        (65535, 0, 65534, True),  # wraps
        (2, 2, 2, False),  # nothing new
    ],
)
def test_need_event(event: int, new: int, old: int, expected: bool) -> None:
    assert need_event(event, new, old) is expected


def test_notify_follows_no_interrupt_without_event_idx() -> None:
    _, driver, queue = ring()
    driver.post([(BUF, 100, True)])
    rx_deliver(queue, b"a" * 20, mergeable=False)
    assert queue.needs_notify()
    driver.set_avail_flags(1)
    assert not queue.needs_notify()


def test_notify_with_event_idx_uses_used_event() -> None:
    _, driver, queue = ring(event_idx=True)
    for i in range(4):
        driver.post([(BUF + 0x100 * i, 100, True)])
    rx_deliver(queue, b"a" * 20, mergeable=False)
    assert queue.needs_notify()  # first signal is always sent
    driver.set_used_event(2)  # the driver wants a signal once used idx passes 2
    rx_deliver(queue, b"b" * 20, mergeable=False)  # used idx 2: not past 2
    assert not queue.needs_notify()
    rx_deliver(queue, b"c" * 20, mergeable=False)  # used idx 3: past 2
    assert queue.needs_notify()


def test_arm_kicks_publishes_avail_event_only_with_event_idx() -> None:
    _, driver, queue = ring(event_idx=True)
    driver.post([(BUF, 100, True)])
    assert queue.pop() is not None
    queue.arm_kicks()
    assert driver.avail_event() == 1
    _, driver, plain = ring(event_idx=False)
    driver.post([(BUF, 100, True)])
    assert plain.pop() is not None
    plain.arm_kicks()
    assert driver.avail_event() == 0


def test_empty_after_arming_sees_a_buffer_added_before_the_driver_saw_avail_event() -> None:
    _, driver, queue = ring(event_idx=True)
    assert queue.pop() is None
    assert queue.empty_after_arming() and driver.avail_event() == 0
    driver.post([(BUF, 100, True)])  # the driver posted before it read avail_event
    assert not queue.empty_after_arming()
    assert queue.pop() is not None and queue.empty_after_arming()


def test_too_few_rx_buffers_arm_kicks_past_the_ones_already_posted() -> None:
    """A mergeable frame waits for more buffers: only a new one is news, and it is kicked."""
    _, driver, queue = ring(event_idx=True)
    driver.post([(BUF, 40, True)])
    assert rx_deliver(queue, b"x" * 60, mergeable=True).result is RxResult.NO_BUFFERS
    assert queue.empty_after_arming()  # the one posted chain is not news: wait for a kick
    assert driver.avail_event() == 1  # so the driver kicks for the next buffer
    assert need_event(driver.avail_event(), 2, 1)
    driver.post([(BUF + 0x100, 40, True)])
    assert not queue.empty_after_arming()
    assert rx_deliver(queue, b"x" * 60, mergeable=True).result is RxResult.DELIVERED


def test_header_layout() -> None:
    assert NET_HDR_SIZE == 12
    assert build_net_header(3) == bytes(10) + b"\x03\x00"
    assert build_net_header(1, 10) == bytes(10)
