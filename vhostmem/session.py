"""The sans-IO vhost-user session: bytes and file descriptors in, one ``Handled`` per request out.

Theory of operation
-------------------
Rule 1: everything that decides whether a request is legal lives in this file, in
:data:`TRANSITIONS` and the handlers below it (the way h11 keeps its whole state machine in
``_state.py``).

One :class:`Session` serves one front-end connection. The shell feeds it whatever the socket
gave (``receive_data(data, fds)``) and then calls :meth:`Session.next_event` until it returns
:data:`~vhostmem.events.NEED_DATA`. Each call decodes one message, acts on it and returns a
:class:`~vhostmem.events.Handled` carrying the reply bytes; the shell sends them. The session
never awaits, never touches a socket and never maps memory: it asks its :class:`Host` (the
shell) to map a region, unmap it or close an fd, so unit tests can hand it a fake host.

File descriptors arrive beside bytes (SCM_RIGHTS); the
:class:`~vhostmem.receive_buffer.ReceiveBuffer` gives each message the fds that belong to it.
Every fd is owned by exactly one place at a time: the receive buffer, a vring slot, a mapping
(through the host), or it is closed. :meth:`Session.close` releases everything still held.

States (:class:`SessionState`): ``AWAIT_OWNER`` until SET_OWNER, ``OWNED`` after it. Feature
queries are legal before SET_OWNER because QEMU asks them first (shared/vectors/); everything
touching the device needs an owner. An illegal request is answered (a failure ack when one is
due) and recorded, not fatal. Only broken framing (a size no payload can have) moves the session
to ``ERROR``, after which every call raises :class:`~vhostmem.errors.FramingError`.

Replies follow QEMU's checks (hw/virtio/vhost-user.c ``vhost_user_read_header``,
``process_message_reply``): flags exactly 0x5, the same request code, u64 replies of size 8.
A request with its own reply (GET_*) gets only that; any other request with NEED_REPLY, once
REPLY_ACK is negotiated, gets a u64: 0 for success, 1 for failure.

Memory-table semantics (DESIGN.md section 4): a failed ADD_MEM_REG leaves nothing mapped and
nothing in the table; a failed REM_MEM_REG leaves the region; SET_MEM_TABLE replaces the table by
difference, mapping every new region before it unmaps an old one, and is all-or-nothing until
the old regions are unmapped; the table survives RESET_DEVICE and ring stop/start and is dropped
only by :meth:`Session.close`.

The table tells the truth about what is mapped: an unmap that fails (the kernel's munmap, or a
view still in use) leaves its region in the table, marked with the reason
(:attr:`~vhostmem.regions.Region.unmap_failed`), and is tried again by the next REM_MEM_REG of
that region, the next SET_MEM_TABLE or :meth:`Session.close`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, final

from vhostmem.errors import FramingError, MappingError, RequestRefused, StateError, TableError
from vhostmem.events import NEED_DATA, Handled, NeedData, TableChange
from vhostmem.faults import Fault, FaultPlan
from vhostmem.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAG_VERSION,
    FLAG_VERSION_MASK,
    HAS_OWN_REPLY,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    DecodeError,
    Header,
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
    decode_payload,
    encode_reply,
    encode_u64_reply,
    fd_bounds,
    request_name,
)
from vhostmem.receive_buffer import ReceiveBuffer
from vhostmem.regions import Identity, Region, RegionTable, identity
from vhostmem.virtqueue import MAX_QUEUE_SIZE

__all__ = ["TRANSITIONS", "Host", "Session", "SessionConfig", "SessionState"]


class Host(Protocol):
    """What the session needs from its shell: the only way it reaches the operating system."""

    def map_region(
        self, request: str, region: MemoryRegion, fd: int, fail_errno: int | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Map ``region`` from ``fd``; always consumes ``fd``.

        ``fail_errno`` makes the mapping step fail as if the kernel returned it (fault
        injection), so the whole diagnosis runs.

        Returns:
            The mapping handle and what to report about the backing (kind, page size, ...).

        Raises:
            MappingError: with the whole diagnosis as its text.
        """

    def unmap_region(self, handle: Any) -> None:
        """Release a mapping made by :meth:`map_region`.

        Raises:
            MappingError: the mapping is still there (the kernel refused munmap, or a view of
                it is in use); calling again with the same handle tries again.
        """

    def close_fd(self, fd: int) -> None:
        """Close a file descriptor the session owns."""

    def file_id(self, fd: int) -> tuple[int, int] | None:
        """``(st_dev, st_ino)`` of the file behind ``fd``, ``None`` if it cannot be told."""


class SessionState(enum.Enum):
    """Where a connection is in its life."""

    #: Connected; feature queries only until SET_OWNER.
    AWAIT_OWNER = "await-owner"
    #: SET_OWNER received: every request may come.
    OWNED = "owned"
    #: Framing broke; the connection must close.
    ERROR = "error"
    #: :meth:`Session.close` ran; everything is released.
    CLOSED = "closed"


#: Requests legal before SET_OWNER: QEMU negotiates features first (vhost_user_backend_init).
_BEFORE_OWNER = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.SET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_MAX_MEM_SLOTS,
        Request.SET_OWNER,
    }
)

#: TRANSITIONS[state][request] -> next state. A miss is a StateError, answered with a failure.
TRANSITIONS: dict[SessionState, dict[Request, SessionState]] = {
    SessionState.AWAIT_OWNER: {
        request: (SessionState.OWNED if request is Request.SET_OWNER else SessionState.AWAIT_OWNER)
        for request in _BEFORE_OWNER
    },
    SessionState.OWNED: {
        request: SessionState.OWNED for request in Request if request is not Request.SET_OWNER
    },
}

#: Requests that map memory: the only ones an injected errno can fail in the mapping step.
_MAPPING_REQUESTS = frozenset({Request.SET_MEM_TABLE, Request.ADD_MEM_REG})

# Plain-int copies of the feature bits tested per request (IntFlag arithmetic is slow).
_REPLY_ACK = int(ProtocolFeature.REPLY_ACK)
_CONFIGURE_MEM_SLOTS = int(ProtocolFeature.CONFIGURE_MEM_SLOTS)

_ENDED = frozenset({SessionState.ERROR, SessionState.CLOSED})
# Header flags checked per request: version (bits 0-1) must be 1, REPLY (bit 2) must be clear;
# anything else goes to _check_header for the words.
_HEADER_CHECK_MASK = FLAG_VERSION_MASK | FLAG_REPLY
#: The success acks, encoded once.
_ACKS: dict[Request, bytes] = {r: encode_u64_reply(r, 0) for r in Request}


@final
@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What the back-end offers; set from the command line.

    Attributes:
        queues: queue pairs (GET_QUEUE_NUM); the device has ``2 * queues`` vrings.
        max_slots: GET_MAX_MEM_SLOTS answer and table capacity. Below 509 QEMU's virtio-mem
            silently uses one memslot for the whole device (hw/mem/memory-device.c).
        mem_slots: offer CONFIGURE_MEM_SLOTS; without it QEMU sends whole SET_MEM_TABLEs.
        net: a data path is attached (``--tap``): offer what it implements (MRG_RXBUF,
            EVENT_IDX); without it the rings are accepted and pass no traffic.
    """

    queues: int = 1
    max_slots: int = 509
    mem_slots: bool = True
    net: bool = False

    @property
    def features(self) -> int:
        """Virtio feature bits offered in GET_FEATURES."""
        offered = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
        if self.net:
            offered |= VirtioFeature.NET_F_MRG_RXBUF | VirtioFeature.RING_F_EVENT_IDX
        return int(offered)

    @property
    def protocol_features(self) -> int:
        """Protocol feature bits offered in GET_PROTOCOL_FEATURES."""
        offered = (
            ProtocolFeature.MQ
            | ProtocolFeature.REPLY_ACK
            | ProtocolFeature.RESET_DEVICE
            | ProtocolFeature.STATUS
        )
        if self.mem_slots:
            offered |= ProtocolFeature.CONFIGURE_MEM_SLOTS
        return int(offered)

    @property
    def vrings(self) -> int:
        """Number of virtqueues of the device (rx + tx per queue pair)."""
        return 2 * self.queues


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
class Session:
    """One front-end connection's protocol state, without I/O.

    Args:
        config: what to offer.
        host: the shell's services (map, unmap, close).
        faults: injection rules (shared by the process's sessions), or ``None``.
    """

    def __init__(self, config: SessionConfig, host: Host, faults: FaultPlan | None = None) -> None:
        self.config = config
        self.host = host
        self.faults = faults
        self._fail_errno: int | None = None
        self.state = SessionState.AWAIT_OWNER
        # The offer never changes; IntFlag arithmetic in SessionConfig.features is slow.
        self._features_reply = encode_u64_reply(Request.GET_FEATURES, config.features)
        #: TRANSITIONS of the current state, looked up once per state change, not per request.
        self._allowed = TRANSITIONS[self.state]
        self.table = RegionTable(config.max_slots)
        self.vrings = [Vring(i) for i in range(config.vrings)]
        self.acked_features = 0
        self.acked_protocol_features = 0
        #: REPLY_ACK negotiated; kept as a bool because every request asks.
        self.negotiated_reply_ack = False
        self.status = 0
        self.requests = 0
        self._received = ReceiveBuffer()
        self._header: Header | None = None  # decoded header of the message in hand
        self._seq = 0

    # -- feeding ----------------------------------------------------------------------------

    def receive_data(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Buffer bytes (and the fds that came with them) from the front-end.

        The session owns ``fds`` from now on.

        Raises:
            FramingError: the session is already in ``ERROR`` or ``CLOSED``.
        """
        if self.state in _ENDED:
            for fd in fds:
                self.host.close_fd(fd)
            raise FramingError(f"session is {self.state.value}; no more data accepted")
        self._received.feed(data, fds)

    @property
    def bytes_wanted(self) -> int:
        """How many more bytes complete the message in hand (the header first)."""
        have = len(self._received)
        if have < HEADER_SIZE:
            return HEADER_SIZE - have
        header = self._header_in_hand()
        return max(1, HEADER_SIZE + min(header.size, MAX_PAYLOAD_SIZE) - have)

    def _header_in_hand(self) -> Header:
        # Decoded once per message: the shell asks bytes_wanted and then next_event.
        if self._header is None:
            self._header = decode_header(self._received.peek(HEADER_SIZE))
        return self._header

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handled (a partial message)."""
        return len(self._received)

    # -- the loop ----------------------------------------------------------------------------

    def next_event(self) -> Handled | NeedData:
        """Handle the next complete message.

        Returns:
            One :class:`Handled` per request, or ``NEED_DATA``.

        Raises:
            FramingError: the framing is broken; the connection must close (the session
                has released every fd it held for unhandled messages).
        """
        if self.state in _ENDED:
            raise FramingError(f"session is {self.state.value}")
        have = len(self._received)
        if have < HEADER_SIZE:
            return NEED_DATA
        header = self._header_in_hand()
        size = header.size
        if size > MAX_PAYLOAD_SIZE:
            self._fail_framing(
                f"{request_name(header.request)} header announces a {size}-byte payload; no "
                f"request is larger than {MAX_PAYLOAD_SIZE} bytes, so the stream cannot be "
                "trusted any more"
            )
        total = HEADER_SIZE + size
        if have < total:
            return NEED_DATA
        raw, fds = self._received.extract(total, skip=HEADER_SIZE)
        self._header = None
        self.requests += 1
        return self._handle(header, raw, fds)

    def _fail_framing(self, why: str) -> None:
        self._set_state(SessionState.ERROR)
        for fd in self._received.clear():
            self.host.close_fd(fd)
        raise FramingError(why)

    # -- dispatch ---------------------------------------------------------------------------

    def _handle(self, header: Header, raw: bytes, fds: list[int]) -> Handled:
        request = header.request
        payload: Payload | None = None
        nfds = len(fds)
        fault: Fault | None = None
        try:
            try:
                if header.flags & _HEADER_CHECK_MASK != FLAG_VERSION:
                    self._check_header(header)
                try:
                    payload = decode_payload(request, raw)
                except DecodeError as err:
                    raise RequestRefused(str(err), kind="decode") from err
                if self.faults:
                    fault = self.faults.match(request_name(request))
                    if fault is not None and (fault.disconnect or fault.ack is not None):
                        return self._injected(header, payload, fds, fault)
                # An unknown plain-int code misses in the Request-keyed tables (see fd_bounds).
                next_state = self._allowed.get(request)  # type: ignore[arg-type]
                if next_state is None:
                    self._refuse_in_state(request)
                low, high = fd_bounds(request, payload)
                if not low <= nfds <= high:
                    self._refuse_fds(low, high, nfds, payload)
                # looked up outside the handler's own errors (trio-websocket's KeyError pitfall)
                handler = _HANDLERS.get(request)  # type: ignore[arg-type]
                if handler is None:
                    raise RequestRefused(
                        f"{request_name(request)} is not implemented by vhostmem (no feature that "
                        "would allow it was offered)"
                    )
                if fault is not None:
                    self._fail_errno = fault.errno
                    if fault.errno is not None and request not in _MAPPING_REQUESTS:
                        return self._injected(header, payload, fds, fault)
                result = handler(self, header, payload, fds)
            except BaseException:
                # Whatever the handler did not take ownership of is closed here.
                for fd in fds:
                    self.host.close_fd(fd)
                raise
        except _Incomplete as done:
            return self._failure(
                header,
                payload,
                done.error,
                nfds,
                fault=fault,
                change=done.change,
                notes=done.notes,
            )
        except RequestRefused as err:
            return self._failure(header, payload, err, nfds, fault=fault)
        finally:
            self._fail_errno = None
        if next_state is not self.state:
            self._set_state(next_state)
        reply, change, notes = result
        if not reply and header.flags & FLAG_NEED_REPLY and self.negotiated_reply_ack:
            reply = _ACKS[request]  # type: ignore[index]  # only known requests get here
        # Positional: keywords cost more per call, and every request builds one.
        return Handled(
            request,
            header,
            payload,
            reply,
            True,
            None,
            None,
            change,
            notes,
            nfds,
            None,
            None if fault is None else fault.spec,
            0.0 if fault is None else fault.delay,
        )

    def _set_state(self, state: SessionState) -> None:
        self.state = state
        self._allowed = TRANSITIONS.get(state, {})

    def _injected(
        self, header: Header, payload: Payload | None, fds: list[int], fault: Fault
    ) -> Handled:
        """A rule fired that stops the request from being handled at all."""
        nfds = len(fds)
        while fds:
            self.host.close_fd(fds.pop())
        if fault.disconnect:
            return Handled(
                request=header.request,
                header=header,
                payload=payload,
                reply=b"",
                ok=False,
                error=f"{request_name(header.request)}: injected disconnect ({fault.spec})",
                error_kind="injected",
                nfds=nfds,
                injected=fault.spec,
                disconnect=True,
            )
        err = RequestRefused(
            f"injected failure ({fault.spec}); the request was not handled",
            kind="injected",
            ack=fault.ack or 1,
        )
        return self._failure(header, payload, err, nfds, fault=fault)

    def _failure(
        self,
        header: Header,
        payload: Payload | None,
        err: RequestRefused,
        nfds: int,
        *,
        fault: Fault | None = None,
        change: TableChange | None = None,
        notes: tuple[str, ...] = (),
    ) -> Handled:
        request = header.request
        reply = b""
        if request in HAS_OWN_REPLY:
            # The front-end waits for this reply; an empty payload is what QEMU treats as a
            # failed answer (e.g. GET_CONFIG "size 0 = error") instead of hanging.
            reply = encode_reply(request, b"")
        elif header.need_reply and self.negotiated_reply_ack:
            reply = encode_u64_reply(request, err.ack)
        text = str(err)
        name = request_name(request)
        if text.startswith(name):  # the mapping layer names the request itself
            text = text[len(name) :].lstrip(": ")
        return Handled(
            request=request,
            header=header,
            payload=payload,
            reply=reply,
            ok=False,
            error=f"{name}: {text}",
            error_kind=err.kind,
            change=change,
            notes=notes,
            nfds=nfds,
            details=err.details,
            injected=fault.spec if fault else None,
            delay=fault.delay if fault else 0.0,
        )

    def _check_header(self, header: Header) -> None:
        if header.version != 1:
            raise RequestRefused(
                f"header flags 0x{header.flags:x} carry version {header.version}; vhost-user "
                "version 1 is the only one"
            )
        if header.is_reply:
            raise RequestRefused(
                f"header flags 0x{header.flags:x} have the REPLY bit set on a request"
            )

    def _refuse_in_state(self, request: Request | int) -> NoReturn:
        """Say why ``request`` is not in the current state's transitions."""
        if not isinstance(request, Request):
            raise RequestRefused(f"unknown request code {int(request)}")
        if self.state is SessionState.AWAIT_OWNER:
            raise StateError("is not allowed before SET_OWNER", self.state.value, "SET_OWNER first")
        raise StateError(
            "came again: the session already has an owner",
            self.state.value,
            "one SET_OWNER per connection",
        )

    def _refuse_fds(self, low: int, high: int, nfds: int, payload: Payload | None) -> NoReturn:
        want = f"{low}" if low == high else f"{low} to {high}"
        raise RequestRefused(
            f"came with {nfds} file descriptor(s); it takes {want}"
            + (" (NOFD bit set)" if isinstance(payload, VringFile) and payload.nofd else "")
        )

    # -- feature negotiation ----------------------------------------------------------------

    def _get_features(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        return self._features_reply, None, ()

    def _set_features(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        value = _u64(payload)
        extra = value & ~self.config.features
        if extra:
            raise RequestRefused(
                f"features 0x{value:x} include 0x{extra:x}, which vhostmem did not offer "
                f"(offered 0x{self.config.features:x})"
            )
        self.acked_features = value
        if not value & VirtioFeature.PROTOCOL_FEATURES:
            # Without PROTOCOL_FEATURES rings start enabled (vhost-user.rst "Ring states").
            for vring in self.vrings:
                vring.enabled = True
        return b"", None, ()

    def _get_protocol_features(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        return encode_u64_reply(header.request, self.config.protocol_features), None, ()

    def _set_protocol_features(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        value = _u64(payload)
        extra = value & ~self.config.protocol_features
        if extra:
            names = [f.name or hex(f.value) for f in ProtocolFeature if f.value & extra]
            raise RequestRefused(
                f"protocol features 0x{value:x} include {', '.join(names) or hex(extra)} "
                f"(0x{extra:x}), which vhostmem did not offer "
                f"(offered 0x{self.config.protocol_features:x})"
            )
        self.acked_protocol_features = value
        self.negotiated_reply_ack = bool(value & _REPLY_ACK)
        return b"", None, ()

    def _get_queue_num(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        return encode_u64_reply(header.request, self.config.queues), None, ()

    def _get_max_mem_slots(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        return encode_u64_reply(header.request, self.config.max_slots), None, ()

    def _set_owner(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        return b"", None, ()

    def _reset(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        # RESET_DEVICE (and the deprecated RESET_OWNER) stop the rings but keep the memory table:
        # QEMU does not resend unchanged regions afterwards (vhost_user_reset_device leaves its
        # shadow table alone), so dropping ours would lose them.
        for vring in self.vrings:
            vring.started = False
            vring.enabled = False
            vring.base = 0
        self.status = 0
        return b"", None, ()

    def _set_status(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        self.status = _u64(payload) & 0xFF
        return b"", None, ()

    def _get_status(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        return encode_u64_reply(header.request, self.status), None, ()

    def _refuse_protocol_feature(self, feature: ProtocolFeature, request: Request) -> NoReturn:
        """Say that ``request`` needs ``feature``; the caller made the bit test (inline, since
        ADD/REM_MEM_REG are the hot path and a method call per request costs more)."""
        raise StateError(
            f"{request.name} needs protocol feature {feature.name}, which was not negotiated",
            self.state.value,
            f"{feature.name} in SET_PROTOCOL_FEATURES",
        )

    # -- memory table -------------------------------------------------------------------------

    def _new_region(
        self,
        region: MemoryRegion,
        handle: Any,
        info: dict[str, Any],
        file_id: tuple[int, int] | None,
    ) -> Region:
        self._seq += 1
        return Region(
            region.guest_phys_addr,
            region.memory_size,
            region.userspace_addr,
            region.mmap_offset,
            file_id,
            info,
            handle,
            self._seq,
        )

    def _map(
        self, request: Request, region: MemoryRegion, fd: int, file_id: tuple[int, int] | None
    ) -> Region:
        handle, info = self.host.map_region(request.name, region, fd, self._fail_errno)
        return self._new_region(region, handle, info, file_id)

    def _add_mem_reg(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        if not self.acked_protocol_features & _CONFIGURE_MEM_SLOTS:
            self._refuse_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS, Request.ADD_MEM_REG)
        assert isinstance(payload, MemRegMsg)
        wire = payload.region
        table = self.table
        table.check_add(*_numbers(wire))
        fd = fds.pop()
        region = self._map(Request.ADD_MEM_REG, wire, fd, self.host.file_id(fd))
        table.insert(region)
        notes = self._ring_notes_after_change()
        return b"", TableChange((), (region,), ()), notes

    def _rem_mem_reg(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        if not self.acked_protocol_features & _CONFIGURE_MEM_SLOTS:
            self._refuse_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS, Request.REM_MEM_REG)
        assert isinstance(payload, MemRegMsg)
        # vhost-user.rst: "If a file descriptor is passed, the back-end MUST close it without
        # using it otherwise." QEMU 5.1-7.0 sent one.
        while fds:
            self.host.close_fd(fds.pop())
        wire = payload.region
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
        return b"", TableChange((region,), (), ()), notes

    def _set_mem_table(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        assert isinstance(payload, MemoryTable)
        wanted = payload.regions
        # Validate the new table on its own first: nothing is mapped until it is consistent.
        # The resulting table must fit in max_slots: refuse before anything is mapped.
        self.table.check_table([_numbers(wire) for wire in wanted])
        current: dict[Identity, Region] = {}
        # A region an earlier unmap left mapped cannot be kept: its mapping may be half torn
        # down (Mapping.close released it before munmap failed). It goes, with another try.
        doomed: list[Region] = []
        for region in self.table:
            if region.unmap_failed is None:
                current[region.identity] = region
            else:
                doomed.append(region)
        kept: list[Region] = []
        added: list[Region] = []
        try:
            for wire in wanted:  # fd i belongs to region i (the count was checked)
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
        change = TableChange(
            removed=removed,
            added=tuple(added),
            kept=tuple(kept),
        )
        notes = self._ring_notes_after_change()
        if still:
            notes += (
                f"still mapped after an earlier failed unmap: {_stuck_text(still, 'earlier')}",
            )
        if stuck:
            # The new table is in force (every new region is mapped and translates), yet the
            # request did not do all it asks: memory the front-end dropped is still mapped here,
            # so its pages stay allocated. vhost-user.rst (REPLY_ACK): the back-end replies
            # "zero on success or non-zero on failure", so it is a failure ack. QEMU logs it
            # ("vhost_set_mem_table failed", hw/virtio/vhost.c vhost_commit; reference/
            # vhost-user-facts.md 1.8) and goes on with its new table, so the two sides stay in
            # step; the error and the event say which regions stayed mapped and why.
            raise _Incomplete(
                MappingError(
                    f"the new table is in force, but {_stuck_text(stuck)}; the next "
                    "SET_MEM_TABLE or the end of the connection tries again",
                    kind=next(err.kind for _, err in failures if err is not None),
                    details={"unmap_failed": [region.as_json() for region in stuck]},
                ),
                change,
                notes,
            )
        return b"", change, notes

    def _unmap(self, region: Region) -> MappingError | None:
        """Unmap ``region``; on failure mark it (:attr:`Region.unmap_failed`) and return why."""
        try:
            self.host.unmap_region(region.handle)
        except MappingError as err:
            region.unmap_failed = str(err)
            return err
        region.unmap_failed = None
        return None

    # -- vrings -------------------------------------------------------------------------------

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RequestRefused(
                f"vring index {index} is out of range: the device has {len(self.vrings)} "
                f"vrings (--queues {self.config.queues})"
            )
        return self.vrings[index]

    def _set_vring_num(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        assert isinstance(payload, VringState)
        vring = self._vring(payload.index)
        if not 0 < payload.num <= MAX_QUEUE_SIZE:
            raise RequestRefused(
                f"vring {payload.index} size {payload.num} is not in 1..{MAX_QUEUE_SIZE}"
            )
        vring.num = payload.num
        return b"", None, ()

    def _set_vring_base(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        assert isinstance(payload, VringState)
        self._vring(payload.index).base = payload.num
        return b"", None, ()

    def _get_vring_base(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        assert isinstance(payload, VringState)
        vring = self._vring(payload.index)
        # GET_VRING_BASE stops the ring (vhost-user.rst "Ring states").
        vring.started = False
        return encode_reply(header.request, VringState(vring.index, vring.base)), None, ()

    def _set_vring_addr(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        assert isinstance(payload, VringAddress)
        self._vring(payload.index).addr = payload
        return b"", None, ()

    def _set_vring_enable(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        assert isinstance(payload, VringState)
        vring = self._vring(payload.index)
        if payload.num not in (0, 1):
            raise RequestRefused(f"SET_VRING_ENABLE num must be 0 or 1, got {payload.num}")
        vring.enabled = bool(payload.num)
        return b"", None, ()

    def _set_vring_fd(self, header: Header, payload: Payload, fds: list[int]) -> _Result:
        assert isinstance(payload, VringFile)
        vring = self._vring(payload.index)
        slot = {
            Request.SET_VRING_KICK: "kick",
            Request.SET_VRING_CALL: "call",
            Request.SET_VRING_ERR: "err",
        }[
            header.request  # type: ignore[index]
        ]
        old = getattr(vring, slot)
        new = fds.pop() if fds else None
        setattr(vring, slot, new)
        if old is not None:
            self.host.close_fd(old)
        notes: tuple[str, ...] = ()
        if slot == "kick":
            # A ring starts when its kick arrives (vhost-user.rst "Ring states").
            vring.started = True
            notes = self._check_ring(vring)
        return b"", None, notes

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

    def _rings_in(self, region: Region) -> tuple[str, ...]:
        notes = []
        for vring in self.vrings:
            addr = vring.addr
            if vring.started and addr is not None:
                for uaddr in (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr):
                    if region.uaddr <= uaddr < region.uaddr_end:
                        notes.append(
                            f"running vring {vring.index} lies in removed region {region.describe()}"
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

    def close(self) -> tuple[Region, ...]:
        """Release every mapping and fd the session holds; idempotent.

        Returns:
            The regions that were in the table (:attr:`RegionTable.unreleased` included), each
            unmapped, or still mapped with :attr:`Region.unmap_failed` saying why.
        """
        if self.state is SessionState.CLOSED:
            return ()
        self._set_state(SessionState.CLOSED)
        gone = self.table.clear()
        for region in gone:
            self._unmap(region)  # each one tried; a failure is marked on it, nothing skipped
        for vring in self.vrings:
            for slot in ("kick", "call", "err"):
                fd = getattr(vring, slot)
                if fd is not None:
                    setattr(vring, slot, None)
                    self.host.close_fd(fd)
        for fd in self._received.clear():
            self.host.close_fd(fd)
        return gone


_Result = tuple[bytes, TableChange | None, tuple[str, ...]]


class _Incomplete(Exception):
    """A handler changed the table yet failed: the failure reply carries the change."""

    def __init__(self, error: MappingError, change: TableChange, notes: tuple[str, ...]) -> None:
        super().__init__(str(error))
        self.error = error
        self.change = change
        self.notes = notes


def _stuck_text(regions: list[Region], which: str = "old") -> str:
    """Words for regions whose unmap failed: how many, each region, then its reason."""
    parts = [
        f"region {region.describe()} stays mapped: {region.unmap_failed}" for region in regions
    ]
    return f"{len(regions)} {which} region(s) could not be unmapped ({'; '.join(parts)})"


def _numbers(wire: MemoryRegion) -> tuple[int, int, int, int]:
    """A wire region's (gpa, size, uaddr, mmap_offset), the order the table takes them in."""
    return (wire.guest_phys_addr, wire.memory_size, wire.userspace_addr, wire.mmap_offset)


def _u64(payload: Payload) -> int:
    assert isinstance(payload, int)
    return payload


_HANDLERS: dict[Request, Callable[[Session, Header, Payload, list[int]], _Result]] = {
    Request.GET_FEATURES: Session._get_features,
    Request.SET_FEATURES: Session._set_features,
    Request.GET_PROTOCOL_FEATURES: Session._get_protocol_features,
    Request.SET_PROTOCOL_FEATURES: Session._set_protocol_features,
    Request.GET_QUEUE_NUM: Session._get_queue_num,
    Request.GET_MAX_MEM_SLOTS: Session._get_max_mem_slots,
    Request.SET_OWNER: Session._set_owner,
    Request.RESET_OWNER: Session._reset,
    Request.RESET_DEVICE: Session._reset,
    Request.SET_STATUS: Session._set_status,
    Request.GET_STATUS: Session._get_status,
    Request.SET_MEM_TABLE: Session._set_mem_table,
    Request.ADD_MEM_REG: Session._add_mem_reg,
    Request.REM_MEM_REG: Session._rem_mem_reg,
    Request.SET_VRING_NUM: Session._set_vring_num,
    Request.SET_VRING_BASE: Session._set_vring_base,
    Request.GET_VRING_BASE: Session._get_vring_base,
    Request.SET_VRING_ADDR: Session._set_vring_addr,
    Request.SET_VRING_ENABLE: Session._set_vring_enable,
    Request.SET_VRING_KICK: Session._set_vring_fd,
    Request.SET_VRING_CALL: Session._set_vring_fd,
    Request.SET_VRING_ERR: Session._set_vring_fd,
}
