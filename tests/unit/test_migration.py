"""Live migration: dirty logging (vhost-user.rst "Migration", "Dirty pages logging") and the
RARP announcement after it (SEND_RARP).

A fake front-end maps a dirty log (SET_LOG_BASE, LOG_SHMFD), acks VHOST_F_LOG_ALL and sets
VHOST_VRING_F_LOG on both rings, as QEMU's ``vhost_dev_set_log`` does when a migration starts;
then frames go both ways and the test reads the log bit by bit: one bit per 4 KiB page of guest
physical memory, page ``p`` is bit ``p % 8`` of byte ``p // 8``.

The RX ring's used ring is moved so that it ends in another page than it starts: its entries
and ``used.idx`` are in page 0x11, its ``avail_event`` in page 0x12, so each is seen on its own.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator

import pytest

from vhostmem.control import answer
from vhostmem.protocol import (
    ProtocolFeature,
    Request,
    VirtioFeature,
    VringAddress,
    VringState,
)
from vhostmem.report import render_regions, render_stats
from vhostmem.session import SessionConfig
from vhostmem.testing import schema
from vhostmem.testing.frontend import make_memfd
from vhostmem.virtqueue import NET_HDR_SIZE, RingLayout

from . import test_datapath
from .helpers.leaks import shared_maps
from .helpers.waiting import in_thread, wait_until
from .test_datapath import NET_FEATURES, Rig, gpa_to_uaddr, rig

#: The RX used ring straddles 0x12000: entries in page 0x11, avail_event (+4+8*64) in 0x12.
RX_LAYOUT = RingLayout(64, 0x10000, 0x11000, 0x11F00)
TX_LAYOUT = test_datapath.TX_LAYOUT
#: Bytes of log: one bit per 4 KiB page of the guest's 5 MiB (QEMU sizes it in u64 chunks).
LOG_SIZE = 0x1000
F_LOG = 1


@pytest.fixture(autouse=True)
def rx_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(test_datapath, "RX_LAYOUT", RX_LAYOUT)


class Log:
    """The front-end's side of a dirty log: a memfd it maps and reads."""

    def __init__(self, size: int = LOG_SIZE, offset: int = 0) -> None:
        self.fd = make_memfd(size + offset, name="dirty-log")
        self.offset = offset
        self.mm = mmap.mmap(self.fd, size + offset)

    def pages(self) -> set[int]:
        """Every page whose bit is set."""
        data = self.mm[self.offset :]
        return {
            8 * i + bit
            for i, byte in enumerate(data)
            if byte
            for bit in range(8)
            if byte >> bit & 1
        }

    def clear(self) -> None:
        self.mm[:] = bytes(len(self.mm))

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


@pytest.fixture
def log() -> Iterator[Log]:
    area = Log()
    yield area
    area.close()


async def set_log_base(r: Rig, area: Log) -> None:
    fd = os.dup(area.fd)
    try:
        assert await in_thread(r.fe.set_log_base, LOG_SIZE, area.offset, [fd]) == 0
    finally:
        os.close(fd)


async def set_ring_log(r: Rig, flags: int) -> None:
    """SET_VRING_ADDR again with VHOST_VRING_F_LOG and log_guest_addr = the used ring's GPA, as
    hw/virtio/vhost.c vhost_virtqueue_set_addr does when logging starts."""
    for index, layout in ((0, RX_LAYOUT), (1, TX_LAYOUT)):
        addr = VringAddress(
            index,
            flags,
            gpa_to_uaddr(layout.desc),
            gpa_to_uaddr(layout.used),
            gpa_to_uaddr(layout.avail),
            layout.used,
        )
        assert await in_thread(r.fe.ack, Request.SET_VRING_ADDR, addr) == 0


async def set_features(r: Rig, features: int) -> None:
    await in_thread(lambda: r.fe.call(Request.SET_FEATURES, features, need_reply=False))


async def traffic(r: Rig) -> None:
    """One frame each way; wait until both used rings show them."""
    rx_before, tx_before = len(r.rx.used()), len(r.tx.used())
    # RX: one 1 KiB buffer from 0x100 below page 0x40 into it; header + 400 bytes end at 0x4009c.
    r.rx.post([(0x3FF00, 1024, True)])
    r.kick_ring(0)
    r.tap.peer.send(b"\x5a" * 400)
    r.send_tx(b"\x33" * 100, [(0x400100, NET_HDR_SIZE), (0x50000, 100)])
    await wait_until(lambda: len(r.rx.used()) > rx_before, "the RX frame in the used ring")
    await wait_until(lambda: len(r.tx.used()) > tx_before, "the TX chain in the used ring")


def logged_rings(r: Rig, on: bool) -> bool:
    rings = [r.att.rings.get(i) for i in (0, 1)]
    return all(
        ring is not None and ring.queue is not None and (ring.queue.used_log is not None) == on
        for ring in rings
    )


async def test_logging_marks_exactly_the_pages_written(log: Log) -> None:
    async with rig() as r:
        await set_log_base(r, log)
        await set_features(r, NET_FEATURES | VirtioFeature.LOG_ALL)
        await set_ring_log(r, F_LOG)
        await wait_until(lambda: logged_rings(r, True), "both rings running with F_LOG")
        # Both rings, empty, publish avail_event when they restart: RX in page 0x12, TX in 0x22.
        await wait_until(lambda: {0x12, 0x22} <= log.pages(), "avail_event logged")
        await traffic(r)
        # RX buffer: pages 0x3f and 0x40; RX used entry and used.idx: 0x11; TX used: 0x22.
        assert log.pages() == {0x3F, 0x40, 0x11, 0x12, 0x22}
        [dp] = r.stats()["datapath"]
        assert dp["rx_packets"] == 1 and dp["tx_packets"] == 1
        assert r.conn.session.device.log.marked == 5
        check_documents(r, marked=5, logging=True)


def check_documents(r: Rig, *, marked: int, logging: bool) -> None:
    """``stats`` and ``regions`` carry the log, valid against their schemas, and say it in
    words."""
    for cmd in ("stats", "regions"):
        reply = answer(r.backend, json.dumps({"cmd": cmd}).encode())
        assert reply["ok"], reply
        doc = reply["result"]
        assert schema.problems(doc, cmd) == []
        [conn] = [c for s in doc["sockets"] for c in s["connections"] if c["conn"] == r.conn.number]
        assert conn["dirty_log"] == {
            "size": LOG_SIZE,
            "mmap_offset": 0,
            "pages": LOG_SIZE * 8,
            "backing": "memfd",
            "marked": marked,
            "beyond": 0,
            "logging": logging,
        }
        text = (render_stats if cmd == "stats" else render_regions)(doc)
        assert (
            f"dirty log: 4 KiB (memfd, mmap_offset 0x0) covering 128 MiB of guest memory; "
            f"{marked} page(s) marked; logging {'on' if logging else 'off'}"
        ) in text, text


async def test_nothing_is_marked_with_logging_off(log: Log) -> None:
    async with rig() as r:
        # a log mapped and F_LOG set, but LOG_ALL not acked: logging is off
        await set_log_base(r, log)
        await set_ring_log(r, F_LOG)
        await wait_until(lambda: logged_rings(r, True), "both rings running with F_LOG")
        await traffic(r)
        assert log.pages() == set()
        check_documents(r, marked=0, logging=False)
        # on, then off again (QEMU's vhost_dev_set_log(false) at the end of migration)
        await set_features(r, NET_FEATURES | VirtioFeature.LOG_ALL)
        await traffic(r)
        assert 0x40 in log.pages()
        await set_features(r, NET_FEATURES)
        await set_ring_log(r, 0)
        await wait_until(lambda: logged_rings(r, False), "both rings running without F_LOG")
        log.clear()
        await traffic(r)
        assert log.pages() == set()
        assert r.conn.session.device.log.beyond == 0
        # the event log tells where logging started and ended, with the log in force
        events = r.events("dirty-log")
        assert [(e["name"], e["logging"]) for e in events] == [
            ("SET_LOG_BASE", False),
            ("SET_FEATURES", True),
            ("SET_FEATURES", False),
        ]
        assert events[0]["log"] == {
            "size": LOG_SIZE,
            "mmap_offset": 0,
            "pages": LOG_SIZE * 8,
            "backing": "memfd",
            "marked": 0,
            "beyond": 0,
        }
        assert events[2]["log"]["marked"] >= 3  # the RX buffer's two pages and the used ring


async def test_a_new_log_replaces_the_old_one_and_nothing_stays_mapped(log: Log) -> None:
    second = Log(offset=0x1000)
    try:
        async with rig() as r:
            maps_before = shared_maps()
            await set_log_base(r, log)
            assert len(shared_maps()) == len(maps_before) + 1
            await set_log_base(r, second)
            # the first log is unmapped once the second is mapped: still one more mapping
            assert len(shared_maps()) == len(maps_before) + 1
            await set_features(r, NET_FEATURES | VirtioFeature.LOG_ALL)
            await set_ring_log(r, F_LOG)
            await wait_until(lambda: logged_rings(r, True), "both rings running with F_LOG")
            await traffic(r)
            assert log.pages() == set()
            assert {0x3F, 0x40} <= second.pages()
        # rig() checked that the connection's end left no fd and no shared mapping behind
    finally:
        second.close()


# A SET_LOG_BASE of size 0 or without its fd, SEND_RARP without a TAP, SET_LOG_FD and
# SET_LOG_BASE without LOG_SHMFD are the pure session's: test_session_table.py ("dirty-log",
# "log-base-without-log-shmfd"). Here: logs the mapping layer refuses.
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("past-eof", ["dirty log size=0x1000 (4 KiB) mmap_offset=0x100000", "past the end"]),
        ("pipe", ["dirty log size=0x1000 (4 KiB) mmap_offset=0x0", "a pipe cannot be mmapped"]),
    ],
)
async def test_hostile_set_log_base_fails_clearly_and_keeps_serving(
    case: str, expected: list[str]
) -> None:
    async with rig() as r:
        maps_before = shared_maps()
        fds: list[int] = []
        offset = 0
        if case == "past-eof":
            offset = 0x100000
            fds = [make_memfd(LOG_SIZE)]
        elif case == "pipe":
            read_end, write_end = os.pipe()
            os.close(write_end)
            fds = [read_end]
        try:
            assert await in_thread(r.fe.set_log_base, LOG_SIZE, offset, fds) != 0
        finally:
            for fd in fds:
                os.close(fd)
        [failed] = [e for e in r.events("request-failed") if e["name"] == "SET_LOG_BASE"]
        for words in expected:
            assert words in failed["error"], failed["error"]
        assert r.conn.session.device.log is None
        assert shared_maps() == maps_before
        # the connection still serves
        assert await in_thread(r.fe.ack, Request.SET_VRING_ENABLE, VringState(0, 1)) == 0


def test_log_all_and_log_shmfd_are_offered() -> None:
    config = SessionConfig()
    assert config.features & VirtioFeature.LOG_ALL
    assert config.protocol_features & ProtocolFeature.LOG_SHMFD
    off = SessionConfig(dirty_log=False)
    assert not off.features & VirtioFeature.LOG_ALL
    assert not off.protocol_features & ProtocolFeature.LOG_SHMFD


#: The guest's MAC, as QEMU's vhost_user_migration_done puts it in the u64 (first 6 bytes).
MAC = bytes.fromhex("525400123456")


async def test_send_rarp_announces_the_guest_mac_on_the_tap() -> None:
    async with rig() as r:
        value = int.from_bytes(MAC + bytes(2), "little")
        assert await in_thread(r.fe.ack, Request.SEND_RARP, value) == 0
        [frame] = await wait_until(r.tap.frames, "the RARP frame on the TAP")
        # DPDK make_rarp_packet: broadcast from the MAC, RARP (0x8035) request reverse (3),
        # Ethernet/IPv4, the MAC as sender and target, zero IPs, padded to 60 bytes
        assert frame == bytes.fromhex(
            "ffffffffffff525400123456803500010800060400035254001234560000000052540012345600000000"
        ) + bytes(18)
        assert r.att.counters["rarp_sent"] == 1
