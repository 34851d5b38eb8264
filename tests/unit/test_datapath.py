"""The data path end to end in one process: a fake front-end, memfd guest memory, a fake TAP.

The front-end (``FakeFrontend`` over a socketpair) gives the back-end three memfd regions: A and
B adjacent in guest physical address (a chain may run across their boundary), a hole, then C.
The test maps the same memfds itself and plays the guest driver on both rings with the
``Driver`` of test_virtqueue. The TAP is a SOCK_SEQPACKET socketpair (one datagram = one frame),
so these tests need no privileges. The last tests use a real TAP in a network namespace (root,
/dev/net/tun) and fail, never skip, without them.

Every test has a ``trio.fail_after`` deadline; the blocking front-end runs in a thread.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import mmap
import os
import select
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from vhostmem.control import answer
from vhostmem.datapath import NetDevice
from vhostmem.events import Handled
from vhostmem.protocol import (
    Header,
    Request,
    VirtioFeature,
    VringFile,
    VringState,
    decode_reply_payload,
)
from vhostmem.server import Backend, ServerConfig
from vhostmem.session import SessionConfig
from vhostmem.testing import schema
from vhostmem.testing.frontend import FakeFrontend, make_memfd
from vhostmem.virtqueue import NET_HDR, NET_HDR_SIZE, RingLayout, build_net_header

from ..netns import fresh_tap_and_netns, ip, netns_exists, own_name
from .helpers.leaks import open_fds, shared_maps
from .helpers.waiting import in_thread, wait_until
from .helpers.wire import start_pair
from .test_virtqueue import Driver

MiB = 1 << 20
ONE = (1).to_bytes(8, "little")
#: (gpa, size, uaddr): A and B adjacent in GPA (not in front-end address), hole, C.
REGIONS = {
    "A": (0x0, MiB, 0x7F0000000000),
    "B": (0x100000, MiB, 0x7F0010000000),
    "C": (0x400000, MiB, 0x7F0020000000),
}
HOLE = 0x200000
RX_LAYOUT = RingLayout(64, 0x10000, 0x11000, 0x12000)
TX_LAYOUT = RingLayout(64, 0x20000, 0x21000, 0x22000)
NET_FEATURES = (
    VirtioFeature.VERSION_1
    | VirtioFeature.PROTOCOL_FEATURES
    | VirtioFeature.NET_F_MRG_RXBUF
    | VirtioFeature.RING_F_EVENT_IDX
)


class GuestRam:
    """The guest's view of the memfds (what QEMU and the guest see), by GPA."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.maps: list[tuple[int, mmap.mmap]] = []
        for name, (gpa, size, _) in REGIONS.items():
            fd = make_memfd(size, name=f"guest-{name}")
            self.fds[name] = fd
            self.maps.append((gpa, mmap.mmap(fd, size)))

    def _find(self, at: int) -> tuple[int, mmap.mmap]:
        for gpa, mm in self.maps:
            if gpa <= at < gpa + len(mm):
                return gpa, mm
        raise AssertionError(f"the test itself touched gpa 0x{at:x}, which is in a hole")

    def read(self, gpa: int, length: int) -> bytes:
        out = bytearray()
        at = gpa
        while at < gpa + length:
            base, mm = self._find(at)
            n = min(gpa + length, base + len(mm)) - at
            out += mm[at - base : at - base + n]
            at += n
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        at = gpa
        while at < gpa + len(data):
            base, mm = self._find(at)
            n = min(gpa + len(data), base + len(mm)) - at
            mm[at - base : at - base + n] = data[at - gpa : at - gpa + n]
            at += n

    def close(self) -> None:
        for _, mm in self.maps:
            mm.close()
        for fd in self.fds.values():
            os.close(fd)


class FakeTap:
    """One end of a SOCK_SEQPACKET pair: reads and writes whole frames, like a TAP fd."""

    def __init__(self) -> None:
        self.ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.setblocking(False)
        self.peer.setblocking(False)

    @property
    def fd(self) -> int:
        return self.ours.fileno()

    @property
    def name(self) -> str:
        return "faketap"

    def as_json(self) -> dict[str, Any]:
        return {"tap": "faketap"}

    def close(self) -> None:
        self.ours.close()
        self.peer.close()

    def frames(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer.recv(70000))
            except BlockingIOError:
                return out


def gpa_to_uaddr(gpa: int) -> int:
    for base, size, uaddr in REGIONS.values():
        if base <= gpa < base + size:
            return uaddr + gpa - base
    raise AssertionError(hex(gpa))


class Rig:
    """Back-end + fake front-end + guest RAM + the two rings' drivers."""

    def __init__(self, backend: Backend, fe: FakeFrontend, tap: FakeTap, ram: GuestRam) -> None:
        self.backend = backend
        self.fe = fe
        self.tap = tap
        self.ram = ram
        self.rx = Driver(ram, RX_LAYOUT)
        self.tx = Driver(ram, TX_LAYOUT)
        self.kick: dict[int, int] = {}
        self.conn: Any = None  # this front-end's connection, when others share the back-end
        self.nursery: trio.Nursery | None = None
        self.others: list[Rig] = []

    @property
    def att(self) -> Any:
        if self.conn is not None:
            return self.conn.datapath
        [conn] = self.backend.connections()
        return conn.datapath

    async def join(self) -> Rig:
        """Another front-end on this back-end (same socket name), with its own guest RAM and
        regions; its rings are not started yet."""
        assert self.nursery is not None
        fe = await start_pair(self.backend, self.nursery)
        other = Rig(self.backend, fe, self.tap, GuestRam())
        self.others.append(other)
        await in_thread(lambda: fe.handshake(features=NET_FEATURES))
        other.conn = self.backend.connections()[-1]
        for name, (gpa, size, uaddr) in REGIONS.items():
            assert await in_thread(fe.add_region, gpa, size, uaddr, 0, other.ram.fds[name]) == 0
        return other

    def call_fd(self, index: int) -> int:
        return self.fe.eventfds[2 * index]

    def err_fd(self, index: int) -> int:
        return self.fe.eventfds[2 * index + 1]

    async def start_rings(self) -> None:
        for index, layout in ((0, RX_LAYOUT), (1, TX_LAYOUT)):
            await in_thread(
                self.fe.start_ring,
                index,
                gpa_to_uaddr(layout.desc),
                gpa_to_uaddr(layout.avail),
                gpa_to_uaddr(layout.used),
                layout.num,
            )
            self.kick[index] = self.fe.eventfds[-1]
        for index in (0, 1):
            await in_thread(self.fe.ack, Request.SET_VRING_ENABLE, VringState(index, 1))

    def kick_ring(self, index: int) -> None:
        os.write(self.kick[index], ONE)

    def send_tx(self, frame: bytes, buffers: list[tuple[int, int]]) -> int:
        """Write header + frame over ``(gpa, length)`` buffers, post the chain, kick."""
        data = build_net_header(0) + frame
        assert sum(n for _, n in buffers) == len(data)
        at = 0
        for gpa, n in buffers:
            self.ram.write(gpa, data[at : at + n])
            at += n
        head = self.tx.post([(gpa, n, False) for gpa, n in buffers])
        self.kick_ring(1)
        return head

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.backend.booking.events if e.get("event") == kind]

    def stats(self) -> dict[str, Any]:
        reply = answer(self.backend, json.dumps({"cmd": "stats"}).encode())
        assert reply["ok"], reply
        result: dict[str, Any] = reply["result"]
        return result

    async def vring_base(self, index: int) -> int:
        reply = await in_thread(self.fe.call, Request.GET_VRING_BASE, VringState(index, 0))
        state = decode_reply_payload(Request.GET_VRING_BASE, reply.raw)
        assert isinstance(state, VringState)
        return state.num


def readable(fd: int) -> bool:
    try:
        os.read(fd, 8)
    except BlockingIOError:
        return False
    return True


@contextlib.asynccontextmanager
async def rig(
    features: int = NET_FEATURES,
    *,
    tap: Any = None,
    idle_before: bool = False,
    owner: bool = True,
    tx_at: int = 0,
    strict: bool = False,
    stats_interval: float = 1.0,
) -> AsyncIterator[Rig]:
    """The back-end with one front-end whose rings run; ``idle_before``: another front-end
    connected first and only shook hands (a probe, an idle leftover); without ``owner`` the
    front-end never sends SET_OWNER; ``tx_at``: the TX ring's avail and used indexes are there
    already (the driver ran with another back-end), while SET_VRING_BASE still says 0;
    ``strict``: --strict-protocol; ``stats_interval``: the data path's (``datapath-stats``
    lines)."""
    fds_before = open_fds()
    maps_before = shared_maps()
    backend = Backend(ServerConfig(session=SessionConfig(net=True, strict=strict)))
    fake = tap if tap is not None else FakeTap()
    ram = GuestRam()
    idle: list[FakeFrontend] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            backend.net = NetDevice(
                fake,
                backend.booking.book,
                nursery,
                poll_interval=0.05,
                stats_interval=stats_interval,
            )
            if idle_before:
                idle.append(await start_pair(backend, nursery))
                await in_thread(lambda: idle[0].handshake(features=features))
            fe = await start_pair(backend, nursery)
            await in_thread(lambda: fe.handshake(features=features, owner=owner))
            for name, (gpa, size, uaddr) in REGIONS.items():
                assert await in_thread(fe.add_region, gpa, size, uaddr, 0, ram.fds[name]) == 0
            r = Rig(backend, fe, fake, ram)
            r.conn = backend.connections()[-1]
            r.nursery = nursery
            if tx_at:
                ram.write(TX_LAYOUT.avail + 2, tx_at.to_bytes(2, "little"))
                ram.write(TX_LAYOUT.used + 2, tx_at.to_bytes(2, "little"))
                r.tx.avail_idx = r.tx.last_used = tx_at
            await r.start_rings()
            try:
                yield r
            finally:
                for front_end in [fe, *idle, *(other.fe for other in r.others)]:
                    front_end.close()
                await wait_until(lambda: not backend.connections(), "the connections to end")
                nursery.cancel_scope.cancel()
    backend.cleanup()
    ram.close()
    for other in r.others:
        other.ram.close()
    if tap is None:
        assert open_fds() == fds_before
        assert shared_maps() == maps_before


# -- traffic ---------------------------------------------------------------------------------


async def test_tx_frame_crosses_regions_to_the_tap() -> None:
    async with rig() as r:
        frame = bytes((i * 13) & 0xFF for i in range(1000))
        # header in C, the frame in one descriptor running from A into B
        head = r.send_tx(frame, [(0x400100, NET_HDR_SIZE), (0x100000 - 300, 1000)])
        got = await wait_until(r.tap.frames, "a frame on the TAP")
        assert got == [frame]
        assert await wait_until(r.tx.used, "the used ring") == [(head, 0)]
        assert readable(r.call_fd(1))
        stats = r.stats()
        [dp] = stats["datapath"]
        assert dp["tx_packets"] == 1 and dp["tx_bytes"] == 1000
        per_region = {reg["gpa"]: reg for reg in dp["regions"]}
        assert set(per_region) == {0x0, 0x100000, 0x400000}  # A (ring + frame), B, C
        assert per_region[0x100000]["bytes"] == 700
        assert per_region[0x400000]["bytes"] == NET_HDR_SIZE
        assert stats["tap"]["tap"] == "faketap"


async def test_rings_run_for_a_front_end_that_never_sent_set_owner() -> None:
    # DPDK's virtio-user reconnecting in server mode sends no SET_OWNER; the session serves
    # its requests (a protocol-deviation each) and the rings they set up carry traffic.
    async with rig(owner=False) as r:
        assert r.conn.session.state.value == "await-owner"
        frame = bytes(range(200))
        head = r.send_tx(frame, [(0x400100, NET_HDR_SIZE), (0x1000, len(frame))])
        assert await wait_until(r.tap.frames, "a frame on the TAP") == [frame]
        assert await wait_until(r.tx.used, "the used ring") == [(head, 0)]
        served = {e["name"] for e in r.events("protocol-deviation")}
        assert {"SET_VRING_KICK", "SET_VRING_ENABLE", "ADD_MEM_REG"} <= served, served


async def test_a_ring_based_behind_its_used_index_resumes_there() -> None:
    # DPDK's virtio-user reconnecting in server mode: SET_VRING_BASE 0 for a ring whose avail
    # and used indexes are far past it. The ring resumes at the used index, as DPDK's and
    # QEMU's reference back-ends do, and says so.
    async with rig(tx_at=1000) as r:
        frame = bytes(range(100))
        head = r.send_tx(frame, [(0x400100, NET_HDR_SIZE), (0x1000, len(frame))])
        assert await wait_until(r.tap.frames, "a frame on the TAP") == [frame]
        assert await wait_until(r.tx.used, "the used ring") == [(head, 0)]
        [dev] = r.events("protocol-deviation")
        assert (dev["name"], dev["deviation"], dev["vring"], dev["state"]) == (
            "SET_VRING_BASE",
            "vring-base-mismatch",
            1,
            "owned",
        )
        assert dev["details"] == {"base": 0, "used_idx": 1000}
        assert "translate_ring_addresses" in dev["rule"]
        assert await r.vring_base(1) == 1001  # where the ring stopped
        assert not r.events("ring-error")


async def test_strict_a_ring_based_behind_its_used_index_is_a_ring_error() -> None:
    async with rig(tx_at=1000, strict=True) as r:
        [err] = await wait_until(lambda: r.events("ring-error"), "the ring error")
        assert err["vring"] == 1 and "1000 ahead of last_avail_idx 0" in err["error"], err
        assert not r.events("protocol-deviation")


async def test_rx_mergeable_frame_spans_two_buffers() -> None:
    async with rig() as r:
        heads = [r.rx.post([(0x40000 + 0x1000 * i, 1024, True)]) for i in range(4)]
        r.kick_ring(0)
        frame = bytes(range(256)) * 6  # 1536 bytes: header + frame need two 1 KiB buffers
        r.tap.peer.send(frame)
        used = await wait_until(r.rx.used, "the RX used ring")
        assert used == [(heads[0], 1024), (heads[1], NET_HDR_SIZE + len(frame) - 1024)]
        data = r.ram.read(0x40000, 1024) + r.ram.read(0x41000, used[1][1])
        assert NET_HDR.unpack(data[:NET_HDR_SIZE])[-1] == 2
        assert data[NET_HDR_SIZE:] == frame
        assert readable(r.call_fd(0))
        assert r.att.counters["rx_packets"] == 1


async def test_rx_without_mrg_rxbuf_one_chain_per_frame() -> None:
    features = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
    async with rig(features) as r:
        heads = [r.rx.post([(0x40000 + 0x1000 * i, NET_HDR_SIZE + 1514, True)]) for i in range(3)]
        r.kick_ring(0)
        for n in (60, 1514, 100):
            r.tap.peer.send(b"\x42" * n)
        used = await wait_until(lambda: (u := r.rx.used()) and u, "three frames")
        while len(used) < 3:
            used += await wait_until(r.rx.used, "more frames")
        assert used == [(h, NET_HDR_SIZE + n) for h, n in zip(heads, (60, 1514, 100), strict=True)]
        assert NET_HDR.unpack(r.ram.read(0x41000, NET_HDR_SIZE))[-1] == 1
        assert r.stats()["datapath"][0]["mrg_rxbuf"] is False


async def test_rx_waits_for_buffers_then_delivers() -> None:
    async with rig() as r:
        r.tap.peer.send(b"\x01" * 200)
        # Wake the RX ring with no buffers posted and let it act: once every task is blocked
        # again it has looked, and the frame must still wait in the TAP, not be dropped.
        r.kick_ring(0)
        await trio.testing.wait_all_tasks_blocked()
        assert r.rx.used() == []
        assert select.select([r.tap.ours], [], [], 0)[0] == [r.tap.ours], "frame left the TAP"
        assert r.att.counters["rx_dropped"] == 0
        # A later frame comes behind it: the one that waited is delivered first.
        r.tap.peer.send(b"\x02" * 100)
        heads = [r.rx.post([(0x40000 + 0x1000 * i, 2048, True)]) for i in range(2)]
        r.kick_ring(0)
        used = await wait_until(lambda: (u := r.rx.used()) and u, "the frames")
        while len(used) < 2:
            used += await wait_until(r.rx.used, "the second frame")
        assert used == [(heads[0], NET_HDR_SIZE + 200), (heads[1], NET_HDR_SIZE + 100)]
        assert r.ram.read(0x40000 + NET_HDR_SIZE, 200) == b"\x01" * 200


async def test_many_frames_both_ways() -> None:
    async with rig() as r:
        for i in range(60):
            r.rx.post([(0x40000 + 0x1000 * i, 2048, True)])
        r.kick_ring(0)
        for i in range(50):
            r.tap.peer.send(bytes([i]) * (60 + i))
        got: list[tuple[int, int]] = []
        while len(got) < 50:
            got += await wait_until(r.rx.used, "RX frames")
        assert [n for _, n in got] == [NET_HDR_SIZE + 60 + i for i in range(50)]
        sent = []
        for i in range(40):
            frame = bytes([i]) * 100
            sent.append(frame)
            r.send_tx(frame, [(0x80000 + 0x200 * i, NET_HDR_SIZE + 100)])
        frames: list[bytes] = []
        while len(frames) < 40:
            frames += await wait_until(r.tap.frames, "TX frames")
        assert frames == sent
        assert await r.vring_base(1) == 40


async def test_datapath_stats_are_running_totals_at_most_once_per_interval() -> None:
    """Traffic for longer than the interval: lines at least an interval apart, each with the
    totals so far and the seconds they took; the connection's end books the last totals."""
    interval = 0.2
    async with rig(stats_interval=interval) as r:
        assert r.events("datapath-stats") == []  # nothing moved: no line
        sent = 0
        start = trio.current_time()
        while trio.current_time() - start < 4 * interval:
            r.send_tx(b"x" * 60, [(0x80000 + 0x200 * (sent % 32), NET_HDR_SIZE + 60)])
            sent += 1
            await wait_until(r.tap.frames, "the TX frame")
            await wait_until(r.tx.used, "the TX chain back")
        backend = r.backend
        periodic = len(r.events("datapath-stats"))
    lines = [e for e in backend.booking.events if e.get("event") == "datapath-stats"]
    assert periodic >= 2 and len(lines) == periodic + 1  # the end adds one
    assert {(e["tap"], e["conn"]) for e in lines} == {("faketap", 1)}
    totals = [e["tx_packets"] for e in lines]
    assert totals == sorted(set(totals)) and totals[-1] == sent
    assert all(e["rx_packets"] == 0 and e["tx_bytes"] == 60 * e["tx_packets"] for e in lines)
    assert all(e["interval"] >= interval for e in lines[:-1])
    assert all(b["ts"] - a["ts"] >= interval * 0.9 for a, b in itertools.pairwise(lines[:-1]))
    for line in lines:
        assert schema.problems(line, "event-log") == []


# -- errors ----------------------------------------------------------------------------------


async def test_descriptor_in_a_hole_stops_the_ring_and_names_the_gpa() -> None:
    async with rig() as r:
        r.send_tx(b"ok" * 30, [(0x80000, NET_HDR_SIZE + 60)])
        await wait_until(r.tap.frames, "the first frame")
        r.tx.post([(HOLE + 0x1230, 100, False)])
        r.kick_ring(1)
        [event] = await wait_until(lambda: r.events("ring-error"), "a ring-error event")
        assert event["vring"] == 1 and event["queue"] == "tx"
        assert event["gpa"] == HOLE + 0x1230 and event["error_kind"] == "hole"
        text = event["error"]
        assert f"0x{HOLE + 0x1230:x}" in text
        assert "below: 0x100000-0x1fffff" in text and "above: 0x400000-0x4fffff" in text
        assert readable(r.err_fd(1))
        # stopped cleanly: the bad chain is where the ring stopped, the process serves on
        assert await r.vring_base(1) == 1
        assert (await in_thread(r.fe.call, Request.GET_FEATURES)).u64 & VirtioFeature.VERSION_1
        # The ring task has ended; a kick finds no one to send the late chain, which is
        # determined once every task is blocked again.
        assert 1 not in r.att.rings or r.att.rings[1].finished
        r.send_tx(b"late" * 20, [(0x80400, NET_HDR_SIZE + 80)])
        await trio.testing.wait_all_tasks_blocked()
        assert r.tap.frames() == []
        assert await r.vring_base(1) == 1
        # the other ring still moves traffic
        head = r.rx.post([(0x40000, 2048, True)])
        r.kick_ring(0)
        r.tap.peer.send(b"\x07" * 64)
        assert await wait_until(r.rx.used, "RX after the TX error") == [(head, NET_HDR_SIZE + 64)]
        assert r.stats()["datapath"][0]["rings"][1]["error"] == text


async def test_buffer_crossing_into_a_hole() -> None:
    async with rig() as r:
        r.rx.post([(0x200000 - 16, 2048, True)])  # last 16 bytes of B, then the hole
        r.kick_ring(0)
        r.tap.peer.send(b"\x09" * 100)
        [event] = await wait_until(lambda: r.events("ring-error"), "a ring-error event")
        assert event["vring"] == 0 and event["error_kind"] == "crosses-hole"
        assert event["gpa"] == HOLE
        assert "crosses into a hole" in event["error"]
        assert await r.vring_base(0) == 0


async def test_ring_outside_the_table_is_a_layout_error() -> None:
    async with rig() as r:
        _, size, uaddr_c = REGIONS["C"]
        desc = uaddr_c + size - 0x100  # 64 descriptors need 0x400 bytes: past the end of C
        # stop the running ring first, as QEMU does (GET_VRING_BASE): restarting it then
        # changes it once (SET_VRING_KICK), so there is exactly one ring-error
        await r.vring_base(1)
        await in_thread(
            r.fe.start_ring,
            1,
            desc,
            gpa_to_uaddr(TX_LAYOUT.avail),
            gpa_to_uaddr(TX_LAYOUT.used),
            TX_LAYOUT.num,
        )
        [event] = await wait_until(lambda: r.events("ring-error"), "a ring-error event")
        assert event["vring"] == 1 and event["error_kind"] == "layout" and "gpa" not in event
        assert event["details"] == {"uaddr": desc, "length": 0x400}
        assert event["error"] == (
            f"vring 1 (tx): descriptor table at front-end address 0x{desc:x} (+0x400) is not "
            "inside one region of the memory table"
        )


async def test_rem_mem_reg_while_rings_run() -> None:
    async with rig() as r:
        gpa_c = REGIONS["C"][0]
        r.send_tx(b"c" * 100, [(gpa_c + 0x1000, NET_HDR_SIZE + 100)])
        assert await wait_until(r.tap.frames, "a frame from C") == [b"c" * 100]
        before = r.stats()["datapath"][0]
        assert any(reg["gpa"] == gpa_c for reg in before["regions"])
        # REM succeeds although the ring just used C: no view of it is held while waiting
        _, size, uaddr = REGIONS["C"]
        assert await in_thread(r.fe.rem_region, gpa_c, size, uaddr) == 0
        after = r.stats()["datapath"][0]
        assert not any(reg["gpa"] == gpa_c for reg in after["regions"])
        assert after["removed_regions"]["translations"] >= 1
        # a descriptor into C now is an error, not a touch of unmapped memory
        r.send_tx(b"d" * 100, [(gpa_c + 0x2000, NET_HDR_SIZE + 100)])
        [event] = await wait_until(lambda: r.events("ring-error"), "a ring-error event")
        assert event["gpa"] == gpa_c + 0x2000
        assert "below: 0x100000-0x1fffff" in event["error"]
        assert r.tap.frames() == []


async def test_get_vring_base_stops_the_ring_where_it_stopped() -> None:
    async with rig() as r:
        for i in range(3):
            r.send_tx(bytes([i]) * 50, [(0x80000 + 0x100 * i, NET_HDR_SIZE + 50)])
        frames: list[bytes] = []
        while len(frames) < 3:
            frames += await wait_until(r.tap.frames, "three frames")
        assert await r.vring_base(1) == 3
        assert r.backend.connections()[0].session.vrings[1].started is False
        r.send_tx(b"x" * 50, [(0x80400, NET_HDR_SIZE + 50)])
        await trio.testing.wait_all_tasks_blocked()  # a running ring would have sent it by now
        assert r.tap.frames() == []
        assert len(r.tx.used()) == 3  # the fourth chain was not used
        assert await r.vring_base(1) == 3
        # Restarted where it stopped, as QEMU does (SET_VRING_BASE 3, a new kick fd), the ring
        # sends the chain that waited, and only that one.
        await in_thread(r.fe.ack, Request.SET_VRING_BASE, VringState(1, 3))
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        r.fe.eventfds.append(kick)  # closed with the front-end
        await in_thread(lambda: r.fe.call(Request.SET_VRING_KICK, VringFile(1, False), fds=[kick]))
        r.kick[1] = kick
        r.kick_ring(1)
        assert await wait_until(r.tap.frames, "the waiting frame") == [b"x" * 50]
        assert await wait_until(r.tx.used, "the fourth chain") == [(3, 0)]


async def test_disable_stops_and_enable_resumes() -> None:
    async with rig() as r:
        await in_thread(r.fe.ack, Request.SET_VRING_ENABLE, VringState(1, 0))
        r.send_tx(b"a" * 40, [(0x80000, NET_HDR_SIZE + 40)])
        await trio.testing.wait_all_tasks_blocked()  # an enabled ring would have sent it by now
        assert r.tap.frames() == []
        assert r.tx.used() == []
        await in_thread(r.fe.ack, Request.SET_VRING_ENABLE, VringState(1, 1))
        r.kick_ring(1)
        assert await wait_until(r.tap.frames, "the frame after enable") == [b"a" * 40]


async def test_rx_ring_restarted_while_waiting_on_the_tap() -> None:
    """The new RX ring waits on the TAP fd at once, while the one it replaced is unwinding."""
    async with rig() as r:
        for i in range(4):
            r.rx.post([(0x40000 + 0x1000 * i, 2048, True)])
        r.kick_ring(0)
        att = r.att
        att.device.poll_interval = 10.0  # from the next wait on: no poll wakeups in this test
        await trio.sleep(0.1)
        await trio.testing.wait_all_tasks_blocked()  # the RX ring waits on the TAP
        wakeups = att.counters["poll_wakeups"]
        old = att.rings[0]
        vring = att.session.vrings[0]
        state = VringState(0, 0)
        handled = Handled(
            Request.SET_VRING_ENABLE, Header(Request.SET_VRING_ENABLE, 1, 8), state, b"", True
        )
        # disable and enable handled back to back, no await between (as the linger allows)
        vring.enabled = False
        att.sync(handled)
        vring.enabled = True
        att.sync(handled)
        new = att.rings[0]
        assert new is not old and not old.finished
        await trio.testing.wait_all_tasks_blocked()
        assert old.finished and not new.finished
        r.tap.peer.send(b"\x05" * 80)
        assert len(await wait_until(r.rx.used, "a frame through the new ring")) == 1
        assert r.events("ring-error") == [] and att.counters["poll_wakeups"] == wakeups


async def test_rx_frame_waits_for_enough_mergeable_buffers() -> None:
    """Too few buffers posted for a frame: the ring waits for a kick (it used to spin)."""
    async with rig() as r:
        r.att.device.poll_interval = 10.0
        await trio.sleep(0.1)  # the rings' current waits end; the next ones wait 10 s
        await trio.testing.wait_all_tasks_blocked()  # the rings wait (on the TAP, the kicks)
        wakeups = r.att.counters["poll_wakeups"]
        first = r.rx.post([(0x40000, 1024, True)])
        r.kick_ring(0)
        frame = bytes(range(250)) * 6  # 1500 bytes: header + frame need two 1 KiB buffers
        r.tap.peer.send(frame)
        await trio.testing.wait_all_tasks_blocked()  # the RX ring has seen the frame and waits
        assert r.rx.used() == [] and r.rx.avail_event() == 1  # kick me for the next buffer
        second = r.rx.post([(0x41000, 1024, True)])
        r.kick_ring(0)
        used = await wait_until(r.rx.used, "the frame in two buffers")
        assert used == [(first, 1024), (second, NET_HDR_SIZE + len(frame) - 1024)]
        assert r.att.counters["poll_wakeups"] == wakeups  # woken by the kick, not the poll


# -- without --tap -----------------------------------------------------------------------------


# -- several front-ends, one TAP ---------------------------------------------------------------


async def test_the_tap_goes_to_the_first_to_start_rings_then_to_the_one_refused() -> None:
    # Connection 1 only shook hands (a probe, an idle leftover); connection 2 started its rings
    # and gets the TAP. Connection 3's rings are refused; when 2 leaves, 3 gets the TAP.
    frame = b"\x02" * 6 + b"\x04" * 6 + b"\x88\xb5" + b"first" * 10
    async with rig(idle_before=True) as r:
        r.send_tx(frame, [(0x80000, NET_HDR_SIZE + len(frame))])
        assert await wait_until(r.tap.frames, "the frame on the TAP") == [frame]
        assert r.backend.net is not None
        assert r.att.active and r.backend.net.owner is r.att
        third = await r.join()
        await third.start_rings()
        [refused] = await wait_until(lambda: r.events("datapath-refused"), "the refusal")
        assert (refused["conn"], refused["holder"]["conn"]) == (third.conn.number, r.conn.number)
        assert third.att.rings == {} and not third.att.active
        r.fe.close()
        [handover] = await wait_until(lambda: r.events("datapath-handover"), "the handover")
        assert handover["conn"] == third.conn.number
        assert handover["previous"]["conn"] == r.conn.number
        again = b"\x02" * 6 + b"\x04" * 6 + b"\x88\xb5" + b"third" * 10
        head = third.send_tx(again, [(0x80000, NET_HDR_SIZE + len(again))])
        assert await wait_until(r.tap.frames, "the third's frame on the TAP") == [again]
        assert await wait_until(third.tx.used, "the third's used ring") == [(head, 0)]
        assert len(r.events("datapath-refused")) == 1


def test_net_features_are_offered_only_with_a_tap() -> None:
    plain = SessionConfig().features
    assert not plain & VirtioFeature.NET_F_MRG_RXBUF and not plain & VirtioFeature.RING_F_EVENT_IDX
    net = SessionConfig(net=True).features
    assert net & VirtioFeature.NET_F_MRG_RXBUF and net & VirtioFeature.RING_F_EVENT_IDX
    assert net & plain == plain


async def test_without_tap_rings_are_accepted_and_nothing_moves() -> None:
    backend = Backend(ServerConfig())
    ram = GuestRam()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            fe = await start_pair(backend, nursery)
            await in_thread(fe.handshake)
            for name, (gpa, size, uaddr) in REGIONS.items():
                assert await in_thread(fe.add_region, gpa, size, uaddr, 0, ram.fds[name]) == 0
            r = Rig(backend, fe, FakeTap(), ram)
            await r.start_rings()
            r.send_tx(b"q" * 60, [(0x80000, NET_HDR_SIZE + 60)])
            await trio.testing.wait_all_tasks_blocked()  # a ring task would have used it by now
            assert r.tx.used() == []
            assert await r.vring_base(1) == 0  # the back-end's own word: nothing consumed
            stats = r.stats()
            assert "datapath" not in stats and "tap" not in stats
            assert backend.connections()[0].datapath is None
            fe.close()
            r.tap.close()
            await wait_until(lambda: not backend.connections(), "the connection to end")
    backend.cleanup()
    ram.close()


# -- a real TAP in a network namespace (root) --------------------------------------------------

NS = TAPNAME = own_name("vhmut")


@pytest.fixture
def clean_netns() -> Iterator[None]:
    """Our namespace and link names, refused if left from elsewhere and removed afterwards."""
    with fresh_tap_and_netns(NS, TAPNAME):
        yield


def test_open_tap_in_a_new_netns_and_close_removes_everything(clean_netns: None) -> None:
    from vhostmem.tap import TapConfig, TapError, open_tap

    assert not netns_exists(NS)
    tap = open_tap(TapConfig(TAPNAME, NS, "192.0.2.1/24"))
    try:
        assert tap.created_netns and tap.created_link and tap.added_address == "192.0.2.1/24"
        out = ip("-n", NS, "addr", "show", "dev", TAPNAME)
        assert "192.0.2.1/24" in out and ",UP" in out
        assert TAPNAME not in ip("link", "show")  # only in the namespace
        assert "default" not in ip("-n", NS, "route", "show")  # no way out of the namespace
        with pytest.raises(TapError, match="another process has it open"):
            open_tap(TapConfig(TAPNAME, NS))
    finally:
        tap.close()
    assert not netns_exists(NS)
    with pytest.raises(TapError, match="not valid"):
        TapConfig("x" * 16).check()


def test_attach_to_an_existing_tap_leaves_it(clean_netns: None) -> None:
    from vhostmem.tap import TapConfig, open_tap

    ip("netns", "add", NS)
    ip("-n", NS, "tuntap", "add", "mode", "tap", "name", TAPNAME)
    tap = open_tap(TapConfig(TAPNAME, NS, "192.0.2.1/24"))
    assert not tap.created_link and not tap.created_netns
    tap.close()
    out = ip("-n", NS, "addr", "show", "dev", TAPNAME)  # still there, without our address
    assert "192.0.2.1" not in out and ",UP" not in out
    assert netns_exists(NS)


async def test_real_tap_arp_from_the_namespace_reaches_the_rx_ring(clean_netns: None) -> None:
    from vhostmem.tap import TapConfig, open_tap

    tap = open_tap(TapConfig(TAPNAME, NS, "192.0.2.1/24"))
    async with rig(tap=tap) as r:
        for i in range(16):
            r.rx.post([(0x40000 + 0x1000 * i, 2048, True)])
        r.kick_ring(0)
        # the namespace asks who has 192.0.2.2 (our fake guest never answers)
        await trio.run_process(
            ["ip", "netns", "exec", NS, "busybox", "ping", "-c", "1", "-W", "1", "192.0.2.2"],
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
        frames = []
        for head, n in r.rx.used():
            data = r.ram.read(0x40000 + 0x1000 * head, n)[NET_HDR_SIZE:]
            frames.append(data)
        arp = [f for f in frames if f[12:14] == b"\x08\x06"]
        assert arp, [f[:20].hex() for f in frames]
        assert arp[0][38:42] == bytes([192, 0, 2, 2])  # target protocol address
        # and a frame from the guest reaches the TAP (its RX counter counts it)
        before = tap_rx_packets()
        frame = b"\xff" * 6 + bytes.fromhex("525400123456") + b"\x88\xb5" + b"vhostmem" * 8
        r.send_tx(frame, [(0x80000, NET_HDR_SIZE + len(frame))])
        await wait_until(r.tx.used, "the TX chain back")
        await wait_until(lambda: tap_rx_packets() == before + 1, "the TAP to count the frame")
    assert not netns_exists(NS)


def tap_rx_packets() -> int:
    [link] = json.loads(ip("-n", NS, "-s", "-j", "link", "show", TAPNAME))
    packets: int = link["stats64"]["rx"]["packets"]
    return packets


async def test_real_tap_refuses_a_second_connections_rings_and_names_both_peers(
    clean_netns: None, caplog: pytest.LogCaptureFixture
) -> None:
    # Two front-ends on one socket, one TAP: the first started its rings first and keeps the
    # traffic; the second's rings are not started, and one event and one log line say so,
    # naming both peers (pid, uid) and the reason.
    from vhostmem.tap import TapConfig, open_tap

    caplog.set_level(logging.WARNING, logger="vhostmem")
    me = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
    tap = open_tap(TapConfig(TAPNAME, NS, "192.0.2.1/24"))
    async with rig(tap=tap) as r:
        second = await r.join()
        await second.start_rings()
        [refused] = await wait_until(lambda: r.events("datapath-refused"), "the refusal")
        assert refused["socket"] == "pair" and refused["conn"] == second.conn.number
        assert refused["peer"] == me and refused["tap"] == TAPNAME
        assert refused["holder"] == {"socket": "pair", "conn": r.conn.number, "peer": me}
        assert "started its rings first" in refused["reason"]
        lines = [rec.getMessage() for rec in caplog.records if "refused" in rec.getMessage()]
        assert len(lines) == 1, lines
        who = f"pid {me['pid']}, uid {me['uid']}"
        assert f"conn {second.conn.number} " in lines[0] and f"conn {r.conn.number} " in lines[0]
        assert lines[0].count(who) == 2, lines[0]
        dp = {d["conn"]: d for d in r.stats()["datapath"]}
        assert dp[second.conn.number]["active"] is False
        assert dp[second.conn.number]["refused"] is True
        assert [ring["running"] for ring in dp[second.conn.number]["rings"]] == [False, False]
        assert [ring["running"] for ring in dp[r.conn.number]["rings"]] == [True, True]
        # the first keeps moving packets both ways
        for i in range(16):
            r.rx.post([(0x40000 + 0x1000 * i, 2048, True)])
        r.kick_ring(0)
        await trio.run_process(
            ["ip", "netns", "exec", NS, "busybox", "ping", "-c", "1", "-W", "1", "192.0.2.2"],
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
        frames = [r.ram.read(0x40000 + 0x1000 * h, n)[NET_HDR_SIZE:] for h, n in r.rx.used()]
        assert [f for f in frames if f[12:14] == b"\x08\x06"], [f[:20].hex() for f in frames]
        before = tap_rx_packets()
        frame = b"\xff" * 6 + bytes.fromhex("525400123456") + b"\x88\xb5" + b"vhostmem" * 8
        r.send_tx(frame, [(0x80000, NET_HDR_SIZE + len(frame))])
        await wait_until(r.tx.used, "the TX chain back")
        await wait_until(lambda: tap_rx_packets() >= before + 1, "the TAP to count the frame")
        assert len(r.events("datapath-refused")) == 1
    assert not netns_exists(NS)
