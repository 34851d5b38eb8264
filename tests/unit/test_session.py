"""The sans-IO session alone: recorded QEMU traffic, every handled message, failures, fds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import assert_type

import pytest

from vhostmem.errors import FramingError
from vhostmem.events import NEED_DATA, Handled
from vhostmem.protocol import (
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    ProtocolFeature,
    Request,
    VirtioFeature,
    VringAddress,
    VringFile,
    VringState,
    decode_header,
    encode_request,
)
from vhostmem.session import TRANSITIONS, Session, SessionConfig, SessionState

from .helpers.fakes import FakeHost

VECTORS = Path(__file__).parent.parent / "vectors"
GiB = 1 << 30
MiB = 1 << 20


def load(name: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in (VECTORS / name).read_text().splitlines() if line]


def drain(session: Session[int]) -> list[Handled]:
    out: list[Handled] = []
    while True:
        ev = session.next_event()
        if ev is NEED_DATA:
            return out
        assert isinstance(ev, Handled)
        out.append(ev)


def feed(
    session: Session[int],
    host: FakeHost,
    data: bytes,
    nfds: int = 0,
    file_id: tuple[int, int] | None = None,
) -> list[Handled]:
    fds = [host.new_fd(file_id) for _ in range(nfds)]
    session.receive_data(data, fds)
    return drain(session)


def u64(reply: bytes) -> int:
    header = decode_header(reply[:12])
    assert header.flags == 0x5
    assert header.size == 8
    return int.from_bytes(reply[12:20], "little")


def qemu_session(**config: object) -> tuple[Session[int], FakeHost]:
    """A session after QEMU's handshake with REPLY_ACK and CONFIGURE_MEM_SLOTS negotiated."""
    host = FakeHost()
    session = Session(SessionConfig(**config), host)  # type: ignore[arg-type]
    wanted = int(
        ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.MQ
    )
    wanted &= session.config.protocol_features
    for req, payload in [
        (Request.GET_FEATURES, None),
        (Request.GET_PROTOCOL_FEATURES, None),
        (Request.SET_PROTOCOL_FEATURES, wanted),
        (Request.SET_OWNER, None),
        (Request.SET_FEATURES, int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)),
    ]:
        [ev] = feed(session, host, encode_request(req, payload))
        assert ev.ok, ev.error
    return session, host


def add(
    session: Session[int],
    host: FakeHost,
    gpa: int,
    size: int,
    uaddr: int,
    off: int = 0,
    file_id: tuple[int, int] | None = None,
) -> Handled:
    msg = encode_request(
        Request.ADD_MEM_REG, MemRegMsg(MemoryRegion(gpa, size, uaddr, off)), need_reply=True
    )
    [ev] = feed(session, host, msg, 1, file_id)
    return ev


def rem(
    session: Session[int], host: FakeHost, gpa: int, size: int, uaddr: int, nfds: int = 0
) -> Handled:
    msg = encode_request(
        Request.REM_MEM_REG, MemRegMsg(MemoryRegion(gpa, size, uaddr, 0)), need_reply=True
    )
    [ev] = feed(session, host, msg, nfds)
    return ev


# -- recorded QEMU traffic ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["qemu-10.0.2-virtio-mem-memslots.jsonl", "qemu-10.0.2-virtio-mem-legacy.jsonl"]
)
def test_replay_recorded_qemu(name: str) -> None:
    """Every request QEMU sent is handled ok, replies match what QEMU waited for, nothing leaks."""
    host = FakeHost()
    session = Session(SessionConfig(mem_slots="memslots" in name), host)
    records = load(name)
    expected_replies = [r for r in records if r["dir"] == "out"]
    got_replies = []
    tables = []
    for rec in records:
        if rec["dir"] != "in":
            continue
        data = bytes.fromhex(str(rec["hex"]))
        # Legacy SET_MEM_TABLE: the first region is boot RAM (mem0), the second the virtio-mem
        # device (vmem0): give them stable file identities so unchanged regions are kept.
        events = []
        fds = []
        for i in range(int(rec["nfds"])):  # type: ignore[call-overload]
            fds.append(host.new_fd((1, 100 + i)))
        session.receive_data(data, fds)
        events = drain(session)
        assert len(events) == 1
        ev = events[0]
        assert ev.ok, ev.error
        assert ev.name == rec["name"]
        if ev.reply:
            got_replies.append(ev)
        if ev.change is not None:
            tables.append([(r.gpa, r.size) for r in session.table])
    # QEMU got a reply for the same requests as in the recording, in the same order. The
    # recording stops at QEMU's exit, before the probe answered its last GET_VRING_BASE.
    names = [e.name for e in got_replies]
    assert names[: len(expected_replies)] == [r["name"] for r in expected_replies]
    assert set(names[len(expected_replies) :]) <= {"GET_VRING_BASE"}
    for ev in got_replies:
        assert decode_header(ev.reply[:12]).flags == 0x5
    if "memslots" in name:
        boot = (0, 512 * MiB)
        assert tables[0] == [boot]
        assert [len(t) for t in tables] == [1, 2, 3, 4, 3, 2, 1]
        assert tables[3] == [boot, (0x100000000, GiB), (0x140000000, GiB), (0x180000000, GiB)]
        assert tables[-1] == [boot]
    else:
        assert tables[0] == [(0, 512 * MiB)]
        assert len(tables[1]) == 2 and tables[-1] == [(0, 512 * MiB)]
    held = set(host.open)
    regions_left = len(session.table)
    session.close()
    assert host.open == set() and host.mapped == {}
    assert regions_left == 1 and held  # vring call/err fds were held until close


def test_replay_split_at_every_offset() -> None:
    """Feeding the recorded handshake one byte at a time gives the same events."""
    records = [r for r in load("qemu-10.0.2-virtio-mem-memslots.jsonl") if r["dir"] == "in"][:20]
    whole_host, split_host = FakeHost(), FakeHost()
    whole, split = Session(SessionConfig(), whole_host), Session(SessionConfig(), split_host)
    a, b = [], []
    for rec in records:
        data = bytes.fromhex(str(rec["hex"]))
        nfds = int(rec["nfds"])  # type: ignore[call-overload]
        a += feed(whole, whole_host, data, nfds)
        split.receive_data(data[:1], [split_host.new_fd() for _ in range(nfds)])
        b += drain(split)
        for i in range(1, len(data)):
            split.receive_data(data[i : i + 1])
            b += drain(split)
    assert [(e.name, e.ok, e.reply) for e in a] == [(e.name, e.ok, e.reply) for e in b]


# -- replies -------------------------------------------------------------------------------------


def test_get_replies_and_offers() -> None:
    host = FakeHost()
    s = Session(SessionConfig(queues=3, max_slots=33), host)
    [ev] = feed(s, host, encode_request(Request.GET_FEATURES))
    assert u64(ev.reply) & VirtioFeature.PROTOCOL_FEATURES
    assert u64(ev.reply) & VirtioFeature.VERSION_1
    [ev] = feed(s, host, encode_request(Request.GET_PROTOCOL_FEATURES))
    offered = u64(ev.reply)
    for bit in ("REPLY_ACK", "CONFIGURE_MEM_SLOTS", "MQ", "RESET_DEVICE", "STATUS"):
        assert offered & ProtocolFeature[bit]
    [ev] = feed(s, host, encode_request(Request.GET_QUEUE_NUM))
    assert u64(ev.reply) == 3
    [ev] = feed(s, host, encode_request(Request.GET_MAX_MEM_SLOTS))
    assert u64(ev.reply) == 33
    host2 = FakeHost()
    s2 = Session(SessionConfig(mem_slots=False), host2)
    [ev] = feed(s2, host2, encode_request(Request.GET_PROTOCOL_FEATURES))
    assert not u64(ev.reply) & ProtocolFeature.CONFIGURE_MEM_SLOTS


def test_own_reply_only_once_even_with_need_reply() -> None:
    s, host = qemu_session()
    [ev] = feed(s, host, encode_request(Request.GET_FEATURES, need_reply=True))
    assert len(ev.reply) == 20  # the features, not features + ack


def test_ack_only_when_asked_and_negotiated() -> None:
    s, host = qemu_session()
    [ev] = feed(s, host, encode_request(Request.SET_VRING_NUM, VringState(0, 256)))
    assert ev.reply == b""
    [ev] = feed(s, host, encode_request(Request.SET_VRING_NUM, VringState(0, 256), need_reply=True))
    assert u64(ev.reply) == 0
    host2 = FakeHost()
    s2 = Session(SessionConfig(), host2)  # REPLY_ACK not negotiated
    [ev] = feed(s2, host2, encode_request(Request.SET_OWNER, need_reply=True))
    assert ev.ok and ev.reply == b""


def test_transition_table_covers_qemu_order() -> None:
    assert Request.SET_OWNER in TRANSITIONS[SessionState.AWAIT_OWNER]
    assert TRANSITIONS[SessionState.AWAIT_OWNER][Request.SET_OWNER] is SessionState.OWNED
    assert Request.ADD_MEM_REG not in TRANSITIONS[SessionState.AWAIT_OWNER]
    assert Request.SET_OWNER not in TRANSITIONS[SessionState.OWNED]


def test_set_owner_first_client() -> None:
    host = FakeHost()
    s = Session(SessionConfig(), host)
    [ev] = feed(s, host, encode_request(Request.SET_OWNER))
    assert ev.ok and s.state is SessionState.OWNED


def add_before_owner(config: SessionConfig) -> tuple[Session[int], FakeHost, Handled]:
    """A session on ``config`` that negotiated REPLY_ACK and CONFIGURE_MEM_SLOTS and got
    ADD_MEM_REG (1 MiB at 0) before any SET_OWNER: the session, its host, the ADD's event."""
    host = FakeHost()
    s: Session[int] = Session(config, host)
    feed(
        s,
        host,
        encode_request(
            Request.SET_PROTOCOL_FEATURES,
            int(ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS),
        ),
    )
    ev = add(s, host, 0, MiB, 0x7000_0000)
    return s, host, ev


def test_memory_before_owner_is_refused_with_failure_ack_when_strict() -> None:
    s, host, ev = add_before_owner(SessionConfig(strict=True))
    assert not ev.ok and ev.error_kind == "state"
    assert "SET_OWNER" in (ev.error or "")
    assert u64(ev.reply) == 1
    assert host.open == set()  # the region's fd was closed
    assert len(s.table) == 0
    assert ev.deviation is None


def test_memory_before_owner_is_served_and_marked() -> None:
    # DPDK's virtio-user reconnecting in server mode sends no SET_OWNER
    # (virtio_user_dev_server_reconnect); libvhost-user and DPDK's lib/vhost serve it anyway.
    s, host, ev = add_before_owner(SessionConfig())
    assert ev.ok and u64(ev.reply) == 0 and ev.error is None
    assert ev.deviation is not None
    assert (ev.deviation.kind, ev.deviation.state) == ("request-before-owner", "await-owner")
    for words in ("SET_OWNER", "libvhost-user", "DPDK", "--strict-protocol"):
        assert words in ev.deviation.rule, ev.deviation.rule
    assert [(r.gpa, r.size) for r in s.table] == [(0, MiB)] and len(host.mapped) == 1
    assert s.state.value == "await-owner"  # no SET_OWNER came: the state says so
    [owner] = feed(s, host, encode_request(Request.SET_OWNER, need_reply=True))
    assert owner.ok and owner.deviation is None and s.state.value == "owned"
    [again] = feed(s, host, encode_request(Request.SET_OWNER, need_reply=True))
    assert again.ok and u64(again.reply) == 0
    assert again.deviation is not None and again.deviation.kind == "owner-again"
    assert again.deviation.state == "owned"
    s.close()
    assert host.open == set() and host.mapped == {}


def test_protocol_features_not_offered_refused() -> None:
    host = FakeHost()
    s = Session(SessionConfig(mem_slots=False), host)
    [ev] = feed(
        s,
        host,
        encode_request(Request.SET_PROTOCOL_FEATURES, int(ProtocolFeature.CONFIGURE_MEM_SLOTS)),
    )
    assert not ev.ok and "CONFIGURE_MEM_SLOTS" in (ev.error or "")
    assert s.acked_protocol_features == 0


def test_unknown_request_with_and_without_need_reply() -> None:
    s, host = qemu_session()
    [ev] = feed(s, host, encode_request(200, b"abcd", need_reply=True))
    assert not ev.ok and u64(ev.reply) == 1 and "200" in (ev.error or "")
    [ev] = feed(s, host, encode_request(200, b"abcd"))
    assert not ev.ok and ev.reply == b""
    # the stream is still in step:
    [ev] = feed(s, host, encode_request(Request.GET_FEATURES))
    assert ev.ok


def test_known_request_without_handler_is_refused_with_an_ack() -> None:
    s, host = qemu_session()
    [ev] = feed(s, host, encode_request(Request.NET_SET_MTU, 1500, need_reply=True))
    assert not ev.ok and u64(ev.reply) == 1 and "not implemented" in (ev.error or "")
    assert (ev.error or "").startswith("NET_SET_MTU: ")
    [ev] = feed(s, host, encode_request(Request.GET_FEATURES))
    assert ev.ok


def test_wrong_version_and_reply_flag_answered() -> None:
    s, host = qemu_session()
    [ev] = feed(s, host, encode_request(Request.SET_VRING_NUM, VringState(0, 8), flags=0x8 | 0x2))
    assert not ev.ok and "version" in (ev.error or "") and u64(ev.reply) == 1
    [ev] = feed(
        s, host, encode_request(Request.SET_VRING_NUM, VringState(0, 8), flags=0x1 | 0x4 | 0x8)
    )
    assert not ev.ok and "REPLY" in (ev.error or "")


def test_short_payload_is_a_decode_failure_not_fatal() -> None:
    s, host = qemu_session()
    [ev] = feed(s, host, encode_request(Request.ADD_MEM_REG, b"\0" * 12, need_reply=True), 1)
    assert not ev.ok and ev.error_kind == "decode" and u64(ev.reply) == 1
    assert host.open == set()


def test_oversized_size_field_breaks_framing_and_closes_fds() -> None:
    s, host = qemu_session()
    bad = encode_request(Request.SET_VRING_NUM, VringState(0, 8))[:8] + (10**6).to_bytes(
        4, "little"
    )
    s.receive_data(bad, [host.new_fd()])
    with pytest.raises(FramingError):
        s.next_event()
    assert s.state is SessionState.ERROR
    with pytest.raises(FramingError):
        s.next_event()
    s.close()
    assert host.open == set()


# -- memory table -------------------------------------------------------------------------------


def test_add_and_rem() -> None:
    s, host = qemu_session()
    ev = add(s, host, 0x100000000, GiB, 0x7F0000000000, GiB)
    assert ev.ok and u64(ev.reply) == 0
    assert ev.change is not None and len(ev.change.added) == 1
    [region] = s.table.regions
    assert (region.gpa, region.size, region.uaddr, region.mmap_offset) == (
        0x100000000,
        GiB,
        0x7F0000000000,
        GiB,
    )
    ev = rem(s, host, 0x100000000, GiB, 0x7F0000000000)
    assert ev.ok and u64(ev.reply) == 0 and len(s.table) == 0
    assert host.mapped == {}


def test_a_region_handle_has_the_hosts_type() -> None:
    """The table is generic over the host's handle: what ``map_region`` returned comes back out
    of the table with its type (``assert_type`` is checked by mypy --strict in the lint gate,
    and fails on a handle typed ``Any``), so the shell reads it without a cast."""
    s, host = qemu_session()
    ev = add(s, host, 0x100000000, GiB, 0x7F0000000000)
    assert ev.ok
    [region] = s.table.regions
    handle = assert_type(region.handle, int)
    assert host.mapped[handle].guest_phys_addr == 0x100000000
    found = s.table.lookup_gpa(0x100000000 + GiB - 1)
    assert found is not None and assert_type(found.handle, int) == handle
    [gone] = s.close()
    assert assert_type(gone.handle, int) == handle and host.mapped == {}


def test_rem_matches_gpa_uaddr_size_and_closes_its_fd() -> None:
    s, host = qemu_session()
    add(s, host, 0, GiB, 0x7F0000000000)
    ev = rem(s, host, 0, GiB, 0x7F0000001000)
    assert not ev.ok and ev.error_kind == "not-found" and u64(ev.reply) == 1
    assert len(s.table) == 1  # a failed REM leaves the region
    ev = rem(s, host, 0, GiB, 0x7F0000000000, nfds=1)
    assert ev.ok and len(s.table) == 0
    assert host.open - set(fd for v in s.vrings for fd in (v.kick, v.call, v.err) if fd) == set()


def test_failed_add_leaves_nothing() -> None:
    s, host = qemu_session()
    host.fail_map = {1}
    ev = add(s, host, 0, GiB, 0x7F0000000000)
    assert not ev.ok and u64(ev.reply) == 1 and "injected" in (ev.error or "")
    assert len(s.table) == 0 and host.mapped == {} and host.open == set()


def test_overlaps_refused_gpa_and_uaddr() -> None:
    s, host = qemu_session()
    assert add(s, host, 0, GiB, 0x7F0000000000).ok
    ev = add(s, host, GiB - 4096, GiB, 0x7E0000000000)
    assert not ev.ok and ev.error_kind == "overlap-gpa" and "0x3ffff000" in (ev.error or "")
    ev = add(s, host, 2 * GiB, GiB, 0x7F0000000000 + GiB - 4096)
    assert not ev.ok and ev.error_kind == "overlap-uaddr"
    assert len(s.table) == 1 and len(host.mapped) == 1 and host.open == set()


def test_slot_limit_and_reuse() -> None:
    s, host = qemu_session(max_slots=2)
    assert add(s, host, 0, MiB, 0x10000000).ok
    assert add(s, host, 2 * MiB, MiB, 0x20000000).ok
    ev = add(s, host, 4 * MiB, MiB, 0x30000000)
    assert not ev.ok and ev.error_kind == "slot-limit" and "--max-slots 2" in (ev.error or "")
    assert rem(s, host, 0, MiB, 0x10000000).ok
    assert add(s, host, 4 * MiB, MiB, 0x30000000).ok


def test_add_with_wrong_fd_counts() -> None:
    s, host = qemu_session()
    msg = encode_request(
        Request.ADD_MEM_REG, MemRegMsg(MemoryRegion(0, MiB, 0x1000000, 0)), need_reply=True
    )
    for n in (0, 2, 7):
        [ev] = feed(s, host, msg, n)
        assert not ev.ok and u64(ev.reply) == 1 and "file descriptor" in (ev.error or "")
        assert host.open == set()
    assert len(s.table) == 0


def test_add_without_configure_mem_slots_refused() -> None:
    host = FakeHost()
    s = Session(SessionConfig(), host)
    feed(s, host, encode_request(Request.SET_PROTOCOL_FEATURES, int(ProtocolFeature.REPLY_ACK)))
    feed(s, host, encode_request(Request.SET_OWNER))
    ev = add(s, host, 0, MiB, 0x1000000)
    assert not ev.ok and "CONFIGURE_MEM_SLOTS" in (ev.error or "")


def test_size_zero_and_wrapping_regions_refused() -> None:
    s, host = qemu_session()
    assert add(s, host, 0, 0, 0x1000).error_kind == "bad-region"
    ev = add(s, host, (1 << 64) - 4096, 8192, 0x1000)
    assert not ev.ok and "2^64" in (ev.error or "")
    ev = add(s, host, 0, 8192, (1 << 64) - 4096)
    assert not ev.ok and ev.error_kind == "bad-region"
    assert host.open == set() and host.mapped == {}


def test_set_mem_table_by_difference() -> None:
    s, host = qemu_session(mem_slots=False)
    boot = (0, 512 * MiB, 0x7F0000000000, 0)
    vmem = (0x100000000, 4 * GiB, 0x7E0000000000, 0)

    def table(*regions: tuple[int, int, int, int]) -> Handled:
        msg = encode_request(
            Request.SET_MEM_TABLE,
            MemoryTable(tuple(MemoryRegion(*r) for r in regions)),
            need_reply=True,
        )
        fds = [host.new_fd((1, r[0])) for r in regions]
        s.receive_data(msg, fds)
        [ev] = drain(s)
        return ev

    ev = table(boot)
    assert ev.ok and len(ev.change.added) == 1  # type: ignore[union-attr]
    boot_handle = s.table.regions[0].handle
    ev = table(boot, vmem)
    assert ev.ok and len(ev.change.kept) == 1 and len(ev.change.added) == 1  # type: ignore[union-attr]
    assert s.table.regions[0].handle == boot_handle  # unchanged region kept its mapping
    ev = table(boot)
    assert ev.ok and len(ev.change.removed) == 1 and s.table.regions[0].handle == boot_handle  # type: ignore[union-attr]
    assert len(host.mapped) == 1
    # same numbers, different file: mapped anew
    msg = encode_request(
        Request.SET_MEM_TABLE, MemoryTable((MemoryRegion(*boot),)), need_reply=True
    )
    s.receive_data(msg, [host.new_fd((2, 2))])
    [ev] = drain(s)
    assert ev.ok and len(ev.change.added) == 1 and s.table.regions[0].handle != boot_handle  # type: ignore[union-attr]
    s.close()
    assert host.open == set() and host.mapped == {}


def test_set_mem_table_all_or_nothing() -> None:
    s, host = qemu_session(mem_slots=False)
    host.fail_map = {2}
    regions = (
        MemoryRegion(0, MiB, 0x10000000, 0),
        MemoryRegion(2 * MiB, MiB, 0x20000000, 0),
        MemoryRegion(4 * MiB, MiB, 0x30000000, 0),
    )
    msg = encode_request(Request.SET_MEM_TABLE, MemoryTable(regions), need_reply=True)
    s.receive_data(msg, [host.new_fd() for _ in regions])
    [ev] = drain(s)
    assert not ev.ok and u64(ev.reply) == 1
    assert len(s.table) == 0 and host.mapped == {} and host.open == set()
    # count mismatch: 3 regions, 2 fds
    s.receive_data(msg, [host.new_fd() for _ in range(2)])
    [ev] = drain(s)
    assert not ev.ok and "file descriptor" in (ev.error or "") and host.open == set()
    # overlapping regions inside one table
    bad = MemoryTable(
        (MemoryRegion(0, 2 * MiB, 0x10000000, 0), MemoryRegion(MiB, MiB, 0x20000000, 0))
    )
    s.receive_data(
        encode_request(Request.SET_MEM_TABLE, bad, need_reply=True), [host.new_fd(), host.new_fd()]
    )
    [ev] = drain(s)
    assert not ev.ok and ev.error_kind == "overlap-gpa" and host.open == set()


def test_table_survives_reset_device_and_ring_stop() -> None:
    s, host = qemu_session()
    add(s, host, 0, GiB, 0x7F0000000000)
    [ev] = feed(s, host, encode_request(Request.GET_VRING_BASE, VringState(0, 0)))
    [ev] = feed(s, host, encode_request(Request.RESET_DEVICE, need_reply=True))
    assert ev.ok and len(s.table) == 1


# -- vrings ------------------------------------------------------------------------------------


def test_vring_base_round_trip_and_fds_replaced() -> None:
    s, host = qemu_session()
    add(s, host, 0, GiB, 0x7F0000000000)
    feed(s, host, encode_request(Request.SET_VRING_BASE, VringState(1, 77)))
    [ev] = feed(s, host, encode_request(Request.GET_VRING_BASE, VringState(1, 0)))
    assert ev.reply[12:] == (1).to_bytes(4, "little") + (77).to_bytes(4, "little")
    fd1 = feed(s, host, encode_request(Request.SET_VRING_CALL, VringFile(0, False)), 1)
    first = s.vrings[0].call
    feed(s, host, encode_request(Request.SET_VRING_CALL, VringFile(0, False)), 1)
    assert first not in host.open and s.vrings[0].call in host.open
    [ev] = feed(s, host, encode_request(Request.SET_VRING_CALL, VringFile(0, True)))
    assert ev.ok and s.vrings[0].call is None
    [ev] = feed(
        s, host, encode_request(Request.SET_VRING_CALL, VringFile(0, True), need_reply=True), 1
    )
    assert not ev.ok and "NOFD" in (ev.error or "")
    del fd1
    s.close()
    assert host.open == set()


def test_vring_index_out_of_range() -> None:
    s, host = qemu_session()
    [ev] = feed(s, host, encode_request(Request.SET_VRING_NUM, VringState(2, 256), need_reply=True))
    assert not ev.ok and "out of range" in (ev.error or "") and u64(ev.reply) == 1
    [ev] = feed(s, host, encode_request(Request.GET_VRING_BASE, VringState(9, 0)))
    assert not ev.ok and decode_header(ev.reply[:12]).size == 0


def test_ring_start_checks_translation() -> None:
    s, host = qemu_session()
    add(s, host, 0, GiB, 0x7F0000000000)
    feed(
        s,
        host,
        encode_request(
            Request.SET_VRING_ADDR,
            VringAddress(0, 0, 0x7F0000001000, 0x7F0000003000, 0x7F0000002000, 0),
        ),
    )
    [ev] = feed(s, host, encode_request(Request.SET_VRING_KICK, VringFile(0, False)), 1)
    assert ev.ok and ev.notes == ()
    feed(
        s,
        host,
        encode_request(
            Request.SET_VRING_ADDR, VringAddress(1, 0, 0x1000, 0x7F0000003000, 0x7F0000002000, 0)
        ),
    )
    [ev] = feed(s, host, encode_request(Request.SET_VRING_KICK, VringFile(1, False)), 1)
    assert ev.ok and any("desc ring at front-end address 0x1000" in n for n in ev.notes)
    ev = rem(s, host, 0, GiB, 0x7F0000000000)
    assert ev.ok and any("running vring 0" in n for n in ev.notes)


def test_refusals_say_why_in_each_state_when_strict() -> None:
    host = FakeHost()
    s = Session(SessionConfig(strict=True), host)
    [ev] = feed(s, host, encode_request(Request.SET_VRING_NUM, VringState(0, 256)))
    assert ev.error_kind == "state"
    assert ev.error == (
        "SET_VRING_NUM: is not allowed before SET_OWNER (state await-owner; needs SET_OWNER first)"
    )
    session, host = qemu_session(strict=True)
    [ev] = feed(session, host, encode_request(Request.SET_OWNER, need_reply=True))
    assert not ev.ok and ev.error_kind == "state"
    assert ev.error == (
        "SET_OWNER: came again: the session already has an owner "
        "(state owned; needs one SET_OWNER per connection)"
    )
    assert u64(ev.reply) == 1


def test_injected_errno_on_a_request_that_maps_nothing_is_marked_injected() -> None:
    from vhostmem.faults import FaultPlan, parse_fault

    session, host = qemu_session()
    faults = FaultPlan()
    faults.add(parse_fault("SET_VRING_NUM:nth=1:errno=ENOMEM"))
    session.faults = faults
    msg = encode_request(Request.SET_VRING_NUM, VringState(0, 256), need_reply=True)
    [ev] = feed(session, host, msg)
    assert not ev.ok and ev.error_kind == "injected"
    assert ev.injected == "SET_VRING_NUM:nth=1:errno=ENOMEM"
    assert u64(ev.reply) == 1


# -- the table tells the truth when an unmap fails ---------------------------------------------


def test_rem_whose_unmap_fails_keeps_the_region_marked_and_a_retry_unmaps_it() -> None:
    s, host = qemu_session()
    assert add(s, host, 0x100000000, GiB, 0x7F0000000000).ok
    host.fail_unmap[0x100000000] = "ENOMEM (vm.max_map_count)"
    ev = rem(s, host, 0x100000000, GiB, 0x7F0000000000)
    assert not ev.ok and u64(ev.reply) == 1 and ev.error_kind == "munmap-failed"
    assert ev.error is not None
    assert ev.error.startswith("REM_MEM_REG: the unmap of region gpa=0x100000000 size=0x40000000")
    assert "ENOMEM (vm.max_map_count)" in ev.error and "stays in the table" in ev.error
    [region] = s.table.regions  # still mapped, so still in the table, marked
    assert region.unmap_failed is not None and "ENOMEM (vm.max_map_count)" in region.unmap_failed
    assert region.as_json()["unmap_failed"] == region.unmap_failed
    assert ev.details == {"unmap_failed": [region.as_json()]}
    assert len(host.mapped) == 1 and ev.change is None
    # QEMU sends the REM again with its next change: it retries the unmap, which now works.
    del host.fail_unmap[0x100000000]
    ev = rem(s, host, 0x100000000, GiB, 0x7F0000000000)
    assert ev.ok and u64(ev.reply) == 0 and len(s.table) == 0 and host.mapped == {}
    assert host.unmaps_tried == [0x100000000, 0x100000000]
    assert "unmap_failed" not in region.as_json()


def _set_table(s: Session[int], host: FakeHost, *regions: tuple[int, int, int, int]) -> Handled:
    table = MemoryTable(tuple(MemoryRegion(*r) for r in regions))
    s.receive_data(
        encode_request(Request.SET_MEM_TABLE, table, need_reply=True),
        [host.new_fd((1, r[0])) for r in regions],
    )
    [ev] = drain(s)
    return ev


def test_set_mem_table_reports_exactly_the_old_region_left_mapped_and_unmaps_the_rest() -> None:
    s, host = qemu_session(mem_slots=False)
    old = [(i * GiB, GiB, 0x7F0000000000 + i * GiB, 0) for i in range(3)]
    new = (8 * GiB, GiB, 0x7E0000000000, 0)
    assert _set_table(s, host, *old).ok
    host.fail_unmap[GiB] = "EINVAL (hugetlb length)"
    ev = _set_table(s, host, new)
    assert not ev.ok and u64(ev.reply) == 1 and ev.error_kind == "munmap-failed"
    # every removed region was tried, the middle one failed, the other two are gone
    assert sorted(host.unmaps_tried) == [0, GiB, 2 * GiB]
    assert sorted(r.guest_phys_addr for r in host.mapped.values()) == [GiB, 8 * GiB]
    assert ev.error is not None and "1 old region(s) could not be unmapped" in ev.error
    assert "region gpa=0x40000000 size=0x40000000" in ev.error
    assert "EINVAL (hugetlb length)" in ev.error
    assert "gpa=0x0 " not in ev.error and "gpa=0x80000000" not in ev.error
    assert ev.details is not None and [r["gpa"] for r in ev.details["unmap_failed"]] == [GiB]
    assert "EINVAL (hugetlb length)" in ev.details["unmap_failed"][0]["unmap_failed"]
    # the change happened (the new table is in force) and is reported with the failure
    assert ev.change is not None and [r.gpa for r in ev.change.added] == [8 * GiB]
    assert sorted(r.gpa for r in ev.change.removed) == [0, GiB, 2 * GiB]
    # the table equals what is mapped: the new region translates, the stuck one is kept, marked
    assert [r.gpa for r in s.table.regions] == [8 * GiB]
    [stuck] = s.table.unreleased
    assert stuck.gpa == GiB and stuck.unmap_failed is not None
    assert [r.gpa for r in s.table.mapped] == [GiB, 8 * GiB]
    assert s.table.lookup_gpa(GiB) is None
    # the next SET_MEM_TABLE tries it again; once it works the table is clean
    del host.fail_unmap[GiB]
    ev = _set_table(s, host, new)
    assert ev.ok and s.table.unreleased == ()
    assert [r.guest_phys_addr for r in host.mapped.values()] == [8 * GiB]
    s.close()
    assert host.mapped == {} and host.open == set()


def test_set_mem_table_new_region_may_overlap_an_old_one_left_mapped() -> None:
    s, host = qemu_session(mem_slots=False)
    assert _set_table(s, host, (0, GiB, 0x7F0000000000, 0)).ok
    host.fail_unmap[0] = "ENOMEM"
    ev = _set_table(s, host, (0, 2 * GiB, 0x7E0000000000, 0))  # replaces it, overlapping
    assert not ev.ok and [(r.gpa, r.size) for r in s.table.regions] == [(0, 2 * GiB)]
    assert [(r.gpa, r.size) for r in s.table.unreleased] == [(0, GiB)]
    assert s.table.lookup_gpa(0x1000) is s.table.regions[0]  # translation uses the new table
    ev = _set_table(s, host, (0, 2 * GiB, 0x7E0000000000, 0))  # kept; the old one fails again
    assert ev.ok and any(
        "still mapped after an earlier failed unmap: 1 earlier" in n for n in ev.notes
    )
    assert len(s.table.unreleased) == 1


def test_set_mem_table_rollback_whose_unmap_fails_keeps_the_new_region_marked() -> None:
    s, host = qemu_session(mem_slots=False)
    host.fail_map = {2}
    host.fail_unmap[0] = "ENOMEM"
    ev = _set_table(s, host, (0, GiB, 0x7F0000000000, 0), (GiB, GiB, 0x7E0000000000, 0))
    assert not ev.ok and u64(ev.reply) == 1 and len(s.table) == 0
    assert ev.error is not None and "undoing it, 1 new region(s) could not be unmapped" in ev.error
    assert [r.gpa for r in s.table.unreleased] == [0] and len(host.mapped) == 1
    assert host.open == set()


def test_close_tries_every_region_and_reports_those_left_mapped() -> None:
    s, host = qemu_session()
    for i in range(3):
        assert add(s, host, i * GiB, GiB, 0x7F0000000000 + i * GiB).ok
    feed(s, host, encode_request(Request.SET_VRING_CALL, VringFile(0, False)), 1)
    host.fail_unmap[GiB] = "ENOMEM"
    gone = s.close()
    assert sorted(host.unmaps_tried) == [0, GiB, 2 * GiB]
    assert [(r.gpa, r.unmap_failed is not None) for r in gone] == [
        (0, False),
        (GiB, True),
        (2 * GiB, False),
    ]
    assert host.open == set()  # the vring's fd was closed although an unmap failed


def test_region_ending_exactly_at_2_64_refused() -> None:
    # The exclusive end must be a u64 (regions.end_fits_u64; rust-vmm message.rs is_valid).
    s, host = qemu_session()
    for gpa, uaddr in (((1 << 64) - 8192, 0x1000), (0, (1 << 64) - 8192)):
        ev = add(s, host, gpa, 8192, uaddr)
        assert not ev.ok and ev.error_kind == "bad-region" and "2^64" in (ev.error or "")
    assert host.open == set() and host.mapped == {}
