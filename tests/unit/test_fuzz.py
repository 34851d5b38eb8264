"""Fuzzing the decoder and the sans-IO session, and replaying the regression corpus.

Strategies build message sequences the way QEMU sends them (handshake, then memory-table and
vring requests, each with its fds) and mutate them: the size field, flags, request code, payload
fields, truncation, extra bytes, fd counts, order (lists come in any order) and how the stream is
cut into ``receive_data`` chunks. What must hold for every example:

* ``protocol`` decoders raise nothing but ``DecodeError``, encoders nothing but ``EncodeError``;
* ``Session.receive_data``/``next_event`` raise nothing but ``FramingError``, and only
  with the session in ``ERROR``;
* every reply is one QEMU accepts (flags 0x5, the request's code, size = payload length); a
  request with its own reply always gets one; a failed request with NEED_REPLY under REPLY_ACK
  gets a non-zero u64, a successful one 0; nothing else is answered;
* a failed request leaves the region table as it was (DESIGN.md section 4);
* after every step the fds open are exactly those the session owns (vring slots and fds waiting
  for their message), every live mapping belongs to a region of the table, and after ``close()``
  nothing is held: checked with ``FakeHost`` (no double close, no use of a closed fd) and with the
  real ``ShellHost(Mapper())`` on memfds (/proc/self/fd and the shared maps).

Bounded so the suite stays fast: few examples and ``derandomize`` (the same examples in every
run, so CI is stable). ``VHOSTMEM_FUZZ_EXAMPLES=N`` runs N random examples per test instead.

Regression corpus: ``tests/vectors/fuzz/NAME.hex`` holds one ``receive_data`` chunk per line,
``FDS HEX`` where FDS is ``-`` (no fds) or one letter per fd: ``a``/``b``/``c`` the same three
memfds every time (dup'ed: SET_MEM_TABLE can see an unchanged region), ``m`` a fresh 16 MiB
memfd, ``e`` an eventfd. ``NAME.json`` says why the case is kept, the session config, fault
rules, and what must come out (request names with ok/failed, whether the framing breaks).
Failing examples print their corpus lines (``note``), so saving one is a copy and paste.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from vhostmem.errors import FramingError
from vhostmem.events import NEED_DATA, Handled
from vhostmem.faults import FaultPlan, parse_fault
from vhostmem.mapping import Mapper
from vhostmem.protocol import (
    HAS_OWN_REPLY,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    Config,
    DecodeError,
    EncodeError,
    Header,
    Log,
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    Payload,
    ProtocolFeature,
    Request,
    VirtioFeature,
    VringAddress,
    VringFile,
    VringState,
    decode_header,
    decode_message,
    decode_payload,
    decode_reply_payload,
    encode_reply,
    encode_request,
)
from vhostmem.server import ShellHost
from vhostmem.session import Session, SessionConfig, SessionState
from vhostmem.testing.frontend import make_memfd

from .helpers.fakes import FakeHost
from .helpers.leaks import live_fds, open_fds, shared_maps

MiB = 1 << 20
U64 = 1 << 64
MEMFD_SIZE = 16 * MiB
CORPUS = Path(__file__).parent.parent / "vectors" / "fuzz"

_LONG = int(os.environ.get("VHOSTMEM_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int) -> settings:
    """Bounded and repeatable in the suite (no shrinking: a failure prints its corpus lines
    as found); random, longer and shrunk with VHOSTMEM_FUZZ_EXAMPLES."""
    phases = list(Phase) if _LONG else [p for p in Phase if p not in (Phase.shrink, Phase.explain)]
    return settings(
        max_examples=_LONG or examples,
        deadline=None,
        derandomize=not _LONG,
        database=None,
        phases=phases,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )


# ---------------------------------------------------------------------------------------------
# strategies: values


def _grid(base: int) -> st.SearchStrategy[int]:
    """Mostly a small grid (so REM finds what ADD put, and regions overlap), sometimes extremes."""
    small = st.integers(0, 7).map(lambda i: base + i * 2 * MiB)
    extreme = st.sampled_from([U64 - 2 * MiB, U64 - 4096, 1 << 63, U64 - 1])
    return st.one_of(small, small, small, extreme)


GPAS = _grid(0)
UADDRS = _grid(0x7F00_0000_0000)
SIZES = st.sampled_from([2 * MiB, 2 * MiB, 4 * MiB, 4096, 0, MEMFD_SIZE, U64 - 1, 1 << 63])
OFFSETS = st.one_of(
    st.sampled_from([0, 0, 2 * MiB, 8 * MiB, 14 * MiB, MEMFD_SIZE]),
    st.sampled_from([U64 - 2 * MiB, 1 << 63]),
)
#: QEMU-like: slot i is 2 MiB at gpa i*2M, uaddr base+i*2M, file offset i*2M (disjoint, valid).
SLOT_REGIONS = st.integers(0, 7).map(
    lambda i: MemoryRegion(i * 2 * MiB, 2 * MiB, 0x7F00_0000_0000 + i * 2 * MiB, i * 2 * MiB)
)
REGIONS = st.one_of(
    SLOT_REGIONS, SLOT_REGIONS, st.builds(MemoryRegion, GPAS, SIZES, UADDRS, OFFSETS)
)
U64S = st.one_of(st.integers(0, 3), st.integers(0, U64 - 1))
VRING_INDEX = st.one_of(st.integers(0, 1), st.integers(0, 1), st.integers(0, 4))
OFFERED_PROTOCOL = int(
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.STATUS
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
)
QEMU_PROTOCOL = int(
    ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS
)
FEATURES = int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)
CONFIGS = {
    "default": SessionConfig(),
    "slots2": SessionConfig(max_slots=2),
    "legacy": SessionConfig(mem_slots=False),
    "legacy-slots4": SessionConfig(mem_slots=False, max_slots=4),
    "queues2": SessionConfig(queues=2),
    "strict": SessionConfig(strict=True),
}
FAULTS = [
    "ADD_MEM_REG:nth=2:errno=ENOMEM",
    "SET_MEM_TABLE:every:errno=EINVAL",
    "*:nth=4:ack=7",
    "REM_MEM_REG:every:delay=1s",
    "*:nth=6:disconnect",
]


# ---------------------------------------------------------------------------------------------
# strategies: messages


@dataclass(frozen=True)
class Msg:
    """One message as it goes on the wire, with the fds sent beside it (FDS letters)."""

    data: bytes
    fds: str = ""


def _msg(
    request: Request | int, payload: Payload = None, need_reply: bool = False, fds: str = ""
) -> Msg:
    return Msg(encode_request(request, payload, need_reply=need_reply), fds)


FD_LETTERS = st.sampled_from("aabcme")


@st.composite
def valid_messages(draw: st.DrawFn) -> Msg:
    """One well-formed request of the kinds QEMU sends (and a few it does not)."""
    need_reply = draw(st.booleans())
    kind = draw(
        st.sampled_from(
            [
                "get",
                "set-proto",
                "set-features",
                "status",
                "add",
                "add",
                "add",
                "rem",
                "rem",
                "table",
                "table",
                "vring-state",
                "vring-addr",
                "vring-file",
                "reset",
                "other",
            ]
        )
    )
    if kind == "get":
        request = draw(
            st.sampled_from(
                [
                    Request.GET_FEATURES,
                    Request.GET_PROTOCOL_FEATURES,
                    Request.GET_QUEUE_NUM,
                    Request.GET_MAX_MEM_SLOTS,
                    Request.GET_STATUS,
                    Request.SET_OWNER,
                ]
            )
        )
        return _msg(request, None, need_reply)
    if kind == "set-proto":
        value = draw(st.one_of(st.just(QEMU_PROTOCOL), st.just(OFFERED_PROTOCOL), U64S))
        return _msg(Request.SET_PROTOCOL_FEATURES, value, need_reply)
    if kind == "set-features":
        return _msg(Request.SET_FEATURES, draw(st.one_of(st.just(FEATURES), U64S)), need_reply)
    if kind == "status":
        return _msg(Request.SET_STATUS, draw(st.one_of(st.integers(0, 255), U64S)), need_reply)
    if kind == "add":
        return _msg(Request.ADD_MEM_REG, MemRegMsg(draw(REGIONS)), need_reply, draw(FD_LETTERS))
    if kind == "rem":
        fds = draw(st.sampled_from(["", "", "", "m"]))
        return _msg(Request.REM_MEM_REG, MemRegMsg(draw(REGIONS)), need_reply, fds)
    if kind == "table":
        regions = tuple(
            draw(
                st.lists(
                    REGIONS,
                    max_size=draw(st.sampled_from([3, 8])),
                    unique_by=lambda r: r.guest_phys_addr,
                )
            )
        )
        fds = "".join(draw(FD_LETTERS) for _ in regions)
        return _msg(Request.SET_MEM_TABLE, MemoryTable(regions), need_reply, fds)
    if kind == "vring-state":
        request = draw(
            st.sampled_from(
                [
                    Request.SET_VRING_NUM,
                    Request.SET_VRING_BASE,
                    Request.GET_VRING_BASE,
                    Request.SET_VRING_ENABLE,
                ]
            )
        )
        num = draw(st.one_of(st.sampled_from([0, 1, 256, 32768, 32769]), st.integers(0, 2**32 - 1)))
        return _msg(request, VringState(draw(VRING_INDEX), num), need_reply)
    if kind == "vring-addr":
        desc, used, avail = (draw(UADDRS) for _ in range(3))
        return _msg(
            Request.SET_VRING_ADDR,
            VringAddress(draw(VRING_INDEX), 0, desc, used, avail, 0),
            need_reply,
        )
    if kind == "vring-file":
        request = draw(
            st.sampled_from([Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR])
        )
        nofd = draw(st.booleans())
        return _msg(request, VringFile(draw(VRING_INDEX), nofd), need_reply, "" if nofd else "e")
    if kind == "reset":
        return _msg(
            draw(st.sampled_from([Request.RESET_DEVICE, Request.RESET_OWNER])), None, need_reply
        )
    # requests vhostmem does not implement, unknown codes, and ones that carry fds
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return _msg(Request.SET_LOG_FD, None, need_reply, "e")
    if choice == 1:
        return _msg(Request.SET_LOG_BASE, Log(MiB, 0), need_reply, draw(st.sampled_from(["", "m"])))
    if choice == 2:
        return _msg(Request.GET_CONFIG, Config(0, 4, 0, b"\0" * 4), need_reply)
    if choice == 3:
        return _msg(Request.SET_BACKEND_REQ_FD, None, need_reply, "e")
    code = draw(st.one_of(st.integers(44, 300), st.integers(0, 2**32 - 1)))
    return _msg(code, draw(st.binary(max_size=64)), need_reply, draw(st.sampled_from(["", "m"])))


def _with_header(data: bytes, **fields: int) -> bytes:
    head = dict(
        zip(
            ("request", "flags", "size"),
            (int.from_bytes(data[i : i + 4], "little") for i in (0, 4, 8)),
            strict=True,
        )
    )
    head.update(fields)
    return (
        b"".join(head[k].to_bytes(4, "little") for k in ("request", "flags", "size"))
        + data[HEADER_SIZE:]
    )


@st.composite
def mutate(draw: st.DrawFn, msg: Msg) -> Msg:
    """One change to a message: header fields, payload bytes, length, fds."""
    data, fds = msg.data, msg.fds
    payload_len = len(data) - HEADER_SIZE
    choices = ["truncate", "extend", "fds", "fds"]
    if payload_len >= 0:
        choices += ["size", "flags", "code", "byte", "field"]
    how = draw(st.sampled_from(choices))
    if how == "size":
        size = draw(
            st.one_of(
                st.sampled_from([0, MAX_PAYLOAD_SIZE, MAX_PAYLOAD_SIZE + 1, 2**32 - 1]),
                st.integers(max(0, payload_len - 16), payload_len + 16),
                st.integers(0, 2**32 - 1),
            )
        )
        data = _with_header(data, size=size)
    elif how == "flags":
        flags = draw(
            st.one_of(
                st.sampled_from([0, 0x2, 0x3, 0x5, 0x8, 0x9, 0xD, 0x4]), st.integers(0, 2**32 - 1)
            )
        )
        data = _with_header(data, flags=flags)
    elif how == "code":
        code = draw(
            st.one_of(st.sampled_from([int(r) for r in Request]), st.integers(0, 2**32 - 1))
        )
        data = _with_header(data, request=code)
    elif how == "byte" and payload_len:
        at = HEADER_SIZE + draw(st.integers(0, payload_len - 1))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    elif how == "field" and payload_len >= 8:
        at = HEADER_SIZE + 8 * draw(st.integers(0, payload_len // 8 - 1))
        value = draw(st.sampled_from([0, 1, 8, 9, 0xFF, U64 - 1, 1 << 63, 2**32]))
        data = data[:at] + value.to_bytes(8, "little") + data[at + 8 :]
    elif how == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif how == "extend":
        data = data + draw(st.binary(min_size=1, max_size=40))
    elif how == "fds":
        fds = "".join(draw(st.lists(FD_LETTERS, max_size=10)))
    return Msg(data, fds)


@st.composite
def messages(draw: st.DrawFn) -> Msg:
    msg = draw(valid_messages())
    if draw(st.integers(0, 9)) < 3:
        for _ in range(draw(st.integers(1, 2))):
            msg = draw(mutate(msg))
    return msg


def handshake(reply_ack: bool = True) -> list[Msg]:
    """QEMU 10's opening (shared/vectors/; FakeFrontend.handshake), REPLY_ACK asked for or not:
    features, SET_OWNER, a call and an err eventfd for each ring, rings disabled."""
    wanted = QEMU_PROTOCOL if reply_ack else int(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    msgs = [
        _msg(Request.GET_FEATURES),
        _msg(Request.GET_PROTOCOL_FEATURES),
        _msg(Request.SET_PROTOCOL_FEATURES, wanted),
        _msg(Request.GET_QUEUE_NUM),
        _msg(Request.GET_MAX_MEM_SLOTS),
        _msg(Request.SET_OWNER),
        _msg(Request.GET_FEATURES),
    ]
    for index in range(2):
        msgs.append(_msg(Request.SET_VRING_CALL, VringFile(index, False), fds="e"))
        msgs.append(_msg(Request.SET_VRING_ERR, VringFile(index, False), fds="e"))
    for index in range(2):
        msgs.append(_msg(Request.SET_VRING_ENABLE, VringState(index, 0), need_reply=reply_ack))
    msgs.append(_msg(Request.SET_FEATURES, FEATURES))
    return msgs


@dataclass
class Case:
    """One run: config, fault rules, and the chunks as ``receive_data`` gets them."""

    config: str = "default"
    faults: list[str] = field(default_factory=list)
    chunks: list[tuple[bytes, str]] = field(default_factory=list)

    def corpus_lines(self) -> str:
        return "\n".join(f"{fds or '-'} {data.hex()}" for data, fds in self.chunks)


@st.composite
def cases(draw: st.DrawFn, *, with_faults: bool = False) -> Case:
    config = draw(st.sampled_from(sorted(CONFIGS)))
    msgs: list[Msg] = []
    opening = draw(st.sampled_from(["qemu", "qemu", "qemu", "no-ack", "none"]))
    if opening != "none":
        msgs += handshake(reply_ack=opening == "qemu")
    msgs += draw(st.lists(messages(), min_size=1, max_size=20))
    chunks: list[tuple[bytes, str]] = []
    for msg in msgs:
        how = draw(st.sampled_from(["whole", "whole", "whole", "split", "glue"]))
        if how == "split" and len(msg.data) > 1:
            cuts = sorted(
                set(draw(st.lists(st.integers(1, len(msg.data) - 1), min_size=1, max_size=3)))
            )
            pieces = [
                msg.data[a:b] for a, b in zip([0, *cuts], [*cuts, len(msg.data)], strict=True)
            ]
            chunks.append((pieces[0], msg.fds))
            chunks += [(p, "") for p in pieces[1:]]
        elif how == "glue" and chunks:
            # the stream may deliver two messages in one read; the fds go with the first byte
            data, fds = chunks.pop()
            chunks.append((data + msg.data, fds + msg.fds))
        else:
            chunks.append((msg.data, msg.fds))
    faults = draw(st.lists(st.sampled_from(FAULTS), max_size=2, unique=True)) if with_faults else []
    return Case(config, faults, chunks)


# ---------------------------------------------------------------------------------------------
# running a case against a host


def session_fds(session: Session[Any]) -> set[int]:
    """The fds the session owns: vring slots and fds waiting for their message."""
    held = {fd for v in session.vrings for fd in (v.kick, v.call, v.err) if fd is not None}
    held |= set(session._received.held_fds())
    return held


class FakeHarness:
    """FakeHost: fds are numbers; ``a``/``b``/``c`` share a file identity."""

    def __init__(self) -> None:
        self.host = FakeHost()

    def make_fds(self, letters: str) -> list[int]:
        ids = {"a": (7, 1), "b": (7, 2), "c": (7, 3)}
        return [self.host.new_fd(ids.get(letter)) for letter in letters]

    def check_step(self, session: Session[Any]) -> None:
        assert self.host.open == session_fds(session), "fds open that the session does not own"
        assert set(self.host.mapped) == {r.handle for r in session.table}, (
            "mapping outside the table"
        )

    def finish(self, session: Session[Any]) -> None:
        session.close()
        assert self.host.open == set(), f"fds left open after close: {self.host.open}"
        assert self.host.mapped == {}, f"mappings left after close: {self.host.mapped}"


class RealHarness:
    """ShellHost(Mapper()) with real memfds and eventfds; checks /proc/self/fd and maps."""

    def __init__(self) -> None:
        self.fds_before = open_fds()
        self.maps_before = shared_maps()
        self.mapper = Mapper()
        self.host = ShellHost(self.mapper)
        self.shared = {letter: make_memfd(MEMFD_SIZE, name=f"fuzz-{letter}") for letter in "abc"}
        self.baseline = live_fds()

    def make_fds(self, letters: str) -> list[int]:
        fds = []
        for letter in letters:
            if letter in self.shared:
                fds.append(os.dup(self.shared[letter]))
            elif letter == "e":
                fds.append(os.eventfd(0, os.EFD_CLOEXEC))
            else:
                fds.append(make_memfd(MEMFD_SIZE, name="fuzz-m"))
        return fds

    def check_step(self, session: Session[Any]) -> None:
        extra = live_fds() - self.baseline
        owned = session_fds(session)
        assert owned <= extra, f"the session holds fds that are closed: {owned - extra}"
        # each live mapping holds stdlib mmap's dup of its fd (Mapping.fds_held)
        assert len(extra - owned) == self.mapper.stats.fds_held, (
            f"fds open that neither the session nor a mapping owns: {sorted(extra - owned)}"
        )
        live = {id(m) for m in self.mapper.mappings()}
        assert live == {id(r.handle) for r in session.table}, "mapping outside the table"

    def finish(self, session: Session[Any]) -> None:
        session.close()
        self.mapper.close()
        for fd in self.shared.values():
            os.close(fd)
        assert open_fds() == self.fds_before, "fds leaked"
        assert shared_maps() == self.maps_before, "shared mappings leaked"


Harness = FakeHarness | RealHarness


def check_reply(ev: Handled, reply_ack: bool, log_shmfd: bool = False) -> None:
    """The reply is one QEMU's vhost_user_read_header/process_message_reply accept.

    With LOG_SHMFD negotiated (``log_shmfd``) SET_LOG_BASE is always answered with a u64,
    whatever its flags (hw/virtio/vhost-user.c vhost_user_set_log_base waits for one).
    """
    if ev.reply:
        header = decode_header(ev.reply[:HEADER_SIZE])
        assert header.flags == 0x5, f"{ev.name}: reply flags 0x{header.flags:x}"
        assert int(header.request) == int(ev.request), f"{ev.name}: reply to another request"
        assert header.size == len(ev.reply) - HEADER_SIZE, f"{ev.name}: reply size field lies"
    if ev.disconnect:
        assert ev.reply == b"", f"{ev.name}: a reply on a connection about to close"
    elif ev.request in HAS_OWN_REPLY:
        assert ev.reply, f"{ev.name} always gets its own reply, ok or not"
    elif ev.request == Request.SET_LOG_BASE and log_shmfd:
        assert len(ev.reply) == HEADER_SIZE + 8, f"{ev.name}: LOG_SHMFD makes it answer a u64"
        value = int.from_bytes(ev.reply[HEADER_SIZE:], "little")
        assert (value == 0) == ev.ok, f"{ev.name}: ack {value} for ok={ev.ok} ({ev.error})"
    elif ev.header.need_reply and reply_ack:
        assert len(ev.reply) == HEADER_SIZE + 8, f"{ev.name}: NEED_REPLY under REPLY_ACK gets a u64"
        value = int.from_bytes(ev.reply[HEADER_SIZE:], "little")
        assert (value == 0) == ev.ok, f"{ev.name}: ack {value} for ok={ev.ok} ({ev.error})"
    else:
        assert ev.reply == b"", f"{ev.name}: a reply nobody waits for"
    if ev.ok:
        assert ev.error is None
    else:
        assert ev.error and ev.error.startswith(ev.name), ev.error
        assert isinstance(ev.error_kind, str) and ev.error_kind


def table_snapshot(session: Session[Any]) -> list[tuple[Any, ...]]:
    return [(r.gpa, r.size, r.uaddr, r.mmap_offset, id(r.handle)) for r in session.table]


@dataclass
class Outcome:
    results: list[tuple[str, bool]] = field(default_factory=list)
    framing_error: str | None = None
    disconnected: bool = False


def run_case(case: Case, harness: Harness) -> Outcome:
    """Feed the chunks as the shell would; check every invariant after every step."""
    faults = FaultPlan()
    for spec in case.faults:
        faults.add(parse_fault(spec))
    # The handle is the harness's (a number, or a Mapping): the checks below take either.
    session: Session[Any] = Session(
        CONFIGS[case.config], harness.host, faults if case.faults else None
    )
    out = Outcome()
    try:
        for data, letters in case.chunks:
            fds = harness.make_fds(letters)
            try:
                session.receive_data(data, fds)
            except FramingError:
                assert session.state is SessionState.ERROR
                harness.check_step(session)
                continue
            while True:
                reply_ack = session.negotiated_reply_ack
                log_shmfd = bool(session.acked_protocol_features & ProtocolFeature.LOG_SHMFD)
                before = table_snapshot(session)
                try:
                    ev = session.next_event()
                except FramingError as err:
                    assert session.state is SessionState.ERROR
                    out.framing_error = out.framing_error or str(err)
                    break
                if ev is NEED_DATA:
                    break
                assert isinstance(ev, Handled)
                assert session.state in (SessionState.AWAIT_OWNER, SessionState.OWNED)
                if reply_ack == session.negotiated_reply_ack:
                    check_reply(ev, reply_ack, log_shmfd)
                if not ev.ok:
                    assert table_snapshot(session) == before, (
                        f"failed {ev.name} changed the table: {ev.error}"
                    )
                out.results.append((ev.name, ev.ok))
                harness.check_step(session)
                if ev.disconnect:
                    out.disconnected = True
                    return out
            harness.check_step(session)
        return out
    finally:
        harness.finish(session)


# ---------------------------------------------------------------------------------------------
# the fuzz tests


@fuzz_settings(300)
@given(cases())
def test_session_fuzz_fake_host(case: Case) -> None:
    note(f"config={case.config}\n{case.corpus_lines()}")
    run_case(case, FakeHarness())


@fuzz_settings(250)
@given(cases())
def test_session_fuzz_real_memfds(case: Case) -> None:
    note(f"config={case.config}\n{case.corpus_lines()}")
    run_case(case, RealHarness())


@fuzz_settings(150)
@given(cases(with_faults=True))
def test_session_fuzz_with_fault_rules(case: Case) -> None:
    note(f"config={case.config} faults={case.faults}\n{case.corpus_lines()}")
    run_case(case, FakeHarness())


@fuzz_settings(60)
@given(st.data())
def test_session_fuzz_byte_at_a_time_equals_whole(data: st.DataObject) -> None:
    """However the stream is cut, the session handles the same requests the same way."""
    msgs = handshake() + data.draw(st.lists(messages(), min_size=1, max_size=8))
    whole = Case(chunks=[(m.data, m.fds) for m in msgs])
    split = Case(chunks=[])
    for m in msgs:
        split.chunks.append((m.data[:1], m.fds))
        split.chunks += [(m.data[i : i + 1], "") for i in range(1, len(m.data))]
    assert run_case(whole, FakeHarness()).results == run_case(split, FakeHarness()).results


# -- decoder ------------------------------------------------------------------------------------

CODES = st.one_of(st.sampled_from(list(Request)), st.integers(0, 2**32 - 1))


@fuzz_settings(400)
@given(st.binary(max_size=40))
def test_decode_header_only_decode_error(data: bytes) -> None:
    if len(data) == HEADER_SIZE:
        header = decode_header(data)
        assert isinstance(header, Header)
        # every byte decoded into its field: the three u32s pack back to the same 12 bytes
        assert struct.pack("<III", int(header.request), header.flags, header.size) == data
        known = {int(r) for r in Request}
        assert isinstance(header.request, Request) == (int(header.request) in known)
    else:
        with pytest.raises(DecodeError):
            decode_header(data)


@fuzz_settings(300)
@given(CODES, st.one_of(st.binary(max_size=300), st.binary(min_size=4000, max_size=4200)))
def test_decode_payload_only_decode_error(code: Request | int, payload: bytes) -> None:
    for decode in (decode_payload, decode_reply_payload):
        try:
            decode(code, payload)
        except DecodeError as err:
            assert err.raw == payload
            # "<the request>: <what is wrong>", then the raw bytes
            named, colon, why = err.msg.partition(": ")
            assert colon and why.strip(), err.msg
            assert (code.name if isinstance(code, Request) else str(code)) in named, err.msg
            assert str(err).startswith(err.msg)
            assert f"(raw {len(payload)} bytes: {payload[:64].hex()})" in str(err)


@fuzz_settings(400)
@given(messages())
def test_decode_mutated_messages_only_decode_error(msg: Msg) -> None:
    try:
        header, _ = decode_message(msg.data)
    except DecodeError:
        return
    assert header.size == len(msg.data) - HEADER_SIZE


PAYLOADS: st.SearchStrategy[tuple[Request, Payload]] = st.one_of(
    st.tuples(st.just(Request.ADD_MEM_REG), st.builds(MemRegMsg, REGIONS)),
    st.tuples(
        st.just(Request.SET_MEM_TABLE),
        st.builds(MemoryTable, st.lists(REGIONS, max_size=8).map(tuple)),
    ),
    st.tuples(
        st.just(Request.SET_VRING_NUM),
        st.builds(VringState, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    ),
    st.tuples(
        st.just(Request.SET_VRING_CALL), st.builds(VringFile, st.integers(0, 255), st.booleans())
    ),
    st.tuples(st.just(Request.SET_FEATURES), st.integers(0, U64 - 1)),
    st.tuples(
        st.just(Request.SET_VRING_ADDR),
        # index and flags are u32 on the wire, the four addresses u64
        st.builds(
            VringAddress,
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
            *(st.integers(0, U64 - 1) for _ in range(4)),
        ),
    ),
)


@fuzz_settings(300)
@given(PAYLOADS, st.booleans())
def test_valid_payloads_round_trip(item: tuple[Request, Payload], need_reply: bool) -> None:
    request, payload = item
    data = encode_request(request, payload, need_reply=need_reply)  # every field in range
    header, decoded = decode_message(data)
    assert header.request is request and header.need_reply == need_reply
    assert decoded == payload


BAD_INTS = st.one_of(st.integers(-(2**65), 2**65), st.sampled_from([-1, U64, 2**32, -(2**63)]))


@fuzz_settings(300)
@given(
    st.one_of(
        st.tuples(
            st.just(Request.ADD_MEM_REG),
            st.builds(
                lambda *v: MemRegMsg(MemoryRegion(*v)), BAD_INTS, BAD_INTS, BAD_INTS, BAD_INTS
            ),
        ),
        st.tuples(st.just(Request.SET_VRING_NUM), st.builds(VringState, BAD_INTS, BAD_INTS)),
        st.tuples(st.just(Request.SET_FEATURES), BAD_INTS),
        st.tuples(st.just(Request.SET_VRING_KICK), st.builds(VringFile, BAD_INTS, st.booleans())),
    ),
    st.one_of(st.none(), BAD_INTS),
)
def test_encoders_only_encode_error(item: tuple[Request, Payload], flags: int | None) -> None:
    """Out-of-range values are refused with EncodeError (nothing else); in-range ones encode
    and decode back to themselves."""
    request, payload = item
    payload_fits = payload_in_range(payload)
    flags_fit = flags is None or 0 <= flags < 2**32
    if payload_fits and flags_fit:
        data = encode_request(request, payload, flags=flags)
        header, decoded = decode_message(data)
        assert header.request is request and decoded == payload
        if flags is not None:
            assert header.flags == flags
    else:
        with pytest.raises(EncodeError):
            encode_request(request, payload, flags=flags)
    if payload_fits:
        reply = encode_reply(request, payload)
        assert decode_header(reply[:HEADER_SIZE]).flags == 0x5
        assert len(reply) == len(encode_request(request, payload))  # the same payload bytes
        assert reply[HEADER_SIZE:] == encode_request(request, payload)[HEADER_SIZE:]
    else:
        with pytest.raises(EncodeError):
            encode_reply(request, payload)


def payload_in_range(payload: Payload) -> bool:
    """Whether every field of the payloads ``test_encoders_only_encode_error`` draws fits."""

    def u(bits: int, *values: int) -> bool:
        return all(0 <= v < 1 << bits for v in values)

    match payload:
        case MemRegMsg(region=r):
            return u(64, r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        case VringState(index=index, num=num):
            return u(32, index, num)
        case VringFile(index=index):
            return 0 <= index <= 0xFF  # bits 0-7; bit 8 is NOFD
        case int():
            return u(64, payload)
    raise AssertionError(f"no range rule for {payload!r}")


# -- the regression corpus ----------------------------------------------------------------------


def load_vector(path: Path) -> tuple[Case, dict[str, Any]]:
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    chunks = []
    for line in path.read_text(encoding="ascii").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        letters, _, hexdata = line.partition(" ")
        chunks.append((bytes.fromhex(hexdata), "" if letters == "-" else letters))
    return Case(meta.get("config", "default"), list(meta.get("faults", [])), chunks), meta


def corpus() -> Iterator[Any]:
    for path in sorted(CORPUS.glob("*.hex")):
        yield pytest.param(path, id=path.stem)


def test_corpus_is_not_empty() -> None:
    assert len(list(corpus())) >= 10
    for path in CORPUS.glob("*.hex"):
        assert path.with_suffix(".json").exists(), f"{path.name} has no .json beside it"


@pytest.mark.parametrize("path", list(corpus()))
@pytest.mark.parametrize("harness", [FakeHarness, RealHarness], ids=["fake", "real"])
def test_corpus_replays(path: Path, harness: Callable[[], Harness]) -> None:
    """Each kept case: the fuzz's invariants, plus the outcome written beside it (``results``:
    one "NAME ok|failed" per request; ``results_real`` where the real mapper refuses what a fake
    host maps)."""
    case, meta = load_vector(path)
    out = run_case(case, harness())
    expect = meta["expect"]
    wanted = expect["results"]
    if harness is RealHarness:
        wanted = expect.get("results_real", wanted)
    assert [f"{name} {'ok' if ok else 'failed'}" for name, ok in out.results] == wanted, meta["why"]
    assert (out.framing_error is not None) == expect["framing_error"], out.framing_error
    assert out.disconnected == expect.get("disconnect", False)


# -- SET_MEM_TABLE's whole-table check agrees with adding one by one --------------------------

_SMALL = st.integers(min_value=0, max_value=64).map(lambda n: n * 0x1000)
_ENTRY = st.tuples(_SMALL, _SMALL, _SMALL, _SMALL) | st.tuples(
    st.sampled_from([0, (1 << 64) - 0x1000]), _SMALL, _SMALL, _SMALL
)


@given(st.lists(_ENTRY, max_size=9), st.integers(min_value=1, max_value=8))
def test_check_table_agrees_with_adding_one_by_one(
    entries: list[tuple[int, int, int, int]], max_slots: int
) -> None:
    from vhostmem.errors import TableError
    from vhostmem.regions import Region, RegionTable

    def kind_of(check: Callable[[], None]) -> str | None:
        try:
            check()
        except TableError as err:
            return err.kind
        return None

    def one_by_one() -> None:
        scratch: RegionTable[None] = RegionTable(max_slots)
        for entry in entries:
            scratch.add(Region(*entry, handle=None))

    # The whole-table check refuses exactly what adding one by one refuses, with its words.
    assert kind_of(lambda: RegionTable(max_slots).check_table(entries)) == kind_of(one_by_one)
