"""Protocol behaviour as tables: bytes and fds in, outcomes and replies out.

The shape of h11's ``tests/test_io.py``: each case is a list of messages the front-end sends
(the bytes and how many fds ride with them) and what the pure session answers (the request, ok
or the refusal's kind, the exact reply bytes). Every case runs twice against a :class:`FakeHost`:
fed one byte at a time (the fds with the message's first byte, where QEMU's ``sendmsg`` puts
them) and fed one message per chunk; both runs must give the table's outcomes. After every
request the only fds open are those the session holds (a refused request's fds are closed before
its reply can go out); at the end the table holds the case's regions, mapped, and when the
session closes no fd stays open and nothing stays mapped. A case runs on its own
``SessionConfig``: the ``strict-`` cases with ``--strict-protocol`` (``strict=True``).

A refusal may name words its text must contain: the numbers and the cause a person reads in the
event log (the session's ``Handled.error`` is the event's ``error``). Sockets play no part here;
``test_robustness.py`` keeps what needs them (fd passing, broken framing ending a connection,
stalls, killed peers).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from vhostmem.errors import FramingError
from vhostmem.events import NEED_DATA, Handled
from vhostmem.faults import FaultPlan, parse_fault
from vhostmem.protocol import (
    MAX_PAYLOAD_SIZE,
    Log,
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
    ``deviation`` the kind of ordering it broke and was served with, if any.

    ``words`` (expected) and ``error`` (what came) take no part in equality: every word of
    ``words`` must be in ``error``.
    """

    name: str
    kind: str | None
    reply: bytes
    deviation: str | None = None
    words: tuple[str, ...] = field(default=(), compare=False)
    error: str = field(default="", compare=False)


#: The framing broke: next_event raises FramingError and the session is in ERROR.
FRAMING = Out("framing", "framing", b"")

Step = tuple[bytes, int, Out]


def ack(request: Request | int, value: int = 0) -> bytes:
    """The REPLY_ACK reply: 0 for success, non-zero for failure."""
    return encode_u64_reply(request, value)


def msg(
    request: Request | int,
    payload: Payload = None,
    *,
    need_reply: bool = True,
    flags: int | None = None,
) -> bytes:
    return encode_request(request, payload, need_reply=need_reply, flags=flags)


def region(gpa: int, size: int, uaddr: int, offset: int = 0) -> MemRegMsg:
    return MemRegMsg(MemoryRegion(gpa, size, uaddr, offset))


def ok(request: Request, reply: bytes | None = None) -> Out:
    """Success; the reply defaults to the zero ack (need_reply with REPLY_ACK negotiated)."""
    return Out(request.name, None, ack(request) if reply is None else reply)


def bent(out: Out, deviation: str = "request-before-owner") -> Out:
    """``out``, for a request served although the spec's order does not allow it."""
    return Out(out.name, out.kind, out.reply, deviation, out.words)


def table(*regions: tuple[int, int, int, int]) -> MemoryTable:
    """A SET_MEM_TABLE payload of ``(gpa, size, uaddr, mmap_offset)`` regions."""
    return MemoryTable(tuple(MemoryRegion(*r) for r in regions))


def refused(
    request: Request | int, kind: str, name: str | None = None, *, words: tuple[str, ...] = ()
) -> Out:
    """A refusal answered with the failure ack; the connection stays."""
    return Out(name or Request(request).name, kind, ack(request, 1), words=words)


def handshake(config: SessionConfig = CONFIG, protocol: int = ACKED_PROTOCOL) -> list[Step]:
    """QEMU's handshake (hw/virtio/vhost-user.c vhost_user_backend_init), acking ``protocol``
    where ``config`` offers it; GET_* have their own reply, the rest a zero ack once REPLY_ACK
    is negotiated (SET_PROTOCOL_FEATURES itself is answered before it takes effect: no reply).
    GET_MAX_MEM_SLOTS is asked only with CONFIGURE_MEM_SLOTS, as QEMU does."""
    acked = protocol & config.protocol_features
    steps: list[Step] = [
        (
            msg(Request.GET_FEATURES, need_reply=False),
            0,
            ok(Request.GET_FEATURES, encode_u64_reply(Request.GET_FEATURES, config.features)),
        ),
        (
            msg(Request.GET_PROTOCOL_FEATURES, need_reply=False),
            0,
            ok(
                Request.GET_PROTOCOL_FEATURES,
                encode_u64_reply(Request.GET_PROTOCOL_FEATURES, config.protocol_features),
            ),
        ),
        (
            msg(Request.SET_PROTOCOL_FEATURES, acked, need_reply=False),
            0,
            ok(Request.SET_PROTOCOL_FEATURES, b""),
        ),
        (
            msg(Request.GET_QUEUE_NUM, need_reply=False),
            0,
            ok(Request.GET_QUEUE_NUM, encode_u64_reply(Request.GET_QUEUE_NUM, config.queues)),
        ),
    ]
    if acked & ProtocolFeature.CONFIGURE_MEM_SLOTS:
        steps.append(
            (
                msg(Request.GET_MAX_MEM_SLOTS, need_reply=False),
                0,
                ok(
                    Request.GET_MAX_MEM_SLOTS,
                    encode_u64_reply(Request.GET_MAX_MEM_SLOTS, config.max_slots),
                ),
            )
        )
    steps += [
        (msg(Request.SET_OWNER), 0, ok(Request.SET_OWNER)),
        (msg(Request.SET_FEATURES, ACKED_FEATURES), 0, ok(Request.SET_FEATURES)),
    ]
    return steps


#: With REPLY_ACK and CONFIGURE_MEM_SLOTS acked.
HANDSHAKE = handshake()
#: QEMU without CONFIGURE_MEM_SLOTS sends whole tables of at most 8 regions.
LEGACY = SessionConfig(mem_slots=False)
#: With LOG_SHMFD acked too: the dirty log is one fd (vhost-user.rst "Dirty pages logging").
LOG_SHMFD = int(ACKED_PROTOCOL | ProtocolFeature.LOG_SHMFD)

A = region(0x1_0000_0000, 2 * MiB, 0x7F00_0000_0000)
B = region(0x1_0020_0000, 2 * MiB, 0x7F00_0020_0000)
UADDR = 0x7F00_0000_0000
U64 = 1 << 64


def raw_table(nregions: int, bodies: int) -> bytes:
    """A SET_MEM_TABLE payload whose nregions field says one thing and the bodies another."""
    body = b"".join(
        struct.pack("<QQQQ", i * 4 * MiB, MiB, UADDR + i * 4 * MiB, 0) for i in range(bodies)
    )
    return struct.pack("<II", nregions, 0) + body


#: Regions that reach 2**64 in one address space (regions.end_fits_u64), and its name.
WRAPPING: list[tuple[str, tuple[int, int, int, int]]] = [
    ("gpa", (U64 - 2 * MiB, 4 * MiB, UADDR, 0)),
    ("uaddr", (0, 4 * MiB, U64 - 2 * MiB, 0)),
    ("mmap_offset", (0, 4 * MiB, UADDR, U64 - 2 * MiB)),
    ("gpa", (1 << 63, 1 << 63 | 4096, UADDR, 0)),
]


@dataclass(frozen=True)
class Case:
    """Messages and what the session answers, on a session offering ``config``; ``table`` is
    the GPAs of the regions left in the table at the end."""

    steps: list[Step]
    config: SessionConfig = CONFIG
    table: tuple[int, ...] = ()


CASES: dict[str, Case] = {
    "handshake": Case(HANDSHAKE),
    "before-owner": Case(
        [
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
                    ok(
                        Request.GET_VRING_BASE,
                        encode_reply(Request.GET_VRING_BASE, VringState(0, 0)),
                    )
                ),
            ),
            *HANDSHAKE[:3],  # feature queries are legal before SET_OWNER: no deviation
            (
                msg(Request.SET_VRING_CALL, VringFile(0, False)),
                1,
                bent(ok(Request.SET_VRING_CALL)),
            ),
            (msg(Request.SET_FEATURES, ACKED_FEATURES), 0, bent(ok(Request.SET_FEATURES))),
            (
                msg(Request.SET_MEM_TABLE, MemoryTable((A.region,))),
                1,
                bent(ok(Request.SET_MEM_TABLE)),
            ),
            # refused for its own reasons: not served, so no deviation
            (msg(Request.ADD_MEM_REG, A), 1, refused(Request.ADD_MEM_REG, "overlap-gpa")),
            (msg(Request.NET_SET_MTU, 1500), 0, refused(Request.NET_SET_MTU, "protocol")),
            (msg(Request.ADD_MEM_REG, B), 1, bent(ok(Request.ADD_MEM_REG))),
            # an unknown code is refused as ever, whatever the state
            (msg(999, b""), 0, refused(999, "protocol", "UNKNOWN(999)")),
            (msg(Request.SET_OWNER), 0, ok(Request.SET_OWNER)),
            # a second SET_OWNER is a no-op, as in libvhost-user and DPDK
            (msg(Request.SET_OWNER), 0, bent(ok(Request.SET_OWNER), "owner-again")),
            (msg(Request.REM_MEM_REG, A), 0, ok(Request.REM_MEM_REG)),
        ],
        table=(B.region.guest_phys_addr,),
    ),
    # With --strict-protocol every request out of the spec's order is refused, as before there
    # were leniencies: the same bytes as above, answered with StateErrors.
    "strict-before-owner": Case(
        [
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
            (msg(Request.SET_MEM_TABLE, MemoryTable((A.region,))), 1, ok(Request.SET_MEM_TABLE)),
        ],
        config=STRICT,
        table=(A.region.guest_phys_addr,),
    ),
    "add-and-remove": Case(
        [
            *HANDSHAKE,
            (msg(Request.ADD_MEM_REG, A), 1, ok(Request.ADD_MEM_REG)),
            (msg(Request.ADD_MEM_REG, B), 1, ok(Request.ADD_MEM_REG)),
            (msg(Request.REM_MEM_REG, A), 0, ok(Request.REM_MEM_REG)),
            (msg(Request.REM_MEM_REG, B), 0, ok(Request.REM_MEM_REG)),
        ]
    ),
    "add-refused": Case(
        [
            *HANDSHAKE,
            (msg(Request.ADD_MEM_REG, A), 1, ok(Request.ADD_MEM_REG)),
            (msg(Request.ADD_MEM_REG, A), 1, refused(Request.ADD_MEM_REG, "overlap-gpa")),
            (
                msg(Request.ADD_MEM_REG, region(0, 2 * MiB, UADDR)),
                1,
                refused(Request.ADD_MEM_REG, "overlap-uaddr"),
            ),
            (
                msg(Request.ADD_MEM_REG, region(0, 0, 0x1000)),
                1,
                refused(Request.ADD_MEM_REG, "bad-region"),
            ),
            # The exclusive end must be a u64 (regions.end_fits_u64): ending at 2**64 is refused.
            (
                msg(Request.ADD_MEM_REG, region(U64 - 2 * MiB, 2 * MiB, 0x1000)),
                1,
                refused(Request.ADD_MEM_REG, "bad-region", words=("2^64",)),
            ),
        ],
        table=(A.region.guest_phys_addr,),
    ),
    "size-zero": Case(
        [
            *HANDSHAKE,
            (
                msg(Request.ADD_MEM_REG, region(0, 0, UADDR)),
                1,
                refused(Request.ADD_MEM_REG, "bad-region", words=("size 0",)),
            ),
            (
                msg(Request.SET_MEM_TABLE, table((0, 0, UADDR, 0))),
                1,
                refused(Request.SET_MEM_TABLE, "bad-region", words=("size 0",)),
            ),
        ]
    ),
    # The exclusive end must be a u64 in every address space (regions.end_fits_u64): refused
    # by ADD_MEM_REG and by SET_MEM_TABLE, naming the space.
    "wrap-past-2-64": Case(
        [
            *HANDSHAKE,
            *(
                step
                for name, numbers in WRAPPING
                for step in (
                    (
                        msg(Request.ADD_MEM_REG, region(*numbers)),
                        1,
                        refused(Request.ADD_MEM_REG, "bad-region", words=("2^64", name)),
                    ),
                    (
                        msg(Request.SET_MEM_TABLE, table(numbers)),
                        1,
                        refused(Request.SET_MEM_TABLE, "bad-region", words=("2^64", name)),
                    ),
                )
            ),
        ]
    ),
    "rem-refused": Case(
        [
            *HANDSHAKE,
            (msg(Request.REM_MEM_REG, A), 0, refused(Request.REM_MEM_REG, "not-found")),
            (msg(Request.ADD_MEM_REG, A), 1, ok(Request.ADD_MEM_REG)),
            # REM matches on (gpa, uaddr, size), as libvhost-user vu_rem_mem_reg does.
            (
                msg(Request.REM_MEM_REG, region(0x1_0000_0000, 2 * MiB, 0x7F00_1000_0000)),
                0,
                refused(Request.REM_MEM_REG, "not-found"),
            ),
            (
                msg(Request.REM_MEM_REG, region(0x1_0000_0000, MiB, UADDR)),
                0,
                refused(Request.REM_MEM_REG, "not-found", words=("0x100000000",)),
            ),
            # With the fd QEMU 5.1 to 7.0 sent: closed unused, even though the REM fails.
            (
                msg(Request.REM_MEM_REG, region(4 * MiB, MiB, UADDR)),
                1,
                refused(Request.REM_MEM_REG, "not-found", words=("0x400000",)),
            ),
            # An fd that comes with REM_MEM_REG is closed unused (vhost-user.rst).
            (msg(Request.REM_MEM_REG, A), 1, ok(Request.REM_MEM_REG)),
        ]
    ),
    "mem-slots-not-negotiated": Case(
        [
            *HANDSHAKE[:2],
            (
                msg(
                    Request.SET_PROTOCOL_FEATURES,
                    int(ProtocolFeature.REPLY_ACK),
                    need_reply=False,
                ),
                0,
                ok(Request.SET_PROTOCOL_FEATURES, b""),
            ),
            (msg(Request.SET_OWNER), 0, ok(Request.SET_OWNER)),
            (msg(Request.ADD_MEM_REG, A), 1, refused(Request.ADD_MEM_REG, "state")),
            (msg(Request.REM_MEM_REG, A), 0, refused(Request.REM_MEM_REG, "state")),
        ]
    ),
    "set-mem-table": Case(
        [
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
        ]
    ),
    # Without CONFIGURE_MEM_SLOTS: one fd per region, the count agreeing with the payload, at
    # most 8 regions; a refused table leaves the old one as it was.
    "legacy-table-refused": Case(
        [
            *handshake(LEGACY),
            (msg(Request.SET_MEM_TABLE, table((0, MiB, UADDR, 0))), 1, ok(Request.SET_MEM_TABLE)),
            *(
                (
                    msg(
                        Request.SET_MEM_TABLE,
                        table(
                            (8 * MiB, MiB, UADDR + 8 * MiB, 0), (12 * MiB, MiB, UADDR + 12 * MiB, 0)
                        ),
                    ),
                    nfds,
                    refused(Request.SET_MEM_TABLE, "protocol", words=("file descriptor",)),
                )
                for nfds in (0, 1, 3, 8)
            ),
            *(
                (
                    msg(Request.SET_MEM_TABLE, raw_table(nregions, bodies)),
                    bodies,
                    refused(Request.SET_MEM_TABLE, "decode"),
                )
                for nregions, bodies in ((3, 2), (1, 2), (0, 1), (9, 9))
            ),
        ],
        config=LEGACY,
        table=(0,),
    ),
    "legacy-slot-limit": Case(
        [
            *handshake(SessionConfig(mem_slots=False, max_slots=2)),
            (msg(Request.SET_MEM_TABLE, table((0, MiB, UADDR, 0))), 1, ok(Request.SET_MEM_TABLE)),
            # QEMU sends up to 8 regions without CONFIGURE_MEM_SLOTS: 3 do not fit in 2 slots.
            (
                msg(
                    Request.SET_MEM_TABLE,
                    table(
                        *((i * 4 * MiB, MiB, UADDR + (1 << 32) + i * 4 * MiB, 0) for i in (1, 2, 3))
                    ),
                ),
                3,
                refused(Request.SET_MEM_TABLE, "slot-limit"),
            ),
        ],
        config=SessionConfig(mem_slots=False, max_slots=2),
        table=(0,),
    ),
    "fd-counts": Case(
        [
            *HANDSHAKE,
            *(
                (
                    msg(Request.ADD_MEM_REG, A),
                    nfds,
                    refused(
                        Request.ADD_MEM_REG,
                        "protocol",
                        words=(f"came with {nfds} file descriptor",),
                    ),
                )
                for nfds in (0, 2, 200)
            ),
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
        table=(A.region.guest_phys_addr,),
    ),
    "unknown-code": Case(
        [
            *HANDSHAKE,
            (msg(999, b"\x00" * 8), 0, refused(999, "protocol", "UNKNOWN(999)")),
            (msg(999, b""), 1, refused(999, "protocol", "UNKNOWN(999)")),
            # Wire bytes are never a format string.
            (msg(200, b"%s%n"), 1, refused(200, "protocol", "UNKNOWN(200)", words=("200",))),
            # Without NEED_REPLY: no reply at all, its fds closed all the same.
            (msg(201, b"\x00" * 16, need_reply=False), 2, Out("UNKNOWN(201)", "protocol", b"")),
            # A known request vhostmem does not implement, with the fd it carries.
            (
                msg(Request.SET_BACKEND_REQ_FD),
                1,
                refused(Request.SET_BACKEND_REQ_FD, "protocol", words=("not implemented",)),
            ),
            (msg(Request.SET_OWNER), 0, bent(ok(Request.SET_OWNER), "owner-again")),
        ]
    ),
    "header-flags": Case(
        [
            *HANDSHAKE,
            *(
                (
                    msg(Request.ADD_MEM_REG, A, flags=flags),
                    1,
                    refused(Request.ADD_MEM_REG, "protocol", words=(words,)),
                )
                for flags, words in ((0x2 | 0x8, "version"), (0x8, "version"), (0xD, "REPLY"))
            ),
        ]
    ),
    "bad-payload": Case(
        [
            *HANDSHAKE,
            (msg(Request.ADD_MEM_REG, b"\x00" * 8), 1, refused(Request.ADD_MEM_REG, "decode")),
            (msg(Request.SET_FEATURES, b"\x00" * 4), 0, refused(Request.SET_FEATURES, "decode")),
            # Payloads shorter than their type, each named with the size it had.
            *(
                (
                    msg(request, b"\x00" * size),
                    nfds,
                    refused(request, "decode", words=(f"got {size}",)),
                )
                for request, size, nfds in (
                    (Request.ADD_MEM_REG, 12, 1),
                    (Request.ADD_MEM_REG, 0, 1),  # a header whose size is 0
                    (Request.SET_VRING_NUM, 4, 0),
                    (Request.SET_FEATURES, 7, 0),
                )
            ),
            # The memory table's own framing: 8 + 32 * n bytes.
            (msg(Request.SET_MEM_TABLE, b"\1\0\0\0"), 0, refused(Request.SET_MEM_TABLE, "decode")),
            # A size no request has, within MAX_PAYLOAD_SIZE: read it all, refuse it, go on.
            (
                msg(Request.SET_FEATURES, b"\xaa" * MAX_PAYLOAD_SIZE),
                0,
                refused(Request.SET_FEATURES, "decode"),
            ),
            (msg(Request.ADD_MEM_REG, A), 1, ok(Request.ADD_MEM_REG)),
        ],
        table=(A.region.guest_phys_addr,),
    ),
    "framing-oversized": Case(
        [
            *HANDSHAKE,
            (msg(Request.ADD_MEM_REG, A), 1, ok(Request.ADD_MEM_REG)),
            # A size no request has: the stream cannot be trusted any more.
            (struct.pack("<III", int(Request.ADD_MEM_REG), 0x9, MAX_PAYLOAD_SIZE + 1), 1, FRAMING),
        ],
        table=(A.region.guest_phys_addr,),
    ),
    "vrings": Case(
        [
            *HANDSHAKE,
            (msg(Request.SET_VRING_BASE, VringState(1, 7)), 0, ok(Request.SET_VRING_BASE)),
            (
                msg(Request.GET_VRING_BASE, VringState(1, 0)),
                0,
                ok(Request.GET_VRING_BASE, encode_reply(Request.GET_VRING_BASE, VringState(1, 7))),
            ),
            # The device has 2 vrings (one queue pair).
            (
                msg(Request.SET_VRING_NUM, VringState(2, 256)),
                0,
                refused(Request.SET_VRING_NUM, "protocol", words=("out of range",)),
            ),
            (
                msg(Request.SET_VRING_KICK, VringFile(7, False)),
                1,
                refused(Request.SET_VRING_KICK, "protocol", words=("out of range",)),
            ),
            # GET_VRING_BASE has its own reply: an empty one, which QEMU takes as a failure.
            (
                msg(Request.GET_VRING_BASE, VringState(200, 0)),
                0,
                Out("GET_VRING_BASE", "protocol", encode_reply(Request.GET_VRING_BASE, b"")),
            ),
        ]
    ),
    "features-not-offered": Case(
        [
            *HANDSHAKE,
            (
                msg(Request.SET_PROTOCOL_FEATURES, ACKED_PROTOCOL | ProtocolFeature.BACKEND_REQ),
                0,
                refused(Request.SET_PROTOCOL_FEATURES, "protocol", words=("BACKEND_REQ",)),
            ),
            # REPLY_ACK stays negotiated: the next refusal is acked too.
            (
                msg(Request.SET_FEATURES, int(VirtioFeature.VERSION_1 | (1 << 15))),
                0,
                refused(Request.SET_FEATURES, "protocol", words=("did not offer",)),
            ),
        ]
    ),
    # SET_LOG_BASE with LOG_SHMFD gets a reply whatever its flags (QEMU vhost_user_set_log_base
    # waits for one); a refused log maps nothing and leaves no fd.
    "dirty-log": Case(
        [
            *handshake(protocol=LOG_SHMFD),
            (
                msg(Request.SET_LOG_BASE, Log(0, 0), need_reply=False),
                1,
                refused(Request.SET_LOG_BASE, "protocol", words=("mmap_size 0x0", "0 bytes")),
            ),
            (
                msg(Request.SET_LOG_BASE, Log(0x1000, 0), need_reply=False),
                0,
                refused(
                    Request.SET_LOG_BASE,
                    "protocol",
                    words=("without a file descriptor", "mmap_size 0x1000"),
                ),
            ),
            # SET_LOG_FD: the eventfd is closed; vhostmem marks the log and signals nothing.
            (msg(Request.SET_LOG_FD), 1, ok(Request.SET_LOG_FD)),
            # RARP is offered only with a data path (--tap).
            (
                msg(Request.SEND_RARP, 1),
                0,
                refused(Request.SEND_RARP, "state", words=("RARP", "not negotiated")),
            ),
            (msg(Request.SET_VRING_ENABLE, VringState(0, 1)), 0, ok(Request.SET_VRING_ENABLE)),
        ]
    ),
    "log-base-without-log-shmfd": Case(
        [
            *HANDSHAKE,
            (
                msg(Request.SET_LOG_BASE, Log(0x1000, 0)),
                1,
                refused(Request.SET_LOG_BASE, "state", words=("LOG_SHMFD",)),
            ),
            (msg(Request.SET_VRING_ENABLE, VringState(0, 1)), 0, ok(Request.SET_VRING_ENABLE)),
        ]
    ),
}


def outcome(event: Handled) -> Out:
    kind = None if event.ok else event.error_kind
    deviation = event.deviation.kind if event.deviation is not None else None
    return Out(event.name, kind, event.reply, deviation, error=event.error or "")


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
                    # Before its reply can go out, a request's fds are mapped, held or closed.
                    assert host.open == held_fds(session), f"{event.name} left an fd open"
            except FramingError:
                assert session.state is SessionState.ERROR
                assert host.open == held_fds(session)
                outs.append(FRAMING)
                return outs, session, host
    return outs, session, host


def held_fds(session: Session[int]) -> set[int]:
    """The fds the session holds after a request: the vrings' eventfds."""
    return {
        fd
        for vring in session.vrings
        for fd in (vring.kick, vring.call, vring.err)
        if fd is not None
    }


@pytest.mark.parametrize("bytewise", [True, False], ids=["byte-at-a-time", "whole-messages"])
@pytest.mark.parametrize("name", list(CASES))
def test_session_table(name: str, bytewise: bool) -> None:
    case = CASES[name]
    outs, session, host = run(case.steps, bytewise=bytewise, config=case.config)
    wants = [want for _, _, want in case.steps]
    assert outs == wants
    for got, want in zip(outs, wants, strict=True):
        for word in want.words:
            assert word in got.error, f"{got.name}: {word!r} not in {got.error!r}"
    assert host.open == held_fds(session), "an fd is open that nothing in the session holds"
    assert tuple(r.gpa for r in session.table) == case.table
    assert set(host.mapped.values()) == {
        MemoryRegion(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in session.table
    }
    assert session.device.log is None  # no case maps a dirty log
    session.close()
    assert host.open == set() and host.mapped == {}


def test_framing_error_ends_the_session() -> None:
    outs, session, host = run(CASES["framing-oversized"].steps, bytewise=True)
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
