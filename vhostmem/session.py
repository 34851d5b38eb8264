"""The sans-IO vhost-user session: bytes and file descriptors in, one ``Handled`` per request out.

Theory of operation
-------------------
Rule 1: everything that decides whether a request is legal lives in this file, in
:data:`TRANSITIONS`, the gates of :meth:`Session._handle` and the routes below it (the way h11
keeps its whole state machine in ``_state.py``).

One :class:`Session` serves one front-end connection. The shell feeds it whatever the socket
gave (``receive_data(data, fds)``) and then calls :meth:`Session.next_event` until it returns
:data:`~vhostmem.events.NEED_DATA`. Each call decodes one message, acts on it and returns a
:class:`~vhostmem.events.Handled` carrying the reply bytes; the shell sends them. The session
never awaits, never touches a socket and never maps memory: its device asks the
:class:`~vhostmem.device.Host` (the shell) to map a region, unmap it or close an fd, so unit
tests can hand it a fake host.

File descriptors arrive beside bytes (SCM_RIGHTS); the
:class:`~vhostmem.receive_buffer.ReceiveBuffer` gives each message the fds that belong to it.
Every fd is owned by exactly one place at a time: the receive buffer, a vring slot, a mapping
(through the host), or it is closed. :meth:`Session.close` releases everything still held.

States (:class:`SessionState`): ``AWAIT_OWNER`` until SET_OWNER, ``OWNED`` after it. Feature
queries are legal before SET_OWNER because QEMU asks them first (shared/vectors/); by the spec
everything touching the device needs an owner. Real front-ends bend that order where the
reference back-ends let them, so a request outside :data:`TRANSITIONS` that
:meth:`Session._deviation` names is served and its ``Handled`` carries the
:class:`~vhostmem.events.Deviation`; with :attr:`SessionConfig.strict` (``--strict-protocol``)
it is refused. An illegal request is answered (a failure ack when one is due) and recorded, not
fatal. Only broken framing (a size no payload can have) moves the session
to ``ERROR``, after which every call raises :class:`~vhostmem.errors.FramingError`.

Replies follow QEMU's checks (hw/virtio/vhost-user.c ``vhost_user_read_header``,
``process_message_reply``): flags exactly 0x5, the same request code, u64 replies of size 8.
A request with its own reply (GET_*) gets only that; any other request with NEED_REPLY, once
REPLY_ACK is negotiated, gets a u64: 0 for success, 1 for failure.

The session is the protocol handler; the :class:`~vhostmem.device.Device` behind it does what
each request asks, through typed methods that take the decoded model (rust-vmm's
``backend_req_handler.rs`` beside ``vhost-user-backend``'s ``handler.rs``). The session keeps
the receive buffer, the transition table, the fd and feature gates and the one reply rule
(:meth:`Session._handle`); the device keeps the memory table and the vrings.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar, final

from vhostmem.device import Device, ErrnoHost, Host, PartialChange, Vring
from vhostmem.errors import FramingError, RequestRefused, StateError
from vhostmem.events import NEED_DATA, Deviation, Handled, NeedData, TableChange
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
    Log,
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
from vhostmem.regions import H, Region

__all__ = ["TRANSITIONS", "Host", "Session", "SessionConfig", "SessionState", "Vring"]


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

#: The orderings served although vhost-user.rst rules them out (not with SessionConfig.strict).
#: Each is one a real front-end takes, and both reference back-ends accept it: neither
#: libvhost-user (subprojects/libvhost-user/libvhost-user.c ``vu_process_message`` dispatches on
#: the request alone; ``vu_set_owner_exec`` does nothing) nor DPDK (lib/vhost/vhost_user.c
#: ``vhost_user_msg_handler`` has no state check; ``vhost_user_set_owner`` returns OK) keeps
#: an owner state.
_BEFORE_OWNER_SERVED = Deviation(
    "request-before-owner",
    SessionState.AWAIT_OWNER.value,
    "vhost-user.rst has SET_OWNER issued when a connection is established, before the rest; "
    "served anyway, as libvhost-user and DPDK's vhost library do (DPDK's virtio-user in "
    "server mode reconnects without SET_OWNER: virtio_user_dev_server_reconnect); "
    "--strict-protocol refuses it",
)
_OWNER_AGAIN_SERVED = Deviation(
    "owner-again",
    SessionState.OWNED.value,
    "vhost-user.rst has one SET_OWNER per connection; a second one is served as a no-op, as "
    "libvhost-user (vu_set_owner_exec) and DPDK's vhost library (vhost_user_set_owner) do; "
    "--strict-protocol refuses it",
)

#: Requests that map memory: the only ones an injected errno fails in the mapping step (through
#: ErrnoHost); on any other an errno rule stops the request like ``ack=``.
_MAPPING_REQUESTS = frozenset({Request.SET_MEM_TABLE, Request.ADD_MEM_REG})

# Plain-int copies of the feature bits tested per request (IntFlag arithmetic is slow).
_REPLY_ACK = int(ProtocolFeature.REPLY_ACK)
_CONFIGURE_MEM_SLOTS = int(ProtocolFeature.CONFIGURE_MEM_SLOTS)
_LOG_SHMFD = int(ProtocolFeature.LOG_SHMFD)
_RARP = int(ProtocolFeature.RARP)

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
        dirty_log: offer VHOST_F_LOG_ALL and LOG_SHMFD, so QEMU can migrate the guest (without
            them QEMU 10 refuses: "vhost-user backend lacks VHOST_USER_PROTOCOL_F_LOG_SHMFD").
        strict: refuse every request the spec's order does not allow (``--strict-protocol``);
            by default the orderings real front-ends take are served, each with a
            :class:`~vhostmem.events.Deviation`.
    """

    queues: int = 1
    max_slots: int = 509
    mem_slots: bool = True
    net: bool = False
    dirty_log: bool = True
    strict: bool = False

    @property
    def features(self) -> int:
        """Virtio feature bits offered in GET_FEATURES."""
        offered = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES
        if self.net:
            offered |= VirtioFeature.NET_F_MRG_RXBUF | VirtioFeature.RING_F_EVENT_IDX
        if self.dirty_log:
            offered |= VirtioFeature.LOG_ALL
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
        if self.dirty_log:
            offered |= ProtocolFeature.LOG_SHMFD
        if self.net:
            # SEND_RARP's frame goes out of the TAP: only a data path can send it.
            offered |= ProtocolFeature.RARP
        return int(offered)

    @property
    def vrings(self) -> int:
        """Number of virtqueues of the device (rx + tx per queue pair)."""
        return 2 * self.queues


@final
class Session(Generic[H]):
    """One front-end connection's protocol state, without I/O.

    Args:
        config: what to offer.
        host: the shell's services (map, unmap, close), handed to the device.
        faults: injection rules (shared by the process's sessions), or ``None``.
    """

    def __init__(
        self, config: SessionConfig, host: Host[H], faults: FaultPlan | None = None
    ) -> None:
        self.config = config
        self.host = host
        self.faults = faults
        self.device = Device(host, config.max_slots, config.vrings)
        # The device's table and vrings, under the names the shell and the tests read.
        self.table = self.device.table
        self.vrings = self.device.vrings
        self.state = SessionState.AWAIT_OWNER
        # The offer never changes; IntFlag arithmetic in SessionConfig.features is slow.
        self._features_reply = encode_u64_reply(Request.GET_FEATURES, config.features)
        #: TRANSITIONS of the current state, looked up once per state change, not per request.
        self._allowed = TRANSITIONS[self.state]
        #: The state is in _ENDED: asked twice per message, so also set once per state change
        #: (a plain Enum hashes in Python code, enum.py Enum.__hash__).
        self._ended = False
        self.acked_features = 0
        self.acked_protocol_features = 0
        #: REPLY_ACK negotiated; kept as a bool because every request asks.
        self.negotiated_reply_ack = False
        self.requests = 0
        self._received = ReceiveBuffer()
        self._header: Header | None = None  # decoded header of the message in hand
        #: The request in hand mapped a dirty log or turned logging on or off.
        self._dirty_log_changed = False

    # -- feeding ----------------------------------------------------------------------------

    def receive_data(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Buffer bytes (and the fds that came with them) from the front-end.

        The session owns ``fds`` from now on.

        Raises:
            FramingError: the session is already in ``ERROR`` or ``CLOSED``.
        """
        if self._ended:
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
        if self._ended:
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
        """Decode, gate, dispatch and answer one request; every refusal is a RequestRefused."""
        request = header.request
        payload: Payload | None = None
        nfds = len(fds)
        fault: Fault | None = None
        deviation: Deviation | None = None
        try:
            if header.flags & _HEADER_CHECK_MASK != FLAG_VERSION:
                self._check_header(header)
            try:
                payload = decode_payload(request, raw)
            except DecodeError as err:
                raise RequestRefused(str(err), kind="decode") from err
            # Faults: the one check before dispatch (an errno rule on a mapping request is
            # carried out by ErrnoHost, below).
            if self.faults:
                fault = self.faults.match(request_name(request))
                if fault is not None and fault.stops(request in _MAPPING_REQUESTS):
                    return self._injected(header, payload, fds, fault)
            # Gates: state, fd count, a handler. An unknown plain-int code misses in the
            # Request-keyed tables (see fd_bounds).
            next_state = self._allowed.get(request)  # type: ignore[arg-type]
            if next_state is None:
                deviation = self._deviation(request)
                next_state = self.state
            low, high = fd_bounds(request, payload)
            if not low <= nfds <= high:
                self._refuse_fds(low, high, nfds, payload)
            # looked up outside the handler's own errors (trio-websocket's KeyError pitfall)
            route = _ROUTES.get(request)  # type: ignore[arg-type]
            if route is None:
                raise RequestRefused(
                    f"{request_name(request)} is not implemented by vhostmem (no feature that "
                    "would allow it was offered)"
                )
            if not isinstance(payload, route.model):
                route.refuse(payload)
            if fault is not None and fault.errno is not None:
                result = self._dispatch_failing(route.handler, payload, fds, fault.errno)
            else:
                result = route.handler(self, payload, fds)
        except RequestRefused as err:
            # A deviation is only booked for a request that was served: refused for its own
            # reasons, the request was not served against the spec's order.
            self._release(fds)
            return self._failure(header, payload, err, nfds, fault=fault)
        except BaseException:
            self._release(fds)
            raise
        if next_state is not self.state:
            self._set_state(next_state)
        reply, change, notes = result
        if not reply:
            reply = self._reply(header, 0)
        handled = Handled(
            request=request,
            header=header,
            payload=payload,
            reply=reply,
            ok=True,
            change=change,
            notes=notes,
            nfds=nfds,
            injected=None if fault is None else fault.spec,
            delay=0.0 if fault is None else fault.delay,
            deviation=deviation,
        )
        if self._dirty_log_changed:
            self._dirty_log_changed = False
            handled.dirty_log = self._dirty_log_state()
        return handled

    def _dirty_log_state(self) -> dict[str, Any]:
        """Whether the data path logs its writes now, and the log mapped, if any."""
        device = self.device
        state: dict[str, Any] = {"logging": device.logging}
        log = device.log_json()
        if log is not None:
            del log["logging"]
            state["log"] = {key: value for key, value in log.items() if value is not None}
        return state

    def _reply(self, header: Header, ack: int) -> bytes:
        """The one reply rule, for a request whose handler built no reply of its own.

        Rule (hw/virtio/vhost-user.c ``process_message_reply``, vhost-user.rst REPLY_ACK): a
        request with NEED_REPLY, once REPLY_ACK is negotiated, gets a u64: 0 for success,
        ``ack`` (non-zero) for failure. A failed request that has its own reply (GET_*) gets
        that reply with an empty payload, which QEMU treats as a failed answer (e.g. GET_CONFIG
        "size 0 = error") instead of hanging. Anything else gets no reply.

        Args:
            header: the request's header.
            ack: 0 when the request succeeded, else the failure value.
        """
        request = header.request
        if request == Request.SET_LOG_BASE and self.acked_protocol_features & _LOG_SHMFD:
            # With LOG_SHMFD QEMU waits for a reply to SET_LOG_BASE whatever the flags
            # (hw/virtio/vhost-user.c vhost_user_set_log_base reads one and checks only its
            # request code; libvhost-user vu_set_log_base_exec answers a u64): 0, or the failure.
            return encode_u64_reply(request, ack)
        if ack and request in HAS_OWN_REPLY:
            return encode_reply(request, b"")
        if header.flags & FLAG_NEED_REPLY and self.negotiated_reply_ack:
            if not ack:
                return _ACKS[request]  # type: ignore[index]  # only known requests succeed
            return encode_u64_reply(request, ack)
        return b""

    def _release(self, fds: list[int]) -> None:
        """Close the fds of a request that no handler took (refused, injected, or unused)."""
        while fds:
            self.host.close_fd(fds.pop())

    def _dispatch_failing(
        self, handler: _Handler[Any], payload: Payload, fds: list[int], errno: int
    ) -> _Result:
        """Dispatch with the device's host wrapped so that mapping fails with ``errno``."""
        self.device.host = ErrnoHost(self.host, errno)
        try:
            return handler(self, payload, fds)
        finally:
            self.device.host = self.host

    def _set_state(self, state: SessionState) -> None:
        self.state = state
        self._allowed = TRANSITIONS.get(state, {})
        self._ended = state in _ENDED

    def _injected(
        self, header: Header, payload: Payload | None, fds: list[int], fault: Fault
    ) -> Handled:
        """A rule fired that stops the request from being handled at all."""
        nfds = len(fds)
        self._release(fds)
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
    ) -> Handled:
        request = header.request
        change = err.change if isinstance(err, PartialChange) else None
        reply = self._reply(header, err.ack)
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
            notes=change.notes if change is not None else (),
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

    def _deviation(self, request: Request | int) -> Deviation:
        """A request the current state does not allow: the deviation it is served with, when
        real front-ends take it and the reference back-ends accept it (:data:`_BEFORE_OWNER_SERVED`,
        :data:`_OWNER_AGAIN_SERVED`); otherwise, and always with ``strict``, a StateError."""
        if not self.config.strict and isinstance(request, Request):
            if self.state is SessionState.AWAIT_OWNER:
                return _BEFORE_OWNER_SERVED
            if request is Request.SET_OWNER:
                return _OWNER_AGAIN_SERVED
        self._refuse_in_state(request)

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

    # -- feature negotiation (the session's own: the gates read what was acked) ------------------

    def _get_features(self, _: None, fds: list[int]) -> _Result:
        return self._features_reply, None, ()

    def _set_features(self, value: int, fds: list[int]) -> _Result:
        extra = value & ~self.config.features
        if extra:
            raise RequestRefused(
                f"features 0x{value:x} include 0x{extra:x}, which vhostmem did not offer "
                f"(offered 0x{self.config.features:x})"
            )
        self.acked_features = value
        logging = self.device.logging
        self.device.set_features(value)
        if self.device.logging != logging:
            self._dirty_log_changed = True
        return b"", None, ()

    def _get_protocol_features(self, _: None, fds: list[int]) -> _Result:
        reply = encode_u64_reply(Request.GET_PROTOCOL_FEATURES, self.config.protocol_features)
        return reply, None, ()

    def _set_protocol_features(self, value: int, fds: list[int]) -> _Result:
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

    def _get_queue_num(self, _: None, fds: list[int]) -> _Result:
        return encode_u64_reply(Request.GET_QUEUE_NUM, self.config.queues), None, ()

    def _get_max_mem_slots(self, _: None, fds: list[int]) -> _Result:
        return encode_u64_reply(Request.GET_MAX_MEM_SLOTS, self.config.max_slots), None, ()

    def _set_owner(self, _: None, fds: list[int]) -> _Result:
        return b"", None, ()

    def _refuse_protocol_feature(self, feature: ProtocolFeature, request: Request) -> NoReturn:
        """Say that ``request`` needs ``feature``; the caller made the bit test (inline, since
        ADD/REM_MEM_REG are the hot path)."""
        raise StateError(
            f"{request.name} needs protocol feature {feature.name}, which was not negotiated",
            self.state.value,
            f"{feature.name} in SET_PROTOCOL_FEATURES",
        )

    # -- device requests: the gates, then the device's typed method -------------------------------

    def _reset(self, _: None, fds: list[int]) -> _Result:
        self.device.reset()
        return b"", None, ()

    def _set_status(self, value: int, fds: list[int]) -> _Result:
        self.device.set_status(value)
        return b"", None, ()

    def _get_status(self, _: None, fds: list[int]) -> _Result:
        return encode_u64_reply(Request.GET_STATUS, self.device.status), None, ()

    def _set_mem_table(self, table: MemoryTable, fds: list[int]) -> _Result:
        change = self.device.set_mem_table(table, fds)
        return b"", change, change.notes

    def _add_mem_reg(self, msg: MemRegMsg, fds: list[int]) -> _Result:
        if not self.acked_protocol_features & _CONFIGURE_MEM_SLOTS:
            self._refuse_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS, Request.ADD_MEM_REG)
        change = self.device.add_mem_reg(msg.region, fds.pop())
        return b"", change, change.notes

    def _rem_mem_reg(self, msg: MemRegMsg, fds: list[int]) -> _Result:
        if not self.acked_protocol_features & _CONFIGURE_MEM_SLOTS:
            self._refuse_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS, Request.REM_MEM_REG)
        # vhost-user.rst: "If a file descriptor is passed, the back-end MUST close it without
        # using it otherwise." QEMU 5.1-7.0 sent one.
        self._release(fds)
        change = self.device.rem_mem_reg(msg.region)
        return b"", change, change.notes

    def _set_vring_num(self, state: VringState, fds: list[int]) -> _Result:
        self.device.set_vring_num(state)
        return b"", None, ()

    def _set_vring_base(self, state: VringState, fds: list[int]) -> _Result:
        self.device.set_vring_base(state)
        return b"", None, ()

    def _get_vring_base(self, state: VringState, fds: list[int]) -> _Result:
        reply = encode_reply(Request.GET_VRING_BASE, self.device.get_vring_base(state))
        return reply, None, ()

    def _set_vring_addr(self, addr: VringAddress, fds: list[int]) -> _Result:
        self.device.set_vring_addr(addr)
        return b"", None, ()

    def _set_vring_enable(self, state: VringState, fds: list[int]) -> _Result:
        self.device.set_vring_enable(state)
        return b"", None, ()

    def _set_vring_kick(self, file: VringFile, fds: list[int]) -> _Result:
        notes = self.device.set_vring_kick(file.index, fds.pop() if fds else None)
        return b"", None, notes

    def _set_vring_call(self, file: VringFile, fds: list[int]) -> _Result:
        self.device.set_vring_call(file.index, fds.pop() if fds else None)
        return b"", None, ()

    def _set_vring_err(self, file: VringFile, fds: list[int]) -> _Result:
        self.device.set_vring_err(file.index, fds.pop() if fds else None)
        return b"", None, ()

    def _set_log_base(self, log: Log, fds: list[int]) -> _Result:
        if not self.acked_protocol_features & _LOG_SHMFD:
            self._refuse_protocol_feature(ProtocolFeature.LOG_SHMFD, Request.SET_LOG_BASE)
        self.device.set_log_base(log, fds.pop() if fds else None)
        self._dirty_log_changed = True
        return b"", None, ()

    def _send_rarp(self, value: int, fds: list[int]) -> _Result:
        if not self.acked_protocol_features & _RARP:
            self._refuse_protocol_feature(ProtocolFeature.RARP, Request.SEND_RARP)
        mac = self.device.send_rarp(value)
        text = ":".join(f"{b:02x}" for b in mac)
        return b"", None, (f"RARP announcement for {text} queued for the TAP",)

    def _set_log_fd(self, _: None, fds: list[int]) -> _Result:
        self.device.set_log_fd(fds.pop())
        return b"", None, ("SET_LOG_FD: the eventfd is closed; vhostmem does not signal it",)

    # -- end of life ----------------------------------------------------------------------------

    def close(self) -> tuple[Region[H], ...]:
        """Release every mapping and fd the session holds; idempotent.

        Returns:
            The regions that were in the table (:attr:`RegionTable.unreleased` included), each
            unmapped, or still mapped with :attr:`Region.unmap_failed` saying why.
        """
        if self.state is SessionState.CLOSED:
            return ()
        self._set_state(SessionState.CLOSED)
        gone = self.device.close()
        for fd in self._received.clear():
            self.host.close_fd(fd)
        return gone


#: What a route returns: reply bytes (empty: the one reply rule decides), the table change, notes.
_Result = tuple[bytes, TableChange | None, tuple[str, ...]]

#: The model type a request's payload decodes to (protocol/codec.py PAYLOAD_KINDS).
P = TypeVar("P")
#: A route's handler: the session, the payload as its model type, the fds of the message.
_Handler = Callable[[Session[Any], P, list[int]], _Result]


@final
@dataclass(frozen=True, slots=True)
class _Route(Generic[P]):
    """A request's handler and the model its payload decodes to: typed dispatch in one place.

    The codec decodes each request to one model type, so the check never fails on a payload
    the codec made; it is the one place where a decoded ``Payload`` becomes its own type.
    """

    model: type[P]
    handler: _Handler[P]

    def refuse(self, payload: Payload) -> NoReturn:
        """Refuse a payload that is not of :attr:`model` (``_handle`` makes the check)."""
        raise RequestRefused(
            f"payload decoded to {type(payload).__name__}, not {self.model.__name__}",
            kind="decode",
        )


_NONE = type(None)

#: Request -> its handler, taking the decoded model type.
_ROUTES: dict[Request, _Route[Any]] = {
    Request.GET_FEATURES: _Route(_NONE, Session._get_features),
    Request.SET_FEATURES: _Route(int, Session._set_features),
    Request.GET_PROTOCOL_FEATURES: _Route(_NONE, Session._get_protocol_features),
    Request.SET_PROTOCOL_FEATURES: _Route(int, Session._set_protocol_features),
    Request.GET_QUEUE_NUM: _Route(_NONE, Session._get_queue_num),
    Request.GET_MAX_MEM_SLOTS: _Route(_NONE, Session._get_max_mem_slots),
    Request.SET_OWNER: _Route(_NONE, Session._set_owner),
    Request.RESET_OWNER: _Route(_NONE, Session._reset),
    Request.RESET_DEVICE: _Route(_NONE, Session._reset),
    Request.SET_STATUS: _Route(int, Session._set_status),
    Request.GET_STATUS: _Route(_NONE, Session._get_status),
    Request.SET_MEM_TABLE: _Route(MemoryTable, Session._set_mem_table),
    Request.ADD_MEM_REG: _Route(MemRegMsg, Session._add_mem_reg),
    Request.REM_MEM_REG: _Route(MemRegMsg, Session._rem_mem_reg),
    Request.SET_VRING_NUM: _Route(VringState, Session._set_vring_num),
    Request.SET_VRING_BASE: _Route(VringState, Session._set_vring_base),
    Request.GET_VRING_BASE: _Route(VringState, Session._get_vring_base),
    Request.SET_VRING_ADDR: _Route(VringAddress, Session._set_vring_addr),
    Request.SET_VRING_ENABLE: _Route(VringState, Session._set_vring_enable),
    Request.SET_VRING_KICK: _Route(VringFile, Session._set_vring_kick),
    Request.SET_VRING_CALL: _Route(VringFile, Session._set_vring_call),
    Request.SET_VRING_ERR: _Route(VringFile, Session._set_vring_err),
    Request.SET_LOG_BASE: _Route(Log, Session._set_log_base),
    Request.SET_LOG_FD: _Route(_NONE, Session._set_log_fd),
    Request.SEND_RARP: _Route(int, Session._send_rarp),
}
