"""What the sans-IO session tells its shell after each request.

The session emits exactly one :class:`Handled` per request. The shell sends ``reply`` (when not
empty), writes the event log line, updates the atomicity history from ``change`` and logs
``notes``; it never needs to look inside the protocol to do so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, final

from vhostmem.protocol import MemoryTable, MemRegMsg, request_name

if TYPE_CHECKING:
    from vhostmem.protocol import Header, Payload, Request
    from vhostmem.regions import Region

__all__ = ["NEED_DATA", "Deviation", "Handled", "NeedData", "TableChange"]


@final
class NeedData:
    """Sentinel type: the session needs more bytes before it can handle another request."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


# Not frozen: one of each is built per memory request on the path QEMU waits on, and a frozen
# dataclass's __init__ sets every field through object.__setattr__ (CPython
# Lib/dataclasses.py, _field_assign with frozen=True) where a plain one assigns it; tools/bench
# measures that path. Nothing mutates them after construction.


@final
@dataclass(slots=True)
class TableChange:
    """How one memory-table request changed the region table.

    Attributes:
        removed: regions taken out (their mappings released, except those whose unmap failed:
            :attr:`~vhostmem.regions.Region.unmap_failed` set, still in
            :attr:`~vhostmem.regions.RegionTable.unreleased`).
        added: regions put in (mapped).
        kept: for SET_MEM_TABLE, regions that stayed mapped because they were unchanged.
        notes: what a person should know about the change (a running ring in a removed
            region, a ring part in no region); the session passes them on in ``Handled``.
    """

    removed: tuple[Region[object], ...]
    added: tuple[Region[object], ...]
    kept: tuple[Region[object], ...]
    notes: tuple[str, ...] = ()


@final
@dataclass(frozen=True, slots=True)
class Deviation:
    """A request served although vhost-user.rst does not allow it where it came.

    Attributes:
        kind: a short class (``request-before-owner``, ``owner-again``).
        state: the session state the request arrived in (``await-owner``, ``owned``).
        rule: what the spec says, and why the request was served anyway, in words.
    """

    kind: str
    state: str
    rule: str


@final
@dataclass(slots=True)
class Handled:
    """One request, handled.

    Attributes:
        request: the request code (a :class:`vhostmem.protocol.Request`, or the number if unknown).
        header: the decoded header.
        payload: the decoded payload, ``None`` if it could not be decoded.
        reply: bytes to send back; empty when no reply is due.
        ok: whether the request succeeded.
        error: why it failed, in words, with the numbers.
        error_kind: a short class of the failure (``state``, ``decode``, ``overlap-gpa``, ...).
        change: for SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG, what changed in the table.
        notes: things a person should know although the request succeeded.
        nfds: how many file descriptors came with the request.
        details: extra numbers for JSON consumers (e.g. a mapping diagnosis).
        injected: the fault SPEC that fired on this request, if one did.
        delay: seconds the shell holds the reply back (an injected delay).
        disconnect: the shell must close the connection now (an injected disconnect).
        dirty_log: the request mapped a dirty log or turned logging on or off (live
            migration): ``{"logging": bool, "log": {...}}``, ``log`` absent when none is mapped.
        deviation: the request broke vhost-user's ordering and was served anyway (not with
            ``--strict-protocol``); ``None`` for most requests.
    """

    request: Request | int
    header: Header
    payload: Payload | None
    reply: bytes
    ok: bool
    error: str | None = None
    error_kind: str | None = None
    change: TableChange | None = None
    notes: tuple[str, ...] = ()
    nfds: int = 0
    details: dict[str, Any] | None = None
    injected: str | None = None
    delay: float = 0.0
    disconnect: bool = False
    dirty_log: dict[str, Any] | None = None
    deviation: Deviation | None = None

    @property
    def quiet(self) -> bool:
        """Succeeded with nothing to tell at once (no notes, injected fault or deviation): the
        shell acks it without delay and books it later, with the ones around it."""
        return self.ok and not self.notes and not self.injected and not self.deviation

    @property
    def requested(self) -> tuple[dict[str, int], ...]:
        """For memory-table requests, the regions the request named, as received (``gpa``,
        ``size``, ``uaddr``, ``mmap_offset``), whether or not it succeeded; built on demand,
        so only readers (the event log, the atomicity history) pay for the dicts."""
        payload = self.payload
        if isinstance(payload, MemRegMsg):
            return (_wire_json(payload.region),)
        if isinstance(payload, MemoryTable):
            return tuple(_wire_json(region) for region in payload.regions)
        return ()

    @property
    def name(self) -> str:
        """The request's protocol name, or ``UNKNOWN(n)``."""
        return request_name(self.request)


def _wire_json(region: Any) -> dict[str, int]:
    return {
        "gpa": region.guest_phys_addr,
        "size": region.memory_size,
        "uaddr": region.userspace_addr,
        "mmap_offset": region.mmap_offset,
    }
