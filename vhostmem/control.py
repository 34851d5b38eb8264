"""Observability: the control socket (JSON lines) and its client.

Protocol: one JSON object per line each way. A request is ``{"cmd": NAME, "args": {...}}``; the
answer is ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": TEXT}``. Every result
document carries ``"version": 1`` so scripts can tell when the shape changes. The same shapes
come out of ``vhostmem-ctl ... --json``.

Nothing from the wire is used as a path or a format string: arguments are numbers or are looked
up in our own tables.

The control socket reads the back-end through :class:`BackendView` (an interface the server's
``Backend`` meets), so it depends on the booking module and the core, never on the server.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, final

import trio

from vhostmem import journal
from vhostmem.errors import TableError, VhostMemError
from vhostmem.faults import FaultPlan, FaultSpecError, parse_fault
from vhostmem.mapping import Mapper, hugetlb_pool, max_map_count, process_map_count
from vhostmem.regions import Region, UnmergeableRange, merged_view
from vhostmem.transport import Peer, peer_credentials

if TYPE_CHECKING:
    from vhostmem.booking import Booking
    from vhostmem.datapath import NetAttachment, NetDevice
    from vhostmem.mapping import Mapping as RegionMapping
    from vhostmem.session import Session

__all__ = [
    "DOC_VERSION",
    "BackendView",
    "ConnectionView",
    "ControlClient",
    "ControlError",
    "serve_control",
]

#: Version of every JSON document vhostmem produces.
DOC_VERSION = 1
_MAX_LINE = 1 << 20
_MAX_PEEK = 1 << 20


class ControlError(VhostMemError):
    """A control request failed; the text says why."""


class SessionLimits(Protocol):
    """What the control socket reads of the sessions' configuration."""

    @property
    def max_slots(self) -> int: ...


class ConfigView(Protocol):
    """What the control socket reads of the command line's decisions."""

    @property
    def session(self) -> SessionLimits: ...
    @property
    def merge(self) -> bool: ...
    @property
    def unmergeable(self) -> tuple[tuple[int, int], ...]: ...
    @property
    def max_mapped(self) -> int | None: ...


class ConnectionView(Protocol):
    """One live front-end connection, as the control socket reads it."""

    @property
    def number(self) -> int: ...
    @property
    def socket_name(self) -> str: ...
    @property
    def session(self) -> Session[RegionMapping]: ...
    @property
    def peer(self) -> Peer | None: ...
    @property
    def datapath(self) -> NetAttachment | None: ...


class BackendView(Protocol):
    """The back-end as the control socket reads it (the server's ``Backend`` meets it)."""

    @property
    def config(self) -> ConfigView: ...
    @property
    def live(self) -> Mapping[str, Mapping[int, ConnectionView]]: ...
    @property
    def counters(self) -> Mapping[str, int]: ...
    @property
    def started(self) -> float: ...
    @property
    def mapper(self) -> Mapper: ...
    @property
    def faults(self) -> FaultPlan: ...
    @property
    def net(self) -> NetDevice | None: ...
    @property
    def booking(self) -> Booking: ...
    def connections(self) -> Sequence[ConnectionView]: ...
    def regions(self) -> Sequence[tuple[ConnectionView, Region[RegionMapping]]]: ...
    def refuse_peer(self, peer: Peer | None) -> str | None: ...


# -- server side -----------------------------------------------------------------------------


def _int_arg(args: dict[str, Any], name: str, default: int | None = None) -> int:
    value = args.get(name, default)
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise ControlError(
                f"{name} must be a number in decimal or 0x-hex, got {value!r}"
            ) from None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ControlError(f"{name} is required and must be an integer")
    return value


def _sockets(backend: BackendView) -> list[dict[str, Any]]:
    """Every socket served, each with every live connection on it (several front-ends may share
    one socket): its number, peer, slots used and regions."""
    max_slots = backend.config.session.max_slots
    sockets = []
    for name, live in backend.live.items():
        connections = [
            {
                "conn": conn.number,
                "peer": conn.peer.as_json() if conn.peer else None,
                "slots_used": len(conn.session.table),
                "regions": [region.as_json() for region in conn.session.table.mapped],
                "dirty_log": conn.session.device.log_json(),
            }
            for conn in live.values()
        ]
        sockets.append(
            {
                "socket": name,
                "connected": bool(connections),
                "max_slots": max_slots,
                "connections": connections,
            }
        )
    return sockets


def _cmd_regions(backend: BackendView, args: dict[str, Any]) -> dict[str, Any]:
    regions = []
    for owner, region in backend.regions():
        entry = region.as_json()
        entry["socket"] = owner.socket_name
        entry["conn"] = owner.number
        entry["peer_pid"] = owner.peer.pid if owner.peer else None
        regions.append(entry)
    doc: dict[str, Any] = {
        "version": DOC_VERSION,
        "regions": regions,
        "sockets": _sockets(backend),
    }
    if args.get("merged"):
        markers = _markers(backend, args.get("markers") or [])
        doc["markers"] = [{"start": m.start, "end": m.end, "source": m.source} for m in markers]
        doc["merged"] = [
            {
                "socket": conn.socket_name,
                "conn": conn.number,
                "gpa": group.gpa,
                "size": group.size,
                "uaddr": group.uaddr,
                "mmap_offset": group.mmap_offset,
                "parts": [{"gpa": r.gpa, "size": r.size} for r in group.parts],
                "boundary_after": group.boundary_after,
            }
            for conn in backend.connections()
            for group in merged_view(conn.session.table, markers, merge=backend.config.merge)
        ]
    return doc


def _markers(backend: BackendView, extra: list[Any]) -> list[UnmergeableRange]:
    markers = [
        UnmergeableRange(start, end, f"--unmergeable 0x{start:x}-0x{end:x}")
        for start, end in backend.config.unmergeable
    ]
    for item in extra:
        if not (isinstance(item, list) and len(item) == 3):
            raise ControlError("markers are [start, end, source] triples")
        start, end, source = item
        if not isinstance(start, int) or not isinstance(end, int) or not isinstance(source, str):
            raise ControlError("markers are [start, end, source] triples")
        markers.append(UnmergeableRange(start, end, source))
    return markers


def _cmd_events(backend: BackendView, args: dict[str, Any]) -> dict[str, Any]:
    limit = _int_arg(args, "limit", len(backend.booking.events))
    events = list(backend.booking.events)[-limit:] if limit > 0 else []
    return {"version": DOC_VERSION, "events": events}


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def _shared_maps() -> int:
    """Shared mappings of the process (guest memory is MAP_SHARED; heap arenas and thread
    stacks, which come and go, are private)."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            return sum(1 for line in f if line.split(maxsplit=2)[1][3:4] == "s")
    except OSError:
        return -1


def _cmd_stats(backend: BackendView, args: dict[str, Any]) -> dict[str, Any]:
    mapper = backend.mapper.stats
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    vrings = []
    for conn in backend.connections():
        for vring in conn.session.vrings:
            doc = vring.as_json()
            doc["socket"] = conn.socket_name
            doc["conn"] = conn.number
            vrings.append(doc)
    return {
        "version": DOC_VERSION,
        "uptime": time.time() - backend.started,
        "regions": len(backend.regions()),
        "connections_live": len(backend.connections()),
        "sockets": _sockets(backend),
        "mapped_bytes": mapper.mapped_bytes,
        "maps": mapper.maps,
        "mapping_fds": mapper.fds_held,
        "process_fds": _open_fds(),
        "process_maps": process_map_count(),
        "process_shared_maps": _shared_maps(),
        "rlimit_nofile": [soft, hard],
        "vrings": vrings,
        **backend.counters,
        **_datapath_stats(backend),
    }


def _datapath_stats(backend: BackendView) -> dict[str, Any]:
    """``tap`` and per-connection ``datapath`` counters (translations per region), with --tap."""
    net = backend.net
    if net is None:
        return {}
    return {
        "tap": net.as_json(),
        "datapath": [c.datapath.as_json() for c in backend.connections() if c.datapath],
    }


def _cmd_peek(backend: BackendView, args: dict[str, Any]) -> dict[str, Any]:
    gpa = _int_arg(args, "gpa")
    length = _int_arg(args, "len")
    if not 0 < length <= _MAX_PEEK:
        raise ControlError(f"len must be 1..{_MAX_PEEK} bytes, got {length}")
    wanted_socket = args.get("socket")
    # Several front-ends may share a socket, each with its own table: "conn" picks one.
    wanted_conn = _int_arg(args, "conn") if args.get("conn") is not None else None
    conns = [
        c
        for c in backend.connections()
        if wanted_socket in (None, c.socket_name) and wanted_conn in (None, c.number)
    ]
    if not conns:
        raise ControlError(
            "no front-end is connected"
            + (f" on {wanted_socket}" if wanted_socket else "")
            + (f" as conn {wanted_conn}" if wanted_conn is not None else "")
        )
    errors = []
    for conn in conns:
        try:
            return _peek_in(conn.session, gpa, length) | {
                "socket": conn.socket_name,
                "conn": conn.number,
            }
        except TableError as err:
            errors.append(f"{conn.socket_name} conn {conn.number}: {err}")
    raise ControlError("; ".join(errors))


def _peek_in(session: Session[RegionMapping], gpa: int, length: int) -> dict[str, Any]:
    table = session.table
    out = bytearray()
    chunks: list[dict[str, Any]] = []
    at = gpa
    end = gpa + length
    while at < end:
        region = table.lookup_gpa(at)
        if region is None:
            raise TableError(
                f"guest physical address 0x{at:x} is in no region ({table.neighbours(at)})",
                kind="hole",
            )
        take = min(end, region.gpa_end) - at
        peek = region.handle.peek(at - region.gpa, take)
        out += peek.data()
        for chunk in peek.chunks:
            chunks.append(
                {
                    "gpa": region.gpa + chunk.offset,
                    "len": chunk.length,
                    "state": chunk.state,
                    **({"error": chunk.error} if chunk.error else {}),
                }
            )
        at += take
    return {
        "version": DOC_VERSION,
        "gpa": gpa,
        "len": length,
        "hex": out.hex(),
        "chunks": chunks,
        "complete": all(c["state"] == "data" for c in chunks),
    }


def _cmd_inject(backend: BackendView, args: dict[str, Any]) -> dict[str, Any]:
    if args.get("clear"):
        backend.faults.clear()
    spec = args.get("spec")
    if spec is not None:
        if not isinstance(spec, str):
            raise ControlError("spec must be a string")
        try:
            backend.faults.add(parse_fault(spec))
        except FaultSpecError as err:
            raise ControlError(str(err)) from None
    return {"version": DOC_VERSION, "faults": [f.as_json() for f in backend.faults.faults]}


def _or_none(conns: list[ConnectionView]) -> list[ConnectionView | None]:
    """``conns``, or ``[None]`` for a socket with no live connection (its free slots show)."""
    return [*conns] if conns else [None]


def _cmd_diagnose(backend: BackendView, args: dict[str, Any]) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    pools = []
    try:
        sizes = sorted(os.listdir("/sys/kernel/mm/hugepages"))
    except OSError:
        sizes = []
    for entry in sizes:
        page = int(entry.removeprefix("hugepages-").removesuffix("kB")) * 1024
        pool = hugetlb_pool(page)
        if pool is not None:
            pools.append({"page_size": page, **pool})
    mapper = backend.mapper.stats
    max_slots = backend.config.session.max_slots
    slots: list[dict[str, Any]] = [
        {
            "socket": name,
            "conn": conn.number if conn else None,
            "used": len(conn.session.table) if conn else 0,
            "free": conn.session.table.free_slots if conn else max_slots,
            "max": max_slots,
        }
        for name, live in backend.live.items()
        for conn in _or_none(list(live.values()))  # every connection has its own slots
    ]
    # The hugetlb regions the pool cannot back in full now, with the socket that mapped each.
    owners = {id(region.handle): conn for conn, region in backend.regions()}
    shortfalls = []
    for short in backend.mapper.shortfalls():
        owner = owners.get(id(short.mapping))
        shortfalls.append(
            {
                "socket": None if owner is None else owner.socket_name,
                "conn": None if owner is None else owner.number,
                **short.as_dict(),
            }
        )
    return {
        "version": DOC_VERSION,
        "rlimit_nofile": {"soft": soft, "hard": hard, "open": _open_fds()},
        "max_map_count": max_map_count(),
        "process_maps": process_map_count(),
        "max_mapped": backend.config.max_mapped,
        "mapped_bytes": mapper.mapped_bytes,
        "maps": mapper.maps,
        "mapping_fds": mapper.fds_held,
        "hugepages": pools,
        "slots": slots,
        "faults": [f.as_json() for f in backend.faults.faults],
        "shortfalls": shortfalls,
    }


def _cmd_check(backend: BackendView, args: dict[str, Any]) -> dict[str, Any]:
    return backend.booking.history.report()


_Command = Callable[["BackendView", dict[str, Any]], dict[str, Any]]

COMMANDS: dict[str, _Command] = {
    "regions": _cmd_regions,
    "events": _cmd_events,
    "stats": _cmd_stats,
    "peek": _cmd_peek,
    "inject": _cmd_inject,
    "diagnose": _cmd_diagnose,
    "check": _cmd_check,
}


def answer(backend: BackendView, line: bytes) -> dict[str, Any]:
    """Answer one request line; never raises."""
    try:
        request = json.loads(line)
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            raise ControlError('a request is {"cmd": NAME, "args": {...}}')
        args = request.get("args") or {}
        if not isinstance(args, dict):
            raise ControlError("args must be an object")
        command = COMMANDS.get(request["cmd"])
        if command is None:
            raise ControlError(
                f"unknown command {request['cmd']!r}; known: {', '.join(sorted(COMMANDS))}"
            )
    except (ValueError, ControlError) as err:
        return {"ok": False, "error": str(err)}
    try:
        backend.booking.book_pending()  # requests acknowledged but not yet booked count too
        return {"ok": True, "result": command(backend, args)}
    except VhostMemError as err:
        return {"ok": False, "error": str(err)}
    except Exception as err:  # a bug in one command must not take the back-end down
        return {"ok": False, "error": f"internal error in {request['cmd']}: {err!r}"}


async def _serve_one(backend: BackendView, sock: trio.socket.SocketType) -> None:
    stream = trio.SocketStream(sock)
    async with stream:
        buffer = b""
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            buffer += data
            if len(buffer) > _MAX_LINE and b"\n" not in buffer:
                return
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                await backend.booking.settle_trace()  # a verdict waits, bounded, for QEMU's lines
                reply = (json.dumps(answer(backend, line)) + "\n").encode()
                try:
                    await stream.send_all(reply)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return


async def serve_control(listener: socket.socket, backend: BackendView) -> None:
    """Answer control requests on ``listener`` until cancelled."""
    tsock = trio.socket.from_stdlib_socket(listener)
    with tsock:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await tsock.accept()
                raw = socket.socket(fileno=conn.detach())
                peer = peer_credentials(raw)
                refusal = backend.refuse_peer(peer)
                if refusal is not None:
                    raw.close()
                    backend.booking.book(
                        journal.refused(socket="control", reason=refusal, peer=peer)
                    )
                    continue
                nursery.start_soon(_serve_one, backend, trio.socket.from_stdlib_socket(raw))


# -- client side -----------------------------------------------------------------------------


@final
class ControlClient:
    """Blocking client of the control socket (``vhostmem-ctl`` and test fixtures use it).

    Args:
        path: the control socket.
        timeout: seconds to wait for connect and for each answer.
    """

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its ``result``.

        Raises:
            ControlError: the back-end answered with an error, or cannot be reached.
        """
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                sock.sendall((json.dumps({"cmd": cmd, "args": args}) + "\n").encode())
                buffer = b""
                while b"\n" not in buffer:
                    data = sock.recv(65536)
                    if not data:
                        raise ControlError(f"{self.path}: connection closed before an answer")
                    buffer += data
        except OSError as err:
            raise ControlError(
                f"cannot reach vhostmem's control socket {self.path}: {err.strerror or err}"
            ) from err
        reply = json.loads(buffer.split(b"\n", 1)[0])
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error")))
        result = reply["result"]
        assert isinstance(result, dict)
        return result
