"""Protocol behaviour as tables: bytes and fds in, outcomes and replies out.

The shape of h11's ``tests/test_io.py``: each case is a list of messages the front-end sends
(the bytes and how many fds ride with them) and what the pure session answers (the request, ok
or the refusal's kind, the exact reply bytes). Every case runs twice against a :class:`FakeHost`:
fed one byte at a time (the fds with the message's first byte, where QEMU's ``sendmsg`` puts
them) and fed one message per chunk; both runs must give the table's outcomes, and when the
session closes no fd stays open and nothing stays mapped. The cases of :data:`STRICT_CASES` run
with ``--strict-protocol`` (``SessionConfig(strict=True)``), the rest with the defaults.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from vhostmem.errors import FramingError
from vhostmem.events import NEED_DATA, Handled
from vhostmem.faults import FaultPlan, parse_fault
from vhostmem.protocol import (
    MAX_PAYLOAD_SIZE,
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    Payload,
    ProtocolFeature,
    Request,
    VirtioFeature,
    VringFile,
    VringState,
    encode_reply,
    encode_request,
    encode_u64_reply,
)
from vhostmem.session import Session, SessionConfig, SessionState

from .helpers.fakes import FakeHost

MiB = 1 << 20
CONFIG = SessionConfig()
STRICT = SessionConfig(strict=True)
OFFERED_FEATURES = CONFIG.features
OFFERED_PROTOCOL = CONFIG.protocol_features
ACKED_PROTOCOL = int(ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS)
ACKED_FEATURES = int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)


@dataclass(frozen=True)
class Out:
    """What the session answers to one message: ``kind`` is ``None`` when it succeeded;
    ``deviation`` the kind of ordering it broke and was served with, if any."""

    name: str
    kind: str | None
    reply: bytes
    deviation: str | None = None


#: The framing broke: next_event raises FramingError and the session is in ERROR.
FRAMING = Out("framing", "framing", b"")

Step = tuple[bytes, int, Out]


def ack(request: Request | int, value: int = 0) -> bytes:
    """The REPLY_ACK reply: 0 for success, non-zero for failure."""
    return encode_u64_reply(request, value)


def msg(request: Request | int, payload: Payload = None, *, need_reply: bool = True) -> bytes:
    return encode_request(request, payload, need_reply=need_reply)


def region(gpa: int, size: int, uaddr: int, offset: int = 0) -> MemRegMsg:
    return MemRegMsg(MemoryRegion(gpa, size, uaddr, offset))


def ok(request: Request, reply: bytes | None = None) -> Out:
    """Success; the reply defaults to the zero ack (need_reply with REPLY_ACK negotiated)."""
    return Out(request.name, None, ack(request) if reply is None else reply)


def bent(out: Out, deviation: str = "request-before-owner") -> Out:
    """``out``, for a request served although the spec's order does not allow it."""
    return Out(out.name, out.kind, out.reply, deviation)


def refused(request: Request | int, kind: str, name: str | None = None) -> Out:
    """A refusal answered with the failure ack; the connection stays."""
    return Out(name or Request(request).name, kind, ack(request, 1))


#: QEMU's handshake (hw/virtio/vhost-user.c vhost_user_backend_init) with REPLY_ACK and
#: CONFIGURE_MEM_SLOTS acked; GET_* have their own reply, the rest a zero ack once REPLY_ACK is
#: negotiated (SET_PROTOCOL_FEATURES itself is answered before it takes effect: no reply).
HANDSHAKE: list[Step] = [
    (
        msg(Request.GET_FEATURES, need_reply=False),
        0,
        ok(Request.GET_FEATURES, encode_u64_reply(Request.GET_FEATURES, OFFERED_FEATURES)),
    ),
    (
        msg(Request.GET_PROTOCOL_FEATURES, need_reply=False),
        0,
        ok(
            Request.GET_PROTOCOL_FEATURES,
            encode_u64_reply(Request.GET_PROTOCOL_FEATURES, OFFERED_PROTOCOL),
        ),
    ),
    (
        msg(Request.SET_PROTOCOL_FEATURES, ACKED_PROTOCOL, need_reply=False),
        0,
        ok(Request.SET_PROTOCOL_FEATURES, b""),
    ),
    (
        msg(Request.GET_QUEUE_NUM, need_reply=False),
        0,
        ok(Request.GET_QUEUE_NUM, encode_u64_reply(Request.GET_QUEUE_NUM, 1)),
    ),
    (
        msg(Request.GET_MAX_MEM_SLOTS, need_reply=False),
        0,
        ok(Request.GET_MAX_MEM_SLOTS, encode_u64_reply(Request.GET_MAX_MEM_SLOTS, 509)),
    ),
    (msg(Request.SET_OWNER), 0, ok(Request.SET_OWNER)),
    (msg(Request.SET_FEATURES, ACKED_FEATURES), 0, ok(Request.SET_FEATURES)),
]

A = region(0x1_0000_0000, 2 * MiB, 0x7F00_0000_0000)
B = region(0x1_0020_0000, 2 * MiB, 0x7F00_0020_0000)

CASES: dict[str, list[Step]] = {
    "handshake": HANDSHAKE,
    "before-owner": [
        # DPDK 22.11 virtio-user in server mode after the back-end reconnects
        # (virtio_user_dev_server_reconnect): it stops the rings of the old connection, then
        # negotiates and starts the device, never sending SET_OWNER. Served, each marked.
        (
            msg(Request.SET_VRING_ENABLE, VringState(0, 0), need_reply=False),
            0,
            bent(ok(Request.SET_VRING_ENABLE, b"")),
        ),
        (
            msg(Request.GET_VRING_BASE, VringState(0, 0), need_reply=False),
            0,
            bent(
                ok(Request.GET_VRING_BASE, encode_reply(Request.GET_VRING_BASE, VringState(0, 0)))
            ),
        ),
        *HANDSHAKE[:3],  # feature queries are legal before SET_OWNER: no deviation
        (msg(Request.SET_VRING_CALL, VringFile(0, False)), 1, bent(ok(Request.SET_VRING_CALL))),
        (msg(Request.SET_FEATURES, ACKED_FEATURES), 0, bent(ok(Request.SET_FEATURES))),
        (
            msg(Request.SET_MEM_TABLE, MemoryTable((A.region,))),
            1,
            bent(ok(Request.SET_MEM_TABLE)),
        ),
        # still refused for its own reasons, and marked: it passed the order gate
        (msg(Request.ADD_MEM_REG, A), 1, bent(refused(Request.ADD_MEM_REG, "overlap-gpa"))),
        (msg(Request.ADD_MEM_REG, B), 1, bent(ok(Request.ADD_MEM_REG))),
        # an unknown code is refused as ever, whatever the state
        (msg(999, b""), 0, refused(999, "protocol", "UNKNOWN(999)")),
        (msg(Request.SET_OWNER), 0, ok(Request.SET_OWNER)),
        # a second SET_OWNER is a no-op, as in libvhost-user and DPDK
        (msg(Request.SET_OWNER), 0, bent(ok(Request.SET_OWNER), "owner-again")),
        (msg(Request.REM_MEM_REG, A), 0, ok(Request.REM_MEM_REG)),
    ],
    "add-and-remove": [
        *HANDSHAKE,
        (msg(Request.ADD_MEM_REG, A), 1, ok(Request.ADD_MEM_REG)),
        (msg(Request.ADD_MEM_REG, B), 1, ok(Request.ADD_MEM_REG)),
        (msg(Request.REM_MEM_REG, A), 0, ok(Request.REM_MEM_REG)),
        (msg(Request.REM_MEM_REG, B), 0, ok(Request.REM_MEM_REG)),
    ],
    "add-refused": [
        *HANDSHAKE,
        (msg(Request.ADD_MEM_REG, A), 1, ok(Request.ADD_MEM_REG)),
        (msg(Request.ADD_MEM_REG, A), 1, refused(Request.ADD_MEM_REG, "overlap-gpa")),
        (
            msg(Request.ADD_MEM_REG, region(0, 2 * MiB, 0x7F00_0000_0000)),
            1,
            refused(Request.ADD_MEM_REG, "overlap-uaddr"),
        ),
        (
            msg(Request.ADD_MEM_REG, region(0, 0, 0x1000)),
            1,
            refused(Request.ADD_MEM_REG, "bad-region"),
        ),
        # The exclusive end must be a u64 (regions.end_fits_u64).
        (
            msg(Request.ADD_MEM_REG, region((1 << 64) - 2 * MiB, 2 * MiB, 0x1000)),
            1,
            refused(Request.ADD_MEM_REG, "bad-region"),
        ),
    ],
    "rem-refused": [
        *HANDSHAKE,
        (msg(Request.REM_MEM_REG, A), 0, refused(Request.REM_MEM_REG, "not-found")),
        (msg(Request.ADD_MEM_REG, A), 1, ok(Request.ADD_MEM_REG)),
        # REM matches on (gpa, uaddr, size), as libvhost-user vu_rem_mem_reg does.
        (
            msg(Request.REM_MEM_REG, region(0x1_0000_0000, 2 * MiB, 0x7F00_1000_0000)),
            0,
            refused(Request.REM_MEM_REG, "not-found"),
        ),
        # An fd that comes with REM_MEM_REG is closed unused (vhost-user.rst).
        (msg(Request.REM_MEM_REG, A), 1, ok(Request.REM_MEM_REG)),
    ],
    "mem-slots-not-negotiated": [
        *HANDSHAKE[:2],
        (
            msg(Request.SET_PROTOCOL_FEATURES, int(ProtocolFeature.REPLY_ACK), need_reply=False),
            0,
            ok(Request.SET_PROTOCOL_FEATURES, b""),
        ),
        (msg(Request.SET_OWNER), 0, ok(Request.SET_OWNER)),
        (msg(Request.ADD_MEM_REG, A), 1, refused(Request.ADD_MEM_REG, "state")),
        (msg(Request.REM_MEM_REG, A), 0, refused(Request.REM_MEM_REG, "state")),
    ],
    "set-mem-table": [
        *HANDSHAKE,
        (
            msg(Request.SET_MEM_TABLE, MemoryTable((A.region, B.region))),
            2,
            ok(Request.SET_MEM_TABLE),
        ),
        (msg(Request.SET_MEM_TABLE, MemoryTable((B.region,))), 1, ok(Request.SET_MEM_TABLE)),
        (
            msg(Request.SET_MEM_TABLE, MemoryTable((A.region, A.region))),
            2,
            refused(Request.SET_MEM_TABLE, "overlap-gpa"),
        ),
        (msg(Request.SET_MEM_TABLE, MemoryTable(())), 0, ok(Request.SET_MEM_TABLE)),
    ],
    "fd-counts": [
        *HANDSHAKE,
        (msg(Request.ADD_MEM_REG, A), 0, refused(Request.ADD_MEM_REG, "protocol")),
        (msg(Request.ADD_MEM_REG, A), 2, refused(Request.ADD_MEM_REG, "protocol")),
        (
            msg(Request.SET_MEM_TABLE, MemoryTable((A.region, B.region))),
            1,
            refused(Request.SET_MEM_TABLE, "protocol"),
        ),
        (
            msg(Request.SET_VRING_KICK, VringFile(0, True)),
            1,
            refused(Request.SET_VRING_KICK, "protocol"),
        ),
        (
            msg(Request.SET_VRING_CALL, VringFile(0, False)),
            0,
            refused(Request.SET_VRING_CALL, "protocol"),
        ),
        (msg(Request.SET_VRING_CALL, VringFile(0, False)), 1, ok(Request.SET_VRING_CALL)),
        (
            msg(Request.SET_VRING_NUM, VringState(0, 256)),
            1,
            refused(Request.SET_VRING_NUM, "protocol"),
        ),
        # Nothing above mapped anything: the table took the region only now.
        (msg(Request.ADD_MEM_REG, A), 1, ok(Request.ADD_MEM_REG)),
    ],
    "unknown-code": [
        *HANDSHAKE,
        (msg(999, b"\x00" * 8), 0, refused(999, "protocol", "UNKNOWN(999)")),
        (msg(999, b""), 1, refused(999, "protocol", "UNKNOWN(999)")),
        (msg(Request.SET_OWNER), 0, bent(ok(Request.SET_OWNER), "owner-again")),
    ],
    "bad-payload": [
        *HANDSHAKE,
        (msg(Request.ADD_MEM_REG, b"\x00" * 8), 1, refused(Request.ADD_MEM_REG, "decode")),
        (msg(Request.SET_FEATURES, b"\x00" * 4), 0, refused(Request.SET_FEATURES, "decode")),
        (msg(Request.ADD_MEM_REG, A), 1, ok(Request.ADD_MEM_REG)),
    ],
    "framing-oversized": [
        *HANDSHAKE,
        (msg(Request.ADD_MEM_REG, A), 1, ok(Request.ADD_MEM_REG)),
        # A size no request has: the stream cannot be trusted any more.
        (struct.pack("<III", int(Request.ADD_MEM_REG), 0x9, MAX_PAYLOAD_SIZE + 1), 1, FRAMING),
    ],
    "get-vring-base": [
        *HANDSHAKE,
        (msg(Request.SET_VRING_BASE, VringState(1, 7)), 0, ok(Request.SET_VRING_BASE)),
        (
            msg(Request.GET_VRING_BASE, VringState(1, 0)),
            0,
            ok(Request.GET_VRING_BASE, encode_reply(Request.GET_VRING_BASE, VringState(1, 7))),
        ),
        (
            msg(Request.SET_VRING_NUM, VringState(2, 256)),
            0,
            refused(Request.SET_VRING_NUM, "protocol"),
        ),
    ],
}


#: With --strict-protocol every request out of the spec's order is refused, as before there were
#: leniencies: the same bytes as above, answered with StateErrors.
STRICT_CASES: dict[str, list[Step]] = {
    "strict-before-owner": [
        # No REPLY_ACK negotiated yet: a refusal has no ack to send.
        (msg(Request.SET_FEATURES, ACKED_FEATURES), 0, Out("SET_FEATURES", "state", b"")),
        (msg(Request.ADD_MEM_REG, A), 1, Out("ADD_MEM_REG", "state", b"")),
        (
            msg(Request.GET_VRING_BASE, VringState(0, 0), need_reply=False),
            0,
            Out("GET_VRING_BASE", "state", encode_reply(Request.GET_VRING_BASE, b"")),
        ),
        *HANDSHAKE[:3],
        (
            msg(Request.SET_VRING_CALL, VringFile(0, False)),
            1,
            refused(Request.SET_VRING_CALL, "state"),
        ),
        (
            msg(Request.SET_MEM_TABLE, MemoryTable((A.region,))),
            1,
            refused(Request.SET_MEM_TABLE, "state"),
        ),
        (msg(Request.SET_OWNER, need_reply=False), 0, ok(Request.SET_OWNER, b"")),
        (msg(Request.SET_OWNER, need_reply=False), 0, Out("SET_OWNER", "state", b"")),
        (msg(Request.SET_OWNER), 0, refused(Request.SET_OWNER, "state")),
        # owned now: the same SET_MEM_TABLE is served
        (
            msg(Request.SET_MEM_TABLE, MemoryTable((A.region,))),
            1,
            ok(Request.SET_MEM_TABLE),
        ),
    ],
}


def outcome(event: Handled) -> Out:
    deviation = event.deviation.kind if event.deviation is not None else None
    return Out(event.name, None if event.ok else event.error_kind, event.reply, deviation)


def run(
    steps: list[Step], *, bytewise: bool, config: SessionConfig = CONFIG
) -> tuple[list[Out], Session[int], FakeHost]:
    """Feed the steps' messages; return what the session answered, in order."""
    host = FakeHost()
    session: Session[int] = Session(config, host)
    outs: list[Out] = []
    for data, nfds, _ in steps:
        fds = [host.new_fd() for _ in range(nfds)]
        chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
        for i, chunk in enumerate(chunks):
            session.receive_data(chunk, fds if i == 0 else ())
            try:
                while (event := session.next_event()) is not NEED_DATA:
                    assert isinstance(event, Handled)
                    outs.append(outcome(event))
            except FramingError:
                assert session.state is SessionState.ERROR
                assert host.open == {fd for vring in session.vrings for fd in _fds(vring)}
                outs.append(FRAMING)
                return outs, session, host
    return outs, session, host


def _fds(vring: object) -> list[int]:
    return [fd for fd in (getattr(vring, s) for s in ("kick", "call", "err")) if fd is not None]


@pytest.mark.parametrize("bytewise", [True, False], ids=["byte-at-a-time", "whole-messages"])
@pytest.mark.parametrize("name", [*CASES, *STRICT_CASES])
def test_session_table(name: str, bytewise: bool) -> None:
    steps = CASES.get(name) or STRICT_CASES[name]
    outs, session, host = run(
        steps, bytewise=bytewise, config=STRICT if name in STRICT_CASES else CONFIG
    )
    assert outs == [want for _, _, want in steps]
    held = {fd for vring in session.vrings for fd in _fds(vring)}
    assert host.open == held, "an fd is open that nothing in the session holds"
    assert set(host.mapped.values()) == {
        MemoryRegion(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in session.table
    }
    session.close()
    assert host.open == set() and host.mapped == {}


def test_framing_error_ends_the_session() -> None:
    outs, session, host = run(CASES["framing-oversized"], bytewise=True)
    assert outs[-1] == FRAMING
    with pytest.raises(FramingError):
        session.receive_data(msg(Request.GET_FEATURES), [host.new_fd()])
    with pytest.raises(FramingError):
        session.next_event()
    session.close()
    assert host.open == set() and host.mapped == {}


@pytest.mark.parametrize(
    ("spec", "first"),
    [
        # errno= on a request that maps: the host fails the mapping as the kernel would.
        ("ADD_MEM_REG:nth=1:errno=ENOMEM", Out("ADD_MEM_REG", "injected-errno", ack(37, 1))),
        # ack= stops the request before dispatch.
        ("ADD_MEM_REG:nth=1:ack=3", Out("ADD_MEM_REG", "injected", ack(37, 3))),
        # errno= on a request that maps nothing acts like ack=.
        ("SET_VRING_NUM:nth=1:errno=EIO", None),
    ],
)
def test_faults_fire_once_and_leave_the_host_as_it_was(spec: str, first: Out | None) -> None:
    host = FakeHost()
    session: Session[int] = Session(CONFIG, host, FaultPlan([parse_fault(spec)]))
    for data, nfds, want in HANDSHAKE:
        session.receive_data(data, [host.new_fd() for _ in range(nfds)])
        event = session.next_event()
        assert isinstance(event, Handled) and outcome(event) == want
    steps = [(msg(Request.ADD_MEM_REG, A), 1), (msg(Request.ADD_MEM_REG, A), 1)]
    events = []
    for data, nfds in steps:
        session.receive_data(data, [host.new_fd() for _ in range(nfds)])
        event = session.next_event()
        assert isinstance(event, Handled)
        events.append(event)
    if first is None:
        assert [outcome(e) for e in events] == [ok(Request.ADD_MEM_REG), refused(37, "overlap-gpa")]
        session.receive_data(msg(Request.SET_VRING_NUM, VringState(0, 256)))
        event = session.next_event()
        assert isinstance(event, Handled)
        assert outcome(event) == refused(Request.SET_VRING_NUM, "injected")
    else:
        assert [outcome(e) for e in events] == [first, ok(Request.ADD_MEM_REG)]
        assert events[0].injected == spec and events[1].injected is None
    assert session.device.host is host, "the errno decorator outlived its request"
    assert host.open == set() and len(host.mapped) == 1
    session.close()
    assert host.open == set() and host.mapped == {}
