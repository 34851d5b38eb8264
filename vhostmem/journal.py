"""Event-log lines: one small pure function per event kind, the one place their shape is made.

The contract is ``vhostmem/schemas/event-log.schema.json`` (JSON Schema draft 2020-12, shipped in
the package); README "JSON" shows one line of each kind. Rules every builder keeps:

- Every line has ``"version": 1`` (:data:`VERSION`) and ``"event"`` (one of
  :data:`EVENT_KINDS`); ``ts`` is the time given, or the time the shell books the line.
- A field has one JSON type on every line it appears on: a value that does not apply or is
  unknown is left out, never ``null`` (``peer`` when SO_PEERCRED could not be read,
  ``peer_pid`` likewise, ``error`` on success).
- A memory-table line (one per SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG, whatever the result)
  always has integer ``added``/``removed``/``kept``, its history numbers (``seq``, ``batch``,
  ``classification``, ``batching``) and a ``violations`` array, empty on most lines; when it
  mapped regions, ``mapped`` holds them as the table shows them (backing, ``fds_held``, and for
  hugetlb the pool's ``hugepages_free_at_map``), read when they were mapped.
- Any other request is booked only when it fails (``request-failed``) or succeeds with notes or
  an injected fault (``request-note``); such lines name it with ``name``, never ``request``, so
  ``select(.request)`` finds memory-table lines only.
- A request served against the spec's order gets a ``protocol-deviation`` line before its own
  line (if it has one); a refused request never does.

The module is pure: the shell passes every value in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from vhostmem.atomicity import SET_MEM_TABLE
from vhostmem.events import Deviation

if TYPE_CHECKING:
    from vhostmem.atomicity import Record
    from vhostmem.events import Handled

__all__ = [
    "EVENT_KINDS",
    "VERSION",
    "connect",
    "datapath_handover",
    "datapath_refused",
    "datapath_stats",
    "dirty_log",
    "disconnect",
    "memory_table",
    "party",
    "protocol_deviation",
    "refused",
    "request",
    "ring_error",
    "vring_base_mismatch",
]

#: The version of the event-log line shape (the schema's ``version`` const).
VERSION: Final = 1

#: Every ``event`` value, as the schema lists them.
EVENT_KINDS: Final = (
    "memory-table",
    "request-failed",
    "request-note",
    "connect",
    "disconnect",
    "refused",
    "ring-error",
    "datapath-refused",
    "datapath-handover",
    "dirty-log",
    "protocol-deviation",
    "datapath-stats",
)


class PeerLike(Protocol):
    """SO_PEERCRED of a peer (``vhostmem.transport.Peer``)."""

    def as_json(self) -> dict[str, int]: ...


def _head(event: str, socket: str, conn: int | None, ts: float | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"version": VERSION, "event": event}
    if ts is not None:
        doc["ts"] = ts
    doc["socket"] = socket
    if conn is not None:
        doc["conn"] = conn
    return doc


def memory_table(
    handled: Handled,
    record: Record,
    *,
    ts: float,
    socket: str,
    conn: int,
    peer_pid: int | None,
    requested: Sequence[Mapping[str, int]],
    fallback: str | None = None,
) -> dict[str, Any]:
    """The line of one SET_MEM_TABLE, ADD_MEM_REG or REM_MEM_REG.

    Args:
        handled: the session's event for the request.
        record: what the atomicity history made of it (``seq``, batch, violations).
        ts: Unix time of the reply.
        socket: the socket path.
        conn: the connection number.
        peer_pid: the front-end's pid, ``None`` when unknown.
        requested: the regions as the request named them (``Handled.requested``).
        fallback: the pairing with QEMU's trace ended at this request, and why.

    Returns:
        A JSON-ready dict.
    """
    doc = _head("memory-table", socket, conn, ts)
    if peer_pid is not None:
        doc["peer_pid"] = peer_pid
    doc["request"] = handled.name
    doc["result"] = "ok" if handled.ok else "error"
    if handled.name == SET_MEM_TABLE:
        if handled.payload is not None:  # the table as received, even an empty one
            doc["regions"] = [dict(r) for r in requested]
    elif requested:
        doc["region"] = dict(requested[0])
    change = handled.change
    doc["added"] = len(change.added) if change else 0
    doc["removed"] = len(change.removed) if change else 0
    doc["kept"] = len(change.kept) if change else 0
    if change and change.added:
        # What the shell learned mapping them (backing, fds held, the huge page pool then):
        # facts of the moment of mapping, whenever the line is booked.
        doc["mapped"] = [region.as_json() for region in change.added]
    doc.update(record.as_json())
    if fallback:
        doc["fallback"] = fallback
    _outcome(doc, handled)
    return doc


def request(
    handled: Handled, *, ts: float, socket: str, conn: int, peer_pid: int | None
) -> dict[str, Any]:
    """The line of a request that is not a memory-table request: ``request-failed`` when it
    failed, ``request-note`` when it succeeded with notes or an injected fault.

    Returns:
        A JSON-ready dict.
    """
    doc = _head("request-note" if handled.ok else "request-failed", socket, conn, ts)
    if peer_pid is not None:
        doc["peer_pid"] = peer_pid
    doc["name"] = handled.name
    doc["result"] = "ok" if handled.ok else "error"
    _outcome(doc, handled)
    return doc


def dirty_log(
    handled: Handled, *, ts: float, socket: str, conn: int, peer_pid: int | None
) -> dict[str, Any]:
    """The line of a request that mapped a dirty log (SET_LOG_BASE) or turned logging on or off
    (SET_FEATURES with or without VHOST_F_LOG_ALL): on the source of a live migration, where
    it starts and ends (hw/virtio/vhost.c ``vhost_migration_log``).

    Returns:
        A JSON-ready dict: ``name``, ``logging`` and, while a log is mapped, ``log``.
    """
    doc = _head("dirty-log", socket, conn, ts)
    if peer_pid is not None:
        doc["peer_pid"] = peer_pid
    doc["name"] = handled.name
    state = handled.dirty_log or {}
    doc["logging"] = bool(state.get("logging"))
    if state.get("log") is not None:
        doc["log"] = dict(state["log"])
    return doc


def protocol_deviation(
    handled: Handled,
    *,
    ts: float,
    socket: str,
    conn: int,
    peer: Mapping[str, int] | None,
) -> dict[str, Any]:
    """A request broke vhost-user's ordering and was served anyway (``handled.deviation``):
    ``name`` the request, ``deviation`` its kind, ``state`` the session state it came in,
    ``rule`` what the spec says and why it was served; ``peer`` left out when SO_PEERCRED could
    not be read. The request's own line (memory-table, request-failed, ...) follows it.

    Returns:
        A JSON-ready dict.
    """
    deviation = handled.deviation
    assert deviation is not None, "only a request served with a deviation has this line"
    return _deviation_line(socket, conn, ts, peer, handled.name, deviation)


def _deviation_line(
    socket: str,
    conn: int,
    ts: float | None,
    peer: Mapping[str, Any] | None,
    name: str,
    deviation: Deviation,
) -> dict[str, Any]:
    """The fields every ``protocol-deviation`` line has, whoever found the deviation."""
    doc = _head("protocol-deviation", socket, conn, ts)
    if peer is not None:
        doc["peer"] = dict(peer)
    doc.update(name=name, deviation=deviation.kind, state=deviation.state, rule=deviation.rule)
    return doc


def _outcome(doc: dict[str, Any], handled: Handled) -> None:
    """``error``, ``error_kind`` and ``details`` of a failure; ``notes`` and ``injected``."""
    if not handled.ok:
        doc["error"] = handled.error or f"{handled.name} failed"
        doc["error_kind"] = handled.error_kind or "error"
        if handled.details:
            doc["details"] = handled.details
    if handled.notes:
        doc["notes"] = list(handled.notes)
    if handled.injected:
        doc["injected"] = handled.injected


def connect(
    *, socket: str, conn: int, peer: PeerLike | None, ts: float | None = None
) -> dict[str, Any]:
    """A front-end connected; ``peer`` is left out when SO_PEERCRED could not be read."""
    doc = _head("connect", socket, conn, ts)
    if peer is not None:
        doc["peer"] = peer.as_json()
    return doc


def disconnect(
    *,
    socket: str,
    conn: int,
    reason: str,
    released: int,
    unmap_failed: Sequence[Mapping[str, Any]] = (),
    ts: float | None = None,
) -> dict[str, Any]:
    """A connection ended: ``released`` regions were unmapped, ``unmap_failed`` (region JSON,
    each with its ``unmap_failed`` reason) stay mapped; the array is there, maybe empty."""
    doc = _head("disconnect", socket, conn, ts)
    doc["reason"] = reason
    doc["released"] = released
    doc["unmap_failed"] = [dict(region) for region in unmap_failed]
    return doc


def refused(
    *,
    socket: str,
    reason: str,
    conn: int | None = None,
    peer: PeerLike | None = None,
    ts: float | None = None,
) -> dict[str, Any]:
    """A peer was refused (``--allow-uid``); the control socket's refusals have no ``conn``."""
    doc = _head("refused", socket, conn, ts)
    if peer is not None:
        doc["peer"] = peer.as_json()
    doc["reason"] = reason
    return doc


def party(*, socket: str, conn: int, peer: Mapping[str, int] | None) -> dict[str, Any]:
    """A connection named in another's line (``holder``, ``previous``): ``peer`` is left out
    when SO_PEERCRED could not be read."""
    doc: dict[str, Any] = {"socket": socket, "conn": conn}
    if peer is not None:
        doc["peer"] = dict(peer)
    return doc


def datapath_refused(
    *,
    socket: str,
    conn: int,
    peer: Mapping[str, int] | None,
    tap: str,
    holder: Mapping[str, Any],
    reason: str,
    ts: float | None = None,
) -> dict[str, Any]:
    """A connection's rings were not started: the TAP bridges ``holder``'s (see :func:`party`)."""
    doc = _head("datapath-refused", socket, conn, ts)
    if peer is not None:
        doc["peer"] = dict(peer)
    doc.update(tap=tap, holder=dict(holder), reason=reason)
    return doc


def datapath_handover(
    *,
    socket: str,
    conn: int,
    peer: Mapping[str, int] | None,
    tap: str,
    previous: Mapping[str, Any],
    ts: float | None = None,
) -> dict[str, Any]:
    """The TAP now bridges this connection's rings: ``previous`` (see :func:`party`) ended."""
    doc = _head("datapath-handover", socket, conn, ts)
    if peer is not None:
        doc["peer"] = dict(peer)
    doc.update(tap=tap, previous=dict(previous))
    return doc


def vring_base_mismatch(
    *,
    socket: str,
    conn: int,
    peer: Mapping[str, Any] | None,
    state: str,
    rule: str,
    vring: int,
    details: Mapping[str, Any],
    ts: float | None = None,
) -> dict[str, Any]:
    """A ring started at its used index, not at the SET_VRING_BASE the front-end gave
    (``--tap``): a ``protocol-deviation`` of kind ``vring-base-mismatch``, ``details`` with
    ``base`` and ``used_idx``."""
    found = Deviation(kind="vring-base-mismatch", state=state, rule=rule)
    doc = _deviation_line(socket, conn, ts, peer, "SET_VRING_BASE", found)
    doc.update(vring=vring, details=dict(details))
    return doc


#: The data path counters a ``datapath-stats`` line carries (running totals of the connection).
DATAPATH_COUNTERS: Final = (
    "rx_packets",
    "rx_bytes",
    "rx_dropped",
    "tx_packets",
    "tx_bytes",
    "tx_dropped",
)


def datapath_stats(
    *,
    socket: str,
    conn: int,
    tap: str,
    counters: Mapping[str, int],
    interval: float,
    ts: float | None = None,
) -> dict[str, Any]:
    """The data path's running totals (:data:`DATAPATH_COUNTERS`) of a connection that holds
    the TAP; ``interval``: the seconds the change since its previous line took (a rate is the
    difference over it)."""
    doc = _head("datapath-stats", socket, conn, ts)
    doc["tap"] = tap
    doc.update({name: counters[name] for name in DATAPATH_COUNTERS})
    doc["interval"] = interval
    return doc


def ring_error(
    *,
    socket: str,
    conn: int,
    vring: int,
    queue: str,
    error: str,
    error_kind: str,
    base: int,
    gpa: int | None = None,
    details: Mapping[str, Any] | None = None,
    ts: float | None = None,
) -> dict[str, Any]:
    """A virtqueue stopped (``--tap``): ``gpa`` is the address it could not translate."""
    doc = _head("ring-error", socket, conn, ts)
    doc.update(vring=vring, queue=queue, error=error, error_kind=error_kind, base=base)
    if gpa is not None:
        doc["gpa"] = gpa
    if details:
        doc["details"] = dict(details)
    return doc
