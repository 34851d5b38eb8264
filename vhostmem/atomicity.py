"""Are memory-table updates atomic per memslot? Batches, the update history, violations.

Theory of operation
-------------------
QEMU keeps its vhost region list in step with the guest's memory map: on every memory transaction
``vhost_commit`` (qemu/qemu:hw/virtio/vhost.c) rebuilds the list and, for a vhost-user back-end
with CONFIGURE_MEM_SLOTS, ``vhost_user_add_remove_regions`` (hw/virtio/vhost-user.c) sends the
difference: every REM_MEM_REG first, then every ADD_MEM_REG, one message per region, each waiting
for the back-end's ack. The back-end sees that change as a sequence, not at once. That is harmless
for memory that really comes or goes, and harmful for memory that stays plugged but is removed and
re-added, because between the two messages the back-end has no mapping for it. Before QEMU 8.2
this happened whenever a newly plugged range merged with a live neighbour into one bigger region;
commit 533f5d6679 marks memory-device aliases *unmergeable* so that it cannot.

Definitions
~~~~~~~~~~~
Batch
    The memory-table messages QEMU sends for one memory change. Two ways to find them:

    *Commit edges* (``--qemu-trace``, ``batching: "qemu-trace"``): exactly the messages QEMU
    wrote within one ``vhost_commit`` of the device, or within its start, as QEMU's own trace
    says (:mod:`vhostmem.qemu_trace` pairs every request with its ``vhost_user_write`` line and
    proves the pairing). No timing enters the batch. When pairing ends (the reason is recorded
    as a fallback), the connection's later requests are batched by the gap rule, and the first
    of them starts a new batch: a batch never mixes the two methods.

    *The gap rule* (``batching: "gap"``), a heuristic: REM_MEM_REGs, then ADD_MEM_REGs, each
    request arriving within ``T`` (default 20 ms, ``--batch-gap``) of vhostmem's reply to the
    previous one. The gap is measured from our reply to the next arrival, so a delay vhostmem
    adds itself (fault injection) never splits a batch: QEMU waits for the ack before it sends
    the next request. A loaded machine can stretch one commit over two batches (a violation is
    missed) or squeeze two commits into one (a violation that never happened). Edges, in this
    order:

    1. The first request of a connection starts a batch (QEMU's shadow table starts empty on
       every connection, hw/virtio/vhost-user.c).
    2. A SET_MEM_TABLE is a batch by itself, and the request after it starts a new one.
    3. A REM after an ADD starts a new batch (QEMU sends all removes before all adds; with
       commit edges too, as the batch model needs it, though QEMU never does it).
    4. A gap of exactly ``T`` still continues the batch ("within T"); only a longer gap starts a
       new one. Gaps are compared in whole nanoseconds, so float noise in ``arrived - replied``
       cannot move a gap across the edge.
    5. :meth:`History.close_batch` ends the open batch (the shell calls it when the connection
       closes); nothing else does.

    Failed requests are recorded and take part in batching (QEMU sent them in that order), but
    they change nothing.

Violation
    A guest-physical range that is mapped before a batch and after it, but not by the same
    unchanged region throughout, because one message removed it and a later message of the
    batch re-covered it (merge of live regions into a bigger one, split of a live region,
    resize, a different offset, or removed and re-added identically). An unplug in one batch and
    a replug of the same memslot in a later batch is not a violation. Violations are recorded,
    never refused.

    Because a batch is REMs then ADDs, a range re-covered by an ADD stays mapped until the batch
    ends, so the violation is complete at the ADD that re-covers it: that request carries it,
    and each violated range is reported once. Kinds, first match wins:

    ``readd``   one region removed and re-added with identical numbers (and backing file);
    ``moved``   one region removed and re-added at the same GPA and size, but with a different
                front-end address, file offset or file;
    ``merge``   a re-covering region spans two or more removed regions, or a removed region plus
                memory outside it (QEMU before 8.2 merging a newly plugged memslot into its live
                neighbour; a grow-in-place resize looks the same on the wire);
    ``split``   one removed region re-covered by two or more added regions;
    ``resize``  one region removed and re-added at the same GPA, smaller;
    ``replace`` anything else (e.g. re-covered at a different start address).

    When a split arrives as separate ADDs, the first ADD already completes a violation for the
    part it re-covers (``resize``); the next one reports the rest as ``split``.

Remap
    The same change inside ONE SET_MEM_TABLE: the message hands the back-end the whole new table
    at once (vhostmem maps the new table before it unmaps the old), so a region grown, merged,
    split or moved within it is reported with its numbers, never counted as a violation (DPDK's
    virtio-user grows one hugetlb region at one GPA by whole SET_MEM_TABLEs). Only a sequence of
    messages can be non-atomic. Remap kinds are the violation kinds, with ``grow`` and ``shrink``
    for one region resized at its GPA.

Classification of a request: ``failed``; ``unplug`` for a REM (a REM never knows yet whether the
batch will re-cover its range: the ADD that does carries the violation); ``plug`` or a violation
kind for an ADD; for SET_MEM_TABLE a violation kind, ``remap``, ``plug``, ``unplug``,
``plug+unplug`` or ``unchanged``.

Explanations name the front-end (its process name and pid, when the shell knows them) and speak
of QEMU's commits and memslots only when the front-end is QEMU.

The module is pure: times are plain floats (monotonic seconds) the shell passes in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, final

from vhostmem.regions import Region, describe, human_size

__all__ = [
    "ADD_MEM_REG",
    "DEFAULT_BATCH_GAP",
    "REMAP_KINDS",
    "REM_MEM_REG",
    "SET_MEM_TABLE",
    "VIOLATION_KINDS",
    "BatchSummary",
    "History",
    "Record",
    "RegionLike",
    "RegionRef",
    "Remap",
    "Violation",
    "classify_batch",
    "is_qemu",
    "range_text",
]

# The request names as literals: importing protocol would pull construct into every reader of
# a history (``vhostmem-ctl check``). tests/unit/test_atomicity.py holds them to Request.X.name.
SET_MEM_TABLE: Final = "SET_MEM_TABLE"
ADD_MEM_REG: Final = "ADD_MEM_REG"
REM_MEM_REG: Final = "REM_MEM_REG"
_TABLE_REQUESTS: Final = (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG)

#: Seconds between our reply and the next request within which the request belongs to the batch.
DEFAULT_BATCH_GAP: Final = 0.020

#: Violation kinds, in the order they are tried.
VIOLATION_KINDS: Final = ("readd", "moved", "merge", "split", "resize", "replace")

_WHY_QEMU: Final = (
    "a vhost-user back-end cannot see the change atomically (QEMU 8.2 marks memslot aliases "
    "unmergeable for this: commit 533f5d6679)"
)

#: Remap kinds: the violation kinds, with ``grow``/``shrink`` for one region resized at its GPA.
REMAP_KINDS: Final = ("readd", "moved", "grow", "merge", "split", "shrink", "replace")


def is_qemu(peer: str | None) -> bool:
    """Whether a front-end's process name (``/proc/PID/comm``) is QEMU's (``qemu-system-*``,
    ``qemu-kvm``, ``qemu-storage-daemon``...)."""
    return peer is not None and peer.lower().startswith("qemu")


def _why_front_end(peer: str | None, peer_pid: int | None) -> str:
    """The closing words of a violation for a front-end that is not (known to be) QEMU."""
    who = "the front-end" + (
        f" ({peer}" + (f", pid {peer_pid})" if peer_pid is not None else ")") if peer else ""
    )
    return (
        f"a vhost-user back-end cannot see the change atomically: {who} removed guest memory "
        "that stayed in use and mapped it again in a later message"
    )


#: A half-open guest-physical range ``[start, end)``.
Range = tuple[int, int]


class RegionLike(Protocol):
    """Anything with a region's numbers: :class:`~vhostmem.regions.Region`, :class:`RegionRef`,
    ``vhostmem.qemu_model.ModelRegion``."""

    @property
    def gpa(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def uaddr(self) -> int: ...

    @property
    def mmap_offset(self) -> int: ...


@final
@dataclass(frozen=True, slots=True)
class RegionRef:
    """A region's identity, as a value: what must stay the same for memory to count as unchanged.

    Attributes:
        gpa: guest physical address of the first byte.
        size: length in bytes.
        uaddr: the front-end's address of the first byte.
        mmap_offset: offset of the first byte in the region's file.
        file_id: ``(st_dev, st_ino)`` of that file, ``None`` when unknown.
    """

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int
    file_id: tuple[int, int] | None = None

    @classmethod
    def of(cls, region: RegionLike) -> RegionRef:
        """The identity of ``region``.

        Args:
            region: a table region, a model region or a ref.

        Returns:
            A ref with the region's numbers (and file, when the region knows it).
        """
        if isinstance(region, RegionRef):
            return region
        file_id = region.file_id if isinstance(region, Region) else None
        return cls(region.gpa, region.size, region.uaddr, region.mmap_offset, file_id)

    @property
    def end(self) -> int:
        """One past the last guest physical address."""
        return self.gpa + self.size

    @property
    def key(self) -> tuple[int, int, int]:
        """What REM_MEM_REG matches on: (gpa, uaddr, size), as libvhost-user ``vu_rem_mem_reg``."""
        return (self.gpa, self.uaddr, self.size)

    def describe(self) -> str:
        """The region's numbers in the project's one wording."""
        return describe(self.gpa, self.size, self.uaddr, self.mmap_offset)

    def as_json(self) -> dict[str, int]:
        """``{"gpa", "size", "uaddr", "mmap_offset"}``."""
        return {
            "gpa": self.gpa,
            "size": self.size,
            "uaddr": self.uaddr,
            "mmap_offset": self.mmap_offset,
        }


# -- ranges -----------------------------------------------------------------------------------


def _union(ranges: Iterable[Range]) -> list[Range]:
    out: list[Range] = []
    for start, end in sorted(r for r in ranges if r[0] < r[1]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _subtract(ranges: Iterable[Range], minus: Iterable[Range]) -> list[Range]:
    holes = _union(minus)
    out: list[Range] = []
    for start, end in _union(ranges):
        for h_start, h_end in holes:
            if h_end <= start or h_start >= end:
                continue
            if h_start > start:
                out.append((start, h_start))
            start = max(start, h_end)
            if start >= end:
                break
        if start < end:
            out.append((start, end))
    return out


def _overlap(a: RegionRef, b: RegionRef) -> Range | None:
    start, end = max(a.gpa, b.gpa), min(a.end, b.end)
    return (start, end) if start < end else None


def range_text(r: Range) -> str:
    return f"0x{r[0]:x}-0x{r[1] - 1:x} ({human_size(r[1] - r[0])})"


def _ranges_json(ranges: Iterable[Range]) -> list[dict[str, int]]:
    return [{"start": s, "end": e, "size": e - s} for s, e in ranges]


# -- violations -------------------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class Violation:
    """Guest memory that stayed plugged but was removed and re-covered within one batch.

    Attributes:
        kind: one of :data:`VIOLATION_KINDS`.
        removed: the live regions the batch removed, by GPA.
        added: the regions of the batch that re-cover them, by GPA.
        unmapped: ``(start, end)``, end exclusive: the hull of the range that was briefly unmapped.
        ranges: the exact pieces of ``unmapped`` (more than one only when a merge also filled a
            hole that was never mapped).
        removed_by: the requests that removed ``removed`` (record ``seq``, or message number for
            :func:`classify_batch`).
        completed_by: the request that re-covered the range.
        unmapped_ms: at least this long the back-end had no mapping (from our reply to the REM to
            the arrival of the ADD); ``None`` for SET_MEM_TABLE and when no times are known.
        why: one paragraph with the numbers, for people.
    """

    kind: str
    removed: tuple[RegionRef, ...]
    added: tuple[RegionRef, ...]
    unmapped: Range
    ranges: tuple[Range, ...]
    removed_by: tuple[int, ...]
    completed_by: int
    unmapped_ms: float | None
    why: str

    def as_json(self) -> dict[str, Any]:
        """One object of an event-log line's ``violations``; ranges have ``start``, exclusive
        ``end`` and ``size``. ``unmapped_ms`` is left out when unknown (a field keeps one JSON
        type: vhostmem/schemas/event-log.schema.json).

        Returns:
            A JSON-ready dict.
        """
        doc: dict[str, Any] = {
            "kind": self.kind,
            "removed": [r.as_json() for r in self.removed],
            "added": [r.as_json() for r in self.added],
            "unmapped": _ranges_json([self.unmapped])[0],
            "ranges": _ranges_json(self.ranges),
            "removed_by": list(self.removed_by),
            "completed_by": self.completed_by,
            "why": self.why,
        }
        if self.unmapped_ms is not None:
            doc["unmapped_ms"] = self.unmapped_ms
        return doc


@final
@dataclass(frozen=True, slots=True)
class Remap:
    """Regions one SET_MEM_TABLE replaced over guest memory that stayed mapped: not a violation.

    Attributes:
        kind: one of :data:`REMAP_KINDS`.
        removed: the regions of the old table, by GPA.
        added: the regions of the new table over the same memory, by GPA.
        ranges: the guest-physical pieces remapped, end exclusive.
        seq: the request (record ``seq``).
        why: one sentence with the numbers, for people.
    """

    kind: str
    removed: tuple[RegionRef, ...]
    added: tuple[RegionRef, ...]
    ranges: tuple[Range, ...]
    seq: int
    why: str

    def as_json(self) -> dict[str, Any]:
        """JSON-ready dict; ranges have ``start``, exclusive ``end``, ``size``."""
        return {
            "kind": self.kind,
            "removed": [r.as_json() for r in self.removed],
            "added": [r.as_json() for r in self.added],
            "ranges": _ranges_json(self.ranges),
            "seq": self.seq,
            "why": self.why,
        }


def _kind(xs: Sequence[RegionRef], adds: Sequence[RegionRef]) -> str:
    """Name what happened to removed regions ``xs`` re-covered by ``adds`` (module docstring)."""
    if len(xs) == 1 and len(adds) == 1:
        x, a = xs[0], adds[0]
        if x == a:
            return "readd"
        if (x.gpa, x.size) == (a.gpa, a.size):
            return "moved"
    for a in adds:
        hit = [x for x in xs if _overlap(x, a)]
        if len(hit) >= 2:
            return "merge"
        if any(a.gpa <= x.gpa and a.end >= x.end and a.size > x.size for x in hit):
            return "merge"
    for x in xs:
        if sum(1 for a in adds if _overlap(x, a)) >= 2:
            return "split"
    if len(xs) == 1 and len(adds) == 1 and xs[0].gpa == adds[0].gpa:
        return "resize"
    return "replace"


def _how(kind: str, xs: Sequence[RegionRef], adds: Sequence[RegionRef]) -> str:
    """The words after 're-added it' for each kind."""
    listed = "; ".join(f"region {a.describe()}" for a in adds)
    if kind == "readd":
        return "unchanged"
    if kind == "moved":
        x, a = xs[0], adds[0]
        diffs = [
            f"{name} 0x{old:x} -> 0x{new:x}"
            for name, old, new in (
                ("uaddr", x.uaddr, a.uaddr),
                ("mmap_offset", x.mmap_offset, a.mmap_offset),
            )
            if old != new
        ]
        if x.file_id != a.file_id:
            diffs.append("a different backing file")
        return "at the same guest range but with " + ", ".join(diffs)
    if kind == "merge":
        extra = _subtract([(a.gpa, a.end) for a in adds], [(x.gpa, x.end) for x in xs])
        if extra:
            return f"merged with {', '.join(map(range_text, extra))} as {listed}"
        return f"merged into {listed}"
    if kind == "split":
        return f"split into {len(adds)} regions: {listed}"
    if kind == "resize":
        return f"resized to {listed}"
    return f"as {listed}"


def _remaps(
    gone: Sequence[RegionRef], came: Sequence[RegionRef], seq: int, label: str
) -> list[Remap]:
    """What one message removed and re-covered itself: one remap per connected group."""
    out: list[Remap] = []
    left = list(gone)
    while left:
        group = [left.pop(0)]
        adds: list[RegionRef] = []
        grew = True
        while grew:  # close the group over overlaps both ways
            grew = False
            for a in came:
                if a not in adds and any(_overlap(x, a) for x in group):
                    adds.append(a)
                    grew = True
            for x in list(left):
                if any(_overlap(x, a) for a in adds):
                    left.remove(x)
                    group.append(x)
                    grew = True
        if not adds:
            continue
        xs = sorted(group, key=lambda r: r.gpa)
        adds.sort(key=lambda r: r.gpa)
        ranges = _union(hit for x in xs for a in adds if (hit := _overlap(x, a)) is not None)
        kind = _kind(xs, adds)
        if len(xs) == 1 and len(adds) == 1 and xs[0].gpa == adds[0].gpa:
            kind = {"merge": "grow", "resize": "shrink"}.get(kind, kind)
        how = _how({"grow": "merge", "shrink": "resize"}.get(kind, kind), xs, adds)
        owners = " and ".join(f"region {x.describe()}" for x in xs)
        span = ", ".join(map(range_text, ranges))
        why = (
            f"{label} replaced {owners} over {span}, {how}, in one message: the whole new table "
            "arrives at once and the back-end maps it before it unmaps the old one, so this is "
            "not a violation"
        )
        out.append(Remap(kind, tuple(xs), tuple(adds), tuple(ranges), seq, why))
    return out


@final
@dataclass(frozen=True, slots=True)
class _Removal:
    ref: RegionRef
    seq: int
    replied: float | None
    label: str


@final
class _Batch:
    """One open or closed batch: what it removed of the table it started from, what it added.

    Args:
        number: the batch number.
        socket: the socket path.
        conn: the connection number.
        reason: why the batch started.
        whole_table: it started with a SET_MEM_TABLE (the gap rule keeps it alone).
        method: ``gap`` or ``qemu-trace``.
        commit: for ``qemu-trace``, the commit key (:class:`vhostmem.qemu_trace.Resolution`).
        peer: the front-end's process name, ``None`` when unknown.
        peer_pid: its pid.
    """

    def __init__(
        self,
        number: int,
        socket: str,
        conn: int,
        reason: str,
        whole_table: bool,
        *,
        method: str = "gap",
        commit: tuple[str, int] | None = None,
        peer: str | None = None,
        peer_pid: int | None = None,
    ) -> None:
        self.number = number
        self.socket = socket
        self.conn = conn
        self.reason = reason
        self.whole_table = whole_table
        self.method = method
        self.commit = commit
        self.peer = peer
        self.peer_pid = peer_pid
        self.seqs: list[int] = []
        self.names: list[str] = []
        self.started = 0.0
        self.ended = 0.0
        self.has_add = False
        self.violations = 0
        # Only regions live when the batch started land here: within a batch every REM comes
        # before every ADD, so nothing removed can have been added by the same batch (a
        # SET_MEM_TABLE's own removals are told apart by seq: they are remaps).
        self.removed: list[_Removal] = []
        self.added: list[RegionRef] = []
        self.reported: list[Range] = []

    def remove(
        self, refs: Iterable[RegionRef], *, seq: int, replied: float | None, label: str
    ) -> None:
        for ref in refs:
            if ref in self.added:
                # Added by this batch (a SET_MEM_TABLE sequence): it was not mapped before
                # the batch, so re-covering it later cannot be a violation.
                self.added.remove(ref)
                continue
            self.removed.append(_Removal(ref, seq, replied, label))

    def add(
        self, refs: Iterable[RegionRef], *, seq: int, arrived: float | None, label: str
    ) -> list[Violation]:
        """Register added regions; return the violations they complete (one per connected group
        of removed regions they re-cover). Regions removed by this same message are left out:
        within one message they are remaps (:func:`_remaps`)."""
        new = list(refs)
        self.added.extend(new)
        # Which removed regions does each new region re-cover, in parts not reported yet?
        pieces: dict[int, list[Range]] = {}
        parent: dict[int, int] = {}

        def root(i: int) -> int:
            while parent[i] != i:
                i = parent[i]
            return i

        for addition in new:
            group: list[int] = []
            for xi, removal in enumerate(self.removed):
                if removal.seq == seq:
                    continue
                hit = _overlap(removal.ref, addition)
                if hit is None:
                    continue
                fresh = _subtract([hit], self.reported)
                if fresh:
                    pieces.setdefault(xi, []).extend(fresh)
                    parent.setdefault(xi, xi)
                    group.append(xi)
            for xi in group[1:]:
                parent[root(xi)] = root(group[0])
        components: dict[int, list[int]] = {}
        for xi in sorted(pieces, key=lambda i: self.removed[i].ref.gpa):
            components.setdefault(root(xi), []).append(xi)
        violations = [
            self._violation(members, pieces, seq, arrived, label) for members in components.values()
        ]
        self.violations += len(violations)
        return violations

    def _group(
        self, members: list[int], pieces: Mapping[int, list[Range]]
    ) -> tuple[list[_Removal], list[RegionRef], list[RegionRef], list[Range]]:
        removals = [self.removed[i] for i in members]
        xs = [r.ref for r in removals]
        # Every region of the batch over these ranges, not just this request's: a split that
        # arrives as two ADDs is only recognisable with the first ADD in view.
        adds = sorted(
            {a for a in self.added if any(_overlap(x, a) for x in xs)}, key=lambda r: r.gpa
        )
        ranges = _union(p for i in members for p in pieces[i])
        self.reported = _union([*self.reported, *ranges])
        return removals, xs, adds, ranges

    def _violation(
        self,
        members: list[int],
        pieces: Mapping[int, list[Range]],
        seq: int,
        arrived: float | None,
        label: str,
    ) -> Violation:
        removals, xs, adds, ranges = self._group(members, pieces)
        kind = _kind(xs, adds)
        hull = (ranges[0][0], ranges[-1][1])
        times = [r.replied for r in removals]
        unmapped_ms: float | None = None
        if arrived is not None and None not in times:
            unmapped_ms = max(0.0, arrived - min(t for t in times if t is not None)) * 1000.0
        span = ", ".join(map(range_text, ranges))
        owners = " and ".join(f"region {x.describe()}" for x in xs)
        how = _how(kind, xs, adds)
        removers = " and ".join(dict.fromkeys(r.label for r in removals))
        # A model run gives both requests the same instant: say no number rather than 0.
        duration = (
            "between the two requests"
            if not unmapped_ms
            else f"for at least {unmapped_ms:.1f} ms"
            if unmapped_ms >= 1
            else f"for at least {unmapped_ms:.3f} ms"
        )
        qemu = (self.peer is None and self.method == "model") or is_qemu(self.peer)
        if self.method == "qemu-trace" and self.commit is not None and qemu:
            edge, line = self.commit
            batch = (
                f"the QEMU commit at trace line {line}"
                if edge == "commit"
                else "QEMU's device start"
            )
        else:
            batch = "this batch"
        closing = _WHY_QEMU if qemu else _why_front_end(self.peer, self.peer_pid)
        if qemu and self.peer is not None:
            pid = f", pid {self.peer_pid}" if self.peer_pid is not None else ""
            closing = f"the front-end is QEMU ({self.peer}{pid}); {closing}"
        why = (
            f"{span} was mapped by {owners} before {batch} and again after it, but "
            f"{removers} removed it and {label} re-added it {how}: {duration} the back-end "
            f"had no mapping for guest memory that stayed plugged; {closing}"
        )
        return Violation(
            kind=kind,
            removed=tuple(xs),
            added=tuple(adds),
            unmapped=hull,
            ranges=tuple(ranges),
            removed_by=tuple(dict.fromkeys(r.seq for r in removals)),
            completed_by=seq,
            unmapped_ms=unmapped_ms,
            why=why,
        )

    def summary(self) -> BatchSummary:
        gone = [(r.ref.gpa, r.ref.end) for r in self.removed]
        came = [(a.gpa, a.end) for a in self.added]
        return BatchSummary(
            number=self.number,
            socket=self.socket,
            conn=self.conn,
            reason=self.reason,
            requests=tuple(self.seqs),
            names=tuple(self.names),
            plugged=tuple(_subtract(came, gone)),
            unplugged=tuple(_subtract(gone, came)),
            violations=self.violations,
            started=self.started,
            ended=self.ended,
            batching=self.method,
        )


def classify_batch(
    before: Iterable[RegionLike], requests: Sequence[tuple[str, RegionLike]]
) -> list[Violation]:
    """The violations of one batch of ADD/REM requests against the table it started from.

    Args:
        before: the live regions when the batch starts.
        requests: ``("rem", region)`` and ``("add", region)`` in arrival order, all REMs first.
            A REM names its region by (gpa, uaddr, size), as on the wire (its mmap_offset is
            ignored, QEMU sends 0).

    Returns:
        The violations, in the order the requests completed them. ``removed_by`` and
        ``completed_by`` are 1-based message numbers; ``unmapped_ms`` is ``None``.

    Raises:
        ValueError: a REM after an ADD (that is the next batch), a REM of no live region, an ADD
            overlapping a live region, or an unknown kind: requests a back-end would refuse.
    """
    live = {ref.key: ref for ref in map(RegionRef.of, before)}
    batch = _Batch(0, "", 0, "classify_batch", whole_table=False, method="model")
    out: list[Violation] = []
    for number, (kind, region) in enumerate(requests, 1):
        ref = RegionRef.of(region)
        if kind == "rem":
            if batch.has_add:
                raise ValueError(
                    f"message {number}: REM_MEM_REG after ADD_MEM_REG starts a new batch"
                )
            gone = live.pop(ref.key, None)
            if gone is None:
                raise ValueError(
                    f"message {number}: REM_MEM_REG {ref.describe()} names no live region"
                )
            batch.remove([gone], seq=number, replied=None, label=f"REM_MEM_REG (message {number})")
        elif kind == "add":
            batch.has_add = True
            clash = next((r for r in live.values() if _overlap(r, ref)), None)
            if clash is not None:
                raise ValueError(
                    f"message {number}: ADD_MEM_REG {ref.describe()} overlaps live region "
                    f"{clash.describe()}"
                )
            live[ref.key] = ref
            out += batch.add(
                [ref], seq=number, arrived=None, label=f"ADD_MEM_REG (message {number})"
            )
        else:
            raise ValueError(f"message {number}: kind {kind!r} is neither 'add' nor 'rem'")
    return out


# -- history ----------------------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class Record:
    """One memory-table request as the history saw it.

    Attributes:
        seq: 1-based number over the whole history.
        socket: the listening socket's path.
        conn: the connection number on that socket.
        request: ``SET_MEM_TABLE``, ``ADD_MEM_REG`` or ``REM_MEM_REG``.
        ok: whether the request succeeded (a failed one changed nothing).
        batch: the batch number (over the whole history).
        classification: see the module docstring.
        removed: regions the request took out of the table.
        added: regions it put in.
        kept: regions a SET_MEM_TABLE left mapped because they were unchanged.
        requested: the regions the request named, as received (for failed requests).
        arrived: when the request arrived (monotonic seconds).
        replied: when we replied (or finished, without REPLY_ACK).
        violations: the violations this request completed (at most one for ADD_MEM_REG).
        remaps: for SET_MEM_TABLE, the regions it replaced over memory that stayed mapped.
        batching: how its batch was found: ``qemu-trace`` or ``gap``.
        commit: for ``qemu-trace``, the batch edge in words (``QEMU commit at trace line 12``).
    """

    seq: int
    socket: str
    conn: int
    request: str
    ok: bool
    batch: int
    classification: str
    removed: tuple[RegionRef, ...]
    added: tuple[RegionRef, ...]
    kept: tuple[RegionRef, ...]
    requested: tuple[Mapping[str, int], ...]
    arrived: float
    replied: float
    violations: tuple[Violation, ...]
    remaps: tuple[Remap, ...] = ()
    batching: str = "gap"
    commit: str = ""

    @property
    def violation(self) -> Violation | None:
        """The (first) violation this request completed, or ``None``."""
        return self.violations[0] if self.violations else None

    def as_json(self) -> dict[str, Any]:
        """The history's fields of the request's event-log line (``vhostmem.journal``):
        ``seq``, ``batch``, ``classification``, ``batching`` and ``violations`` (one object per
        violation the request completed; empty on most requests), plus ``commit`` (QEMU's
        commit, with a trace) and ``remaps`` (changes inside one SET_MEM_TABLE) when they apply.

        Returns:
            A JSON-ready dict.
        """
        doc: dict[str, Any] = {
            "seq": self.seq,
            "batch": self.batch,
            "classification": self.classification,
            "batching": self.batching,
            "violations": [v.as_json() for v in self.violations],
        }
        if self.commit:
            doc["commit"] = self.commit
        if self.remaps:
            doc["remaps"] = [r.as_json() for r in self.remaps]
        return doc


@final
@dataclass(frozen=True, slots=True)
class BatchSummary:
    """What one batch did, for ``vhostmem-ctl check``.

    Attributes:
        number: the batch number.
        socket: the socket path.
        conn: the connection number.
        reason: why a new batch started here (first request, gap, REM after ADD, ...).
        requests: ``seq`` of its records.
        names: their request names.
        plugged: GPA ranges mapped after the batch and not before.
        unplugged: GPA ranges mapped before the batch and not after.
        violations: how many violations the batch holds.
        started: arrival of its first request.
        ended: reply to its last request.
        batching: ``qemu-trace`` or ``gap``.
    """

    number: int
    socket: str
    conn: int
    reason: str
    requests: tuple[int, ...]
    names: tuple[str, ...]
    plugged: tuple[Range, ...]
    unplugged: tuple[Range, ...]
    violations: int
    started: float
    ended: float
    batching: str = "gap"

    def as_json(self) -> dict[str, Any]:
        """JSON-ready dict; ranges have ``start``, exclusive ``end`` and ``size``."""
        return {
            "batch": self.number,
            "batching": self.batching,
            "socket": self.socket,
            "conn": self.conn,
            "reason": self.reason,
            "requests": list(self.requests),
            "names": list(self.names),
            "plugged": _ranges_json(self.plugged),
            "unplugged": _ranges_json(self.unplugged),
            "violations": self.violations,
            "duration_ms": round((self.ended - self.started) * 1000.0, 3),
        }


def _ns(seconds: float) -> int:
    return round(seconds * 1_000_000_000)


@final
class _Conn:
    """Per-connection batching state."""

    __slots__ = ("batch", "last_replied")

    def __init__(self) -> None:
        self.batch: _Batch | None = None
        self.last_replied = 0.0


@final
class History:
    """Every memory-table change of the process's lifetime, in batches, with its violations.

    The shell calls :meth:`record` once per SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG, after it
    replied. The history outlives connections, so ``vhostmem-ctl check`` works after QEMU has
    gone. Counts and every violation are kept for the process's lifetime; the request records
    and batch summaries themselves are kept for the most recent ``keep`` of each, so a
    back-end left running across thousands of guest boots does not grow without bound. A batch
    keeps only what it removed and added, never a copy of the table.

    Args:
        keep: how many recent records and batches to keep in full.
    """

    def __init__(self, keep: int = 20000) -> None:
        self._records: deque[Record] = deque(maxlen=keep)
        self._batches: deque[_Batch] = deque(maxlen=keep)
        self._violating: list[Record] = []
        self._remapping: deque[Record] = deque(maxlen=keep)
        self._requests = 0
        self._batch_count = 0
        self._by_class: dict[str, int] = {}
        self._by_batching: dict[str, int] = {}
        self._commits = 0
        self._remaps = 0
        self._fallbacks: list[dict[str, Any]] = []
        self._wire: list[dict[str, Any]] = []
        self._batch_gap = DEFAULT_BATCH_GAP
        self._conns: dict[tuple[str, int], _Conn] = {}
        #: Set by the shell when it follows a QEMU trace (``--qemu-trace``).
        self.trace_configured = False

    @property
    def records(self) -> tuple[Record, ...]:
        """The most recent records, oldest first."""
        return tuple(self._records)

    def record(
        self,
        *,
        socket: str,
        conn: int,
        request: str,
        ok: bool,
        removed: Sequence[RegionLike] = (),
        added: Sequence[RegionLike] = (),
        kept: Sequence[RegionLike] = (),
        requested: Sequence[Mapping[str, int]] = (),
        arrived: float,
        replied: float,
        batch_gap: float = DEFAULT_BATCH_GAP,
        batching: str = "gap",
        commit: tuple[str, int] | None = None,
        commit_text: str = "",
        fallback: str | None = None,
        peer: str | None = None,
        peer_pid: int | None = None,
    ) -> Record:
        """Record one memory-table request and classify it.

        Args:
            socket: the listening socket's path.
            conn: the connection number; a new one starts a new batch.
            request: ``SET_MEM_TABLE``, ``ADD_MEM_REG`` or ``REM_MEM_REG``.
            ok: whether the request succeeded; a failed one is recorded but changes nothing.
            removed: regions taken out of the table (TableChange.removed).
            added: regions put in (TableChange.added).
            kept: regions a SET_MEM_TABLE left unchanged (TableChange.kept).
            requested: the regions as the request named them (Handled.requested).
            arrived: monotonic seconds when the request arrived.
            replied: monotonic seconds when we replied to it.
            batch_gap: ``T``: the longest gap from the previous reply to this arrival that still
                continues the batch.
            batching: ``qemu-trace`` (``commit`` says the batch) or ``gap`` (the gap rule).
            commit: for ``qemu-trace``, the commit key; a different key starts a new batch.
            commit_text: the commit in words, for the record and the batch's reason.
            fallback: the pairing with QEMU's trace ended at this request, and why (recorded
                in the report's fallbacks; this request is batched by the gap rule).
            peer: the front-end's process name (``/proc/PID/comm``), ``None`` when unknown;
                explanations speak of QEMU only when it is QEMU.
            peer_pid: the front-end's pid.

        Returns:
            The new record; its ``violations`` go on the request's event-log line.

        Raises:
            ValueError: an unknown request name or batching method.
        """
        if batching not in ("gap", "qemu-trace") or (batching == "qemu-trace") != (
            commit is not None
        ):
            raise ValueError(f"batching {batching!r} with commit {commit!r}")
        if request not in _TABLE_REQUESTS:
            raise ValueError(
                f"{request!r} is not a memory-table request ({', '.join(_TABLE_REQUESTS)})"
            )
        self._requests += 1
        seq = self._requests
        self._batch_gap = batch_gap
        if fallback is not None:
            self._fallbacks.append(
                {"seq": seq, "socket": socket, "conn": conn, "request": request, "reason": fallback}
            )
        state = self._conns.setdefault((socket, conn), _Conn())
        batch = self._batch_for(
            state,
            socket,
            conn,
            request,
            arrived,
            batch_gap,
            batching,
            commit,
            commit_text,
            fallback,
        )
        if batch.peer is None:
            batch.peer, batch.peer_pid = peer, peer_pid
        batch.seqs.append(seq)
        batch.names.append(request)
        batch.ended = replied
        state.last_replied = replied
        if request == ADD_MEM_REG:
            batch.has_add = True
        gone = tuple(map(RegionRef.of, removed)) if ok else ()
        came = tuple(map(RegionRef.of, added)) if ok else ()
        label = f"{request} #{seq}"
        batch.remove(gone, seq=seq, replied=replied, label=label)
        violations = batch.add(came, seq=seq, arrived=arrived, label=label) if came else []
        remaps = _remaps(gone, came, seq, label) if gone and came else []
        record = Record(
            seq=seq,
            socket=socket,
            conn=conn,
            request=request,
            ok=ok,
            batch=batch.number,
            classification=self._classify(request, ok, gone, came, violations, remaps),
            removed=gone,
            added=came,
            kept=tuple(map(RegionRef.of, kept)) if ok else (),
            requested=tuple(requested),
            arrived=arrived,
            replied=replied,
            violations=tuple(violations),
            remaps=tuple(remaps),
            batching=batching,
            commit=commit_text if batching == "qemu-trace" else "",
        )
        self._records.append(record)
        self._by_class[record.classification] = self._by_class.get(record.classification, 0) + 1
        self._by_batching[batching] = self._by_batching.get(batching, 0) + 1
        if record.violations:
            self._violating.append(record)
        if remaps:
            self._remaps += len(remaps)
            self._remapping.append(record)
        return record

    def _batch_for(
        self,
        state: _Conn,
        socket: str,
        conn: int,
        request: str,
        arrived: float,
        batch_gap: float,
        batching: str,
        commit: tuple[str, int] | None,
        commit_text: str,
        fallback: str | None,
    ) -> _Batch:
        """The batch this request belongs to, opening a new one by the rules of the docstring."""
        open_ = state.batch
        reason: str | None = None
        new_commit = False
        if batching == "qemu-trace":
            if open_ is None or open_.method != batching or open_.commit != commit:
                reason = commit_text or "QEMU commit"
                new_commit = True
            elif request == REM_MEM_REG and open_.has_add:
                reason = "REM_MEM_REG after ADD_MEM_REG"
        elif open_ is None:
            reason = "first request on the connection"
        elif open_.method != "gap":
            reason = "the gap rule from here" + (f" ({fallback})" if fallback else "")
        elif request == SET_MEM_TABLE:
            reason = "SET_MEM_TABLE is a batch by itself"
        elif open_.whole_table:
            reason = "after SET_MEM_TABLE"
        elif request == REM_MEM_REG and open_.has_add:
            reason = "REM_MEM_REG after ADD_MEM_REG"
        else:
            gap = arrived - state.last_replied
            # Whole nanoseconds: a gap of exactly T must not land on either side by float noise.
            if _ns(gap) > _ns(batch_gap):
                reason = f"gap {gap * 1000:.3f} ms > {batch_gap * 1000:g} ms"
        if reason is None and open_ is not None:
            return open_
        batch = _Batch(
            self._batch_count + 1,
            socket,
            conn,
            reason or "",
            whole_table=request == SET_MEM_TABLE,
            method=batching,
            commit=commit,
        )
        if new_commit:
            self._commits += 1
        batch.started = arrived
        self._batches.append(batch)
        self._batch_count += 1
        state.batch = batch
        return batch

    @staticmethod
    def _classify(
        request: str,
        ok: bool,
        gone: Sequence[RegionRef],
        came: Sequence[RegionRef],
        violations: Sequence[Violation],
        remaps: Sequence[Remap] = (),
    ) -> str:
        if not ok:
            return "failed"
        if violations:
            return violations[0].kind
        if remaps:
            return "remap"
        if request == REM_MEM_REG:
            return "unplug"
        if request == ADD_MEM_REG:
            return "plug"
        if gone and came:
            return "plug+unplug"
        return "plug" if came else "unplug" if gone else "unchanged"

    def close_batch(self, *, socket: str, conn: int) -> None:
        """End the open batch of a connection (it closed) and forget the connection's state.

        Call it after the connection's last :meth:`record`; a request recorded for the same
        ``(socket, conn)`` afterwards starts a new batch.

        Args:
            socket: the listening socket's path.
            conn: the connection number.
        """
        self._conns.pop((socket, conn), None)

    def wire_mismatch(self, *, socket: str, conn: int, text: str) -> None:
        """Record a disagreement between QEMU's trace and the messages on the wire.

        Args:
            socket: the listening socket's path.
            conn: the connection number.
            text: which message, which line, in words.
        """
        self._wire.append({"socket": socket, "conn": conn, "mismatch": text})

    def violations(self) -> list[Violation]:
        """Every violation, oldest first."""
        return [v for r in self._violating for v in r.violations]

    def batches(self) -> list[BatchSummary]:
        """A summary of every batch, oldest first."""
        return [b.summary() for b in self._batches]

    def report(self) -> dict[str, Any]:
        """The ``vhostmem-ctl check`` document.

        Returns:
            ``{"version": 1, "clean", "counts", "violations", "remaps", "batching", "wire",
            "batches"}``; each violation has the completing request's ``seq``, ``socket``,
            ``conn``, ``batch`` and ``request`` next to :meth:`Violation.as_json`. ``clean``
            is false on a violation or a wire mismatch. ``batching`` is ``{"method":
            "qemu-trace" | "gap" | "mixed", "commits", "fallbacks", "gap_ms"}``; ``wire`` is
            ``{"checked", "mismatches"}`` (checked: some request was paired with QEMU's trace).
        """
        by_class = dict(self._by_class)
        found = [
            {
                "seq": r.seq,
                "socket": r.socket,
                "conn": r.conn,
                "batch": r.batch,
                "request": r.request,
                **v.as_json(),
            }
            for r in self._violating
            for v in r.violations
        ]
        remaps = [
            {
                "socket": r.socket,
                "conn": r.conn,
                "batch": r.batch,
                "request": r.request,
                **m.as_json(),
            }
            for r in self._remapping
            for m in r.remaps
        ]
        traced = self._by_batching.get("qemu-trace", 0)
        gapped = self._by_batching.get("gap", 0)
        if traced and gapped:
            method = "mixed"
        elif traced or (self.trace_configured and not gapped):
            method = "qemu-trace"
        else:
            method = "gap"
        return {
            "version": 1,
            "clean": not found and not self._wire,
            "counts": {
                "requests": self._requests,
                "failed": by_class.get("failed", 0),
                "batches": self._batch_count,
                "violations": len(found),
                "remaps": self._remaps,
                "by_classification": by_class,
            },
            "violations": found,
            "remaps": remaps,
            "batching": {
                "method": method,
                "commits": self._commits,
                "requests": {"qemu-trace": traced, "gap": gapped},
                "fallbacks": list(self._fallbacks),
                "gap_ms": self._batch_gap * 1000.0,
            },
            "wire": {"checked": bool(traced), "mismatches": list(self._wire)},
            "batches": [b.as_json() for b in self.batches()],
        }
