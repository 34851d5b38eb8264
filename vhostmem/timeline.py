"""A run's memory table over time: a Perfetto trace and a self-contained HTML page.

Theory of operation
-------------------
The input is what a run leaves behind: the event log (vhostmem/schemas/event-log.schema.json,
one JSON object per line, or ``vhostmem-ctl events --json``'s list) and, optionally, QEMU's
``log`` trace (:mod:`vhostmem.qemu_trace`). Both stamp wall-clock seconds, so they share one
time axis without conversion.

:func:`replay` turns the lines into a :class:`Story`: every request (memory-table lines, and
the failed or noted other requests), every mapping of a region (from the request that put it in
the table to the one that took it out, or the connection's end), the violations and the
``check`` verdict. The table is replayed from the requests as received: ADD_MEM_REG maps its
region, REM_MEM_REG unmaps the region at that GPA and size, SET_MEM_TABLE replaces the table
(regions with the same numbers stay mapped, as vhostmem keeps them), a failed request changes
nothing, a disconnect unmaps everything its connection held.

Limits of the inputs, said once here:

- A line's ``ts`` is the time of vhostmem's *reply*; the event log does not hold the arrival.
  With QEMU's trace, memory-table requests are paired in order with QEMU's memory-table
  ``vhost_user_write`` lines (same request code; the first disagreement ends the pairing: one
  QEMU, one vhost-user device), and a request's slice starts at its write line. QEMU traces the
  write after sending it (:mod:`vhostmem.qemu_trace`, fact 2), so a line stamped after our
  reply cannot start the slice; that slice, and every slice without a trace, is a marker of
  :data:`MARK_NS` ending at the reply. The slice's ``qemu_write_line`` names the line.
- A region's backing (kind, file, page size), the fds vhostmem holds for it and, for hugetlb,
  the free huge pages when it was mapped come from the line's ``mapped`` array; older lines
  have only the numbers (front-end address, file offset), and the counters they feed are left
  out. The huge page pool is sampled only when a hugetlb region is mapped.
- Packets per second come from ``datapath-stats`` lines (``--tap``): running totals with the
  ``interval`` each change took; the rate holds over that interval and drops to zero after
  it when the next line does not follow at once (the guest was quiet).
- Lines recorded before the schema had ``event`` (tests/vectors/qemu-10.0.2-*.events.jsonl)
  are read as successful memory-table requests of one connection.

Violations come from the lines (``violations``, each naming the REMs that removed the memory,
``removed_by``, and the ADD that re-covered it, ``completed_by``, by ``seq``). When the lines
carry none of those fields (the older lines), the requests are replayed through
:class:`vhostmem.atomicity.History` with the gap rule, as ``vhostmem-ctl check`` would batch
them; the verdict says which.

:func:`build_trace` writes the story with the ``perfetto`` package's ``TraceProtoBuilder``
(TrackEvent packets); :func:`render_html` draws it as inline SVG. Both are pure: story in,
bytes or text out.
"""

from __future__ import annotations

import html
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from vhostmem.atomicity import REM_MEM_REG, SET_MEM_TABLE, History
from vhostmem.qemu_trace import MEMORY_CODES, MEMORY_REQUESTS, TraceLine
from vhostmem.regions import human_size

__all__ = [
    "MARK_NS",
    "Mapped",
    "Request",
    "Story",
    "build_trace",
    "parse_event_lines",
    "render_html",
    "replay",
]

#: Length of a request's slice when only its reply time is known (nanoseconds).
MARK_NS: Final = 1000

_NS: Final = 1_000_000_000


def parse_event_lines(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The JSON objects of an event log's non-empty lines.

    Raises:
        ValueError: a line is not a JSON object (names the line).
    """
    out = []
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"event log line {n} is not JSON: {err}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"event log line {n} is not a JSON object")
        out.append(doc)
    return out


@dataclass(slots=True)
class Request:
    """One request of the log (memory-table, or another that failed or carried notes).

    Attributes:
        seq: the memory-table request's number (0 for other requests).
        name: the request's protocol name.
        socket: the vhost-user socket.
        conn: the connection number.
        ts: the reply's wall-clock seconds.
        start: when the slice starts: QEMU's write line, else ``ts`` less a marker.
        started_by: where ``start`` comes from, in words.
        line: the event-log line.
    """

    seq: int
    name: str
    socket: str
    conn: int
    ts: float
    start: float
    started_by: str
    line: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.line.get("result", "ok") == "ok")


@dataclass(slots=True)
class Mapped:
    """One region mapped from one request to another (or to the end of the log).

    Attributes:
        socket, conn: whose table.
        gpa, size, uaddr, mmap_offset: the region's numbers.
        start: the mapping request's reply time.
        end: the unmapping request's reply time, or the connection's end; ``None``: still
            mapped when the log ends.
        added_by: ``seq`` of the request that mapped it.
        removed_by: ``seq`` of the request that unmapped it (0: the connection ended, or never).
        info: what the line's ``mapped`` says of it (backing, page size, file, ``fds_held``,
            ``hugepages_free_at_map``); empty for older lines.
    """

    socket: str
    conn: int
    gpa: int
    size: int
    uaddr: int
    mmap_offset: int
    start: float
    end: float | None = None
    added_by: int = 0
    removed_by: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (self.gpa, self.size, self.uaddr, self.mmap_offset)

    def label(self) -> str:
        return f"GPA 0x{self.gpa:x}-0x{self.gpa + self.size:x} ({human_size(self.size)})"


@dataclass(slots=True)
class Story:
    """A run, replayed: see the module docstring.

    Attributes:
        requests: every request, in log order.
        mappings: every region mapping, in the order mapped.
        violations: violation objects (the schema's), each with ``seq`` of the completing ADD.
        verdict: ``{"clean", "requests", "failed", "violations", "source"}``.
        events: the other lines (connect, disconnect, refused, ring-error, datapath-*).
        commits: QEMU's ``vhost_commit`` / ``vhost_dev_start`` lines.
        messages: QEMU's memory-table ``(write, read or None)`` pairs.
        t0, t1: the first and last time of anything.
    """

    requests: list[Request] = field(default_factory=list)
    mappings: list[Mapped] = field(default_factory=list)
    violations: list[dict[str, Any]] = field(default_factory=list)
    verdict: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    commits: list[TraceLine] = field(default_factory=list)
    messages: list[tuple[TraceLine, TraceLine | None]] = field(default_factory=list)
    t0: float = 0.0
    t1: float = 0.0

    def by_seq(self) -> dict[int, Request]:
        return {r.seq: r for r in self.requests if r.seq}


def _regions(line: Mapping[str, Any]) -> list[dict[str, int]]:
    if "regions" in line:
        return list(line["regions"])
    return [line["region"]] if "region" in line else []


def _qemu_messages(trace: Sequence[TraceLine]) -> list[tuple[TraceLine, TraceLine | None]]:
    """Memory-table writes, each with the read of its reply (the next memory-table line, when
    it is a read of the same code)."""
    mem = [t for t in trace if t.event in ("write", "read") and t.request in MEMORY_REQUESTS]
    out: list[tuple[TraceLine, TraceLine | None]] = []
    for i, t in enumerate(mem):
        if t.event != "write" or t.ts is None:
            continue
        nxt = mem[i + 1] if i + 1 < len(mem) else None
        ok = nxt is not None and nxt.event == "read" and nxt.request == t.request
        out.append((t, nxt if ok else None))
    return out


def replay(events: Sequence[Mapping[str, Any]], trace: Sequence[TraceLine] = ()) -> Story:
    """Replay an event log (and QEMU's trace lines) into a :class:`Story`.

    Args:
        events: the event-log objects, in order.
        trace: QEMU's parsed trace lines (:func:`vhostmem.qemu_trace.parse_lines`).

    Returns:
        The story.
    """
    story = Story()
    story.commits = [t for t in trace if t.event in ("commit", "start") and t.ts is not None]
    story.messages = _qemu_messages(trace)
    writes = [w for w, _ in story.messages]
    w_next: int | None = 0
    open_: dict[tuple[str, int], dict[tuple[int, int, int, int], Mapped]] = {}
    history = History()
    carries = True
    seq = 0
    last_end: dict[tuple[str, int], float] = {}
    for raw in events:
        line = dict(raw)
        kind = line.get("event", "memory-table" if "request" in line else "")
        ts = float(line.get("ts", 0.0))
        socket = str(line.get("socket", ""))
        conn = int(line.get("conn", 0))
        where = (socket, conn)
        table = open_.setdefault(where, {})
        if kind == "disconnect":
            for m in table.values():
                m.end = ts
            table.clear()
            history.close_batch(socket=socket, conn=conn)
        if kind not in ("memory-table", "request-failed", "request-note"):
            story.events.append(line)
            continue
        name = str(line.get("request") or line.get("name") or "?")
        if kind == "memory-table":
            seq = int(line.get("seq", seq + 1))
            carries = carries and "violations" in line
        start, started_by = ts - MARK_NS / _NS, "reply time only (the event log has no arrival)"
        code = MEMORY_CODES.get(name)
        if code is not None and w_next is not None and w_next < len(writes):
            # In order, as QEMU writes them one at a time (vhost_user_write waits for the ack);
            # the first disagreement ends the pairing for the rest of the log.
            w = writes[w_next]
            if w.request == code:
                w_next += 1
                line["qemu_write_line"] = w.lineno
                assert w.ts is not None
                if w.ts < ts:
                    start, started_by = w.ts, f"QEMU's vhost_user_write (trace line {w.lineno})"
                else:
                    started_by += (
                        f"; QEMU traced its write (trace line {w.lineno}) after the reply: "
                        "the line is written once the message is sent"
                    )
            else:
                w_next = None
        start = min(max(start, last_end.get(where, start)), ts)
        last_end[where] = ts
        req = Request(
            seq if kind == "memory-table" else 0, name, socket, conn, ts, start, started_by, line
        )
        story.requests.append(req)
        if kind != "memory-table":
            continue
        removed: list[Mapped] = []
        added: list[Mapped] = []
        kept: list[Mapped] = []
        if req.ok:
            named = _regions(line)
            if name == SET_MEM_TABLE:
                want = {(r["gpa"], r["size"], r["uaddr"], r["mmap_offset"]): r for r in named}
                removed = [m for k, m in table.items() if k not in want]
                kept = [m for k, m in table.items() if k in want]
                new = [k for k in want if k not in table]
            elif name == REM_MEM_REG:
                new = []
                for r in named:
                    hit = [m for m in table.values() if (m.gpa, m.size) == (r["gpa"], r["size"])]
                    removed.extend(hit[:1])
            else:
                new = [(r["gpa"], r["size"], r["uaddr"], r["mmap_offset"]) for r in named]
            for m in removed:
                m.end, m.removed_by = ts, req.seq
                del table[m.key]
            facts = {
                (r["gpa"], r["size"], r["uaddr"], r["mmap_offset"]): r
                for r in line.get("mapped", ())
            }
            for k in new:
                m = Mapped(socket, conn, *k, start=ts, added_by=req.seq)
                m.info = {
                    key: value
                    for key, value in facts.get(k, {}).items()
                    if key not in ("gpa", "size", "uaddr", "mmap_offset")
                }
                table[k] = m
                added.append(m)
                story.mappings.append(m)
        record = history.record(
            socket=socket,
            conn=conn,
            request=name,
            ok=req.ok,
            removed=removed,
            added=added,
            kept=kept,
            requested=_regions(line),
            arrived=ts,
            replied=ts,
        )
        if carries:
            story.violations.extend({"seq": req.seq, **v} for v in line.get("violations", ()))
        else:
            story.violations.extend({"seq": req.seq, **v.as_json()} for v in record.violations)
    # Lines without ``violations`` anywhere: the replayed history's verdict.
    if not carries:
        story.violations = [
            {"seq": r.seq, **v.as_json()} for r in history.records for v in r.violations
        ]
    times = [r.start for r in story.requests] + [r.ts for r in story.requests]
    times += [float(e["ts"]) for e in story.events if "ts" in e]
    times += [t.ts for t in trace if t.ts is not None]
    story.t0, story.t1 = (min(times), max(times)) if times else (0.0, 0.0)
    mem = [r for r in story.requests if r.seq]
    story.verdict = {
        "clean": not story.violations,
        "requests": len(mem),
        "failed": sum(1 for r in story.requests if not r.ok),
        "violations": len(story.violations),
        "source": "the event log's violations"
        if carries
        else "replayed with the gap rule (the lines carry no violations)",
    }
    return story


# -- Perfetto -----------------------------------------------------------------------------------


def _ns(seconds: float) -> int:
    return round(seconds * _NS)


class _Builder:
    """Tracks and events on a ``perfetto.trace_builder.proto_builder.TraceProtoBuilder``."""

    SEQ: Final = 1

    def __init__(self) -> None:
        from perfetto.trace_builder.proto_builder import TraceProtoBuilder

        # The builder's __init__ has no annotations (its methods have).
        self.builder = TraceProtoBuilder()  # type: ignore[no-untyped-call]
        self.uuids: dict[str, int] = {}
        self.first = True

    def track(self, name: str, *, counter: bool = False, parent: str | None = None) -> int:
        if name in self.uuids:
            return self.uuids[name]
        uuid = len(self.uuids) + 1
        self.uuids[name] = uuid
        packet = self.builder.add_packet()
        packet.track_descriptor.uuid = uuid
        packet.track_descriptor.name = name
        if parent is not None:
            packet.track_descriptor.parent_uuid = self.track(parent)
        if counter:
            packet.track_descriptor.counter.SetInParent()
        return uuid

    def _event(self, ts: float, track: int, kind: str) -> Any:
        packet = self.builder.add_packet()
        packet.timestamp = _ns(ts)
        packet.trusted_packet_sequence_id = self.SEQ
        if self.first:
            packet.sequence_flags = 1  # SEQ_INCREMENTAL_STATE_CLEARED
            self.first = False
        event = packet.track_event
        event.type = getattr(type(event), kind)
        event.track_uuid = track
        return event

    def slice(
        self,
        track: int,
        start: float,
        end: float,
        name: str,
        args: Mapping[str, Any] | None = None,
        *,
        flows: Sequence[int] = (),
        terminating: Sequence[int] = (),
    ) -> None:
        event = self._event(start, track, "TYPE_SLICE_BEGIN")
        event.name = name
        for key, value in (args or {}).items():
            note = event.debug_annotations.add()
            note.name = key
            if isinstance(value, bool):
                note.bool_value = value
            elif isinstance(value, int):
                note.int_value = value
            else:
                note.string_value = str(value)
        event.flow_ids.extend(flows)
        event.terminating_flow_ids.extend(terminating)
        self._event(max(end, start + MARK_NS / _NS), track, "TYPE_SLICE_END")

    def instant(self, track: int, ts: float, name: str) -> None:
        self._event(ts, track, "TYPE_INSTANT").name = name

    def counter(self, track: int, ts: float, value: float) -> None:
        event = self._event(ts, track, "TYPE_COUNTER")
        if isinstance(value, int):
            event.counter_value = value
        else:
            event.double_counter_value = value


def _request_args(req: Request) -> dict[str, Any]:
    line = req.line
    args: dict[str, Any] = {"result": line.get("result", "ok"), "start": req.started_by}
    for key in (
        "qemu_write_line",
        "seq",
        "batch",
        "classification",
        "batching",
        "commit",
        "added",
        "removed",
        "kept",
        "error",
        "error_kind",
        "injected",
        "fallback",
    ):
        if key in line:
            args[key] = line[key]
    for i, r in enumerate(_regions(line)):
        args[f"region[{i}]"] = (
            f"gpa=0x{r['gpa']:x} size=0x{r['size']:x} uaddr=0x{r['uaddr']:x} "
            f"mmap_offset=0x{r['mmap_offset']:x}"
        )
    for i, note in enumerate(line.get("notes", ())):
        args[f"note[{i}]"] = note
    if "details" in line:
        args["details"] = json.dumps(line["details"], sort_keys=True)
    return args


def _conn_name(socket: str, conn: int) -> str:
    return f"{socket or 'vhost-user'} conn {conn}"


def build_trace(story: Story) -> bytes:
    """The story as a Perfetto trace (a serialized ``Trace`` protobuf).

    Tracks: one per connection (``<socket> conn N``) with every request as a slice and its
    batches on a child track; one per guest-physical region (``GPA 0x..-0x.. (size)``) with a
    slice per mapping; ``violations`` (a slice per violation, named by its kind, from the REM's
    reply to the re-covering ADD's); counters ``mapped bytes``, ``regions``, ``fds held by
    mappings`` and ``huge pages free (SIZE)`` (where the lines carry them, see the module
    docstring) and, with ``datapath-stats`` lines, ``<connection> rx packets/s`` and ``tx
    packets/s``; with QEMU's trace, ``QEMU commits`` and ``QEMU memory-table messages``.
    Each violation is a flow from the REM(s) that removed the memory (``removed_by``) to the
    ADD that re-covered it (``completed_by``).
    """
    b = _Builder()
    by_seq = story.by_seq()
    flows_from: dict[int, list[int]] = {}
    flows_to: dict[int, list[int]] = {}
    for n, v in enumerate(story.violations, 1):
        for s in v.get("removed_by", ()):
            flows_from.setdefault(s, []).append(n)
        flows_to.setdefault(int(v.get("completed_by", v["seq"])), []).append(n)
    for req in story.requests:
        track = b.track(_conn_name(req.socket, req.conn))
        name = req.name + ("" if req.ok else " (failed)")
        b.slice(
            track,
            req.start,
            req.ts,
            name,
            _request_args(req),
            flows=flows_from.get(req.seq, []) if req.seq else [],
            terminating=flows_to.get(req.seq, []) if req.seq else [],
        )
    # Batches: from the first request's start to the last one's reply, per connection.
    batches: dict[tuple[str, int, int], list[Request]] = {}
    for req in story.requests:
        if req.seq and "batch" in req.line:
            batches.setdefault((req.socket, req.conn, int(req.line["batch"])), []).append(req)
    for (socket, conn, number), reqs in batches.items():
        parent = _conn_name(socket, conn)
        track = b.track(f"{parent} batches", parent=parent)
        commit = reqs[0].line.get("commit", reqs[0].line.get("batching", "gap rule"))
        b.slice(
            track,
            reqs[0].start,
            reqs[-1].ts,
            f"batch {number}",
            {"requests": " ".join(f"{r.name}#{r.seq}" for r in reqs), "edge": commit},
        )
    for m in story.mappings:
        track = b.track(m.label())
        end = story.t1 if m.end is None else m.end
        b.slice(
            track,
            m.start,
            end,
            f"mapped (conn {m.conn})",
            {
                "socket": m.socket,
                "conn": m.conn,
                "gpa": m.gpa,
                "size": m.size,
                "uaddr": f"0x{m.uaddr:x}",
                "mmap_offset": f"0x{m.mmap_offset:x}",
                "mapped_by": m.added_by,
                "unmapped_by": m.removed_by
                or ("still mapped at the end of the log" if m.end is None else "disconnect"),
                **{key: m.info[key] for key in _BACKING_ARGS if key in m.info},
            },
        )
    if story.violations:
        track = b.track("violations")
        for v in story.violations:
            done = by_seq.get(int(v.get("completed_by", v["seq"])))
            rems = [by_seq[s] for s in v.get("removed_by", ()) if s in by_seq]
            end = done.ts if done else story.t1
            start = min((r.ts for r in rems), default=end)
            b.slice(
                track,
                start,
                end,
                str(v["kind"]),
                {
                    "why": v.get("why", ""),
                    "removed_by": " ".join(map(str, v.get("removed_by", ()))),
                    "completed_by": v.get("completed_by", v["seq"]),
                    "unmapped": json.dumps(v.get("unmapped", {}), sort_keys=True),
                },
            )
    _counters(b, story)
    _packet_rates(b, story)
    _qemu(b, story)
    for ev in story.events:
        if "ts" in ev and ev.get("event") != "datapath-stats":  # those are counters
            track = b.track(_conn_name(str(ev.get("socket", "")), int(ev.get("conn", 0))))
            b.instant(track, float(ev["ts"]), str(ev.get("event", "?")))
    data: bytes = b.builder.serialize()
    return data


#: What a region's mapping slice shows of the line's ``mapped`` entry.
_BACKING_ARGS: Final = ("backing", "page_size", "file", "fds_held", "hugepages_free_at_map")


def _counters(b: _Builder, story: Story) -> None:
    """``mapped bytes``, ``regions`` and, when the lines say, ``fds held by mappings`` (over
    all connections, after every change), and ``huge pages free (SIZE)`` per page size,
    sampled when a hugetlb region was mapped."""
    bytes_track = b.track("mapped bytes", counter=True)
    count_track = b.track("regions", counter=True)
    known_fds = any("fds_held" in m.info for m in story.mappings)
    fds_track = b.track("fds held by mappings", counter=True) if known_fds else 0
    changes = sorted(
        [(m.start, 1, m.size, int(m.info.get("fds_held", 0))) for m in story.mappings]
        + [
            (m.end, -1, m.size, int(m.info.get("fds_held", 0)))
            for m in story.mappings
            if m.end is not None
        ],
        key=lambda change: change[:2],
    )
    total = count = fds = 0
    b.counter(bytes_track, story.t0, 0)
    b.counter(count_track, story.t0, 0)
    if known_fds:
        b.counter(fds_track, story.t0, 0)
    for ts, sign, size, held in changes:
        total += sign * size
        count += sign
        fds += sign * held
        b.counter(bytes_track, ts, total)
        b.counter(count_track, ts, count)
        if known_fds:
            b.counter(fds_track, ts, fds)
    for m in story.mappings:
        if "hugepages_free_at_map" in m.info:
            page = human_size(int(m.info.get("page_size", 0)))
            track = b.track(f"huge pages free ({page})", counter=True)
            b.counter(track, m.start, int(m.info["hugepages_free_at_map"]))


def _packet_rates(b: _Builder, story: Story) -> None:
    """Packets per second each way from the ``datapath-stats`` lines of each connection: the
    change of the running total over the line's ``interval``, held over that interval, zero
    after it unless the next line's interval starts there."""
    lines: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for ev in story.events:
        if ev.get("event") == "datapath-stats" and "ts" in ev:
            lines.setdefault((str(ev.get("socket", "")), int(ev.get("conn", 0))), []).append(ev)
    for (socket, conn), stats in lines.items():
        stats.sort(key=lambda ev: float(ev["ts"]))
        parent = _conn_name(socket, conn)
        for way in ("rx", "tx"):
            track = b.track(f"{parent} {way} packets/s", counter=True, parent=parent)
            before, end = 0, None
            for i, ev in enumerate(stats):
                ts, interval = float(ev["ts"]), max(float(ev.get("interval", 0.0)), 0.0)
                start = ts - interval if end is None else max(ts - interval, end)
                if end is not None and start > end + _SAME_S:
                    b.counter(track, end, 0.0)  # quiet between the two lines
                total = int(ev.get(f"{way}_packets", 0))
                rate = (total - before) / interval if interval > 0 else 0.0
                b.counter(track, start, round(rate, 3))
                before, end = total, ts
                if i == len(stats) - 1:
                    b.counter(track, ts, 0.0)


#: Seconds within which the next datapath-stats interval counts as starting where one ended.
_SAME_S: Final = 0.001


def _qemu(b: _Builder, story: Story) -> None:
    """QEMU's commits (each until the next commit line, or its last message) and messages."""
    if story.commits:
        track = b.track("QEMU commits")
        for i, c in enumerate(story.commits):
            assert c.ts is not None
            nxt = story.commits[i + 1].ts if i + 1 < len(story.commits) else None
            inside = [
                (r or w).ts
                for w, r in story.messages
                if w.ts is not None and w.ts >= c.ts and (nxt is None or w.ts < nxt)
            ]
            end = max((t for t in inside if t is not None), default=c.ts)
            name = "vhost_dev_start" if c.event == "start" else "vhost_commit"
            if c.event == "commit" and not (c.started and c.changed):
                name += " (sends nothing)" if c.changed else " (no change)"
            b.slice(
                track,
                c.ts,
                end,
                name,
                {"trace_line": c.lineno, "started": c.started, "changed": c.changed},
            )
    if story.messages:
        track = b.track("QEMU memory-table messages")
        for w, r in story.messages:
            assert w.ts is not None
            end = r.ts if r is not None and r.ts is not None else w.ts
            b.slice(
                track,
                w.ts,
                end,
                MEMORY_REQUESTS[w.request],
                {"write_line": w.lineno, "read_line": r.lineno if r else 0},
            )


# -- HTML ---------------------------------------------------------------------------------------

_CSS: Final = """
body{font:13px sans-serif;margin:16px;color:#222}
h1{font-size:16px}.clean{color:#176}.dirty{color:#b00}
rect.region{fill:#6a9fd4;stroke:#245;stroke-width:.5}
rect.violation{fill:#e33;opacity:.8}circle.failure{fill:#e80;stroke:#600}
line.commit{stroke:#999;stroke-dasharray:2 2}text{font-size:10px}
table{border-collapse:collapse}td,th{padding:1px 6px;text-align:left;border-bottom:1px solid #ddd}
[data-seqs]{cursor:pointer}tr.sel{background:#fe8}
"""

#: The page's one script, inline: a click on a bar, a violation or a failure marks the rows
#: of the requests it names (``data-seqs``) in the table and scrolls the first into view.
_SCRIPT: Final = """
document.addEventListener("click", function (event) {
  var hit = event.target.closest ? event.target.closest("[data-seqs]") : null;
  document.querySelectorAll("tr.sel").forEach(function (row) { row.classList.remove("sel"); });
  if (!hit) { return; }
  var first = null;
  hit.getAttribute("data-seqs").split(" ").forEach(function (seq) {
    var row = document.getElementById("req-" + seq);
    if (row) { row.classList.add("sel"); first = first || row; }
  });
  if (first) { first.scrollIntoView({block: "nearest"}); }
});
"""


def _bands(story: Story) -> list[tuple[int, int]]:
    """The elementary GPA intervals some mapping covers, ascending."""
    edges = sorted({m.gpa for m in story.mappings} | {m.gpa + m.size for m in story.mappings})
    return [
        (a, z)
        for a, z in itertools.pairwise(edges)
        if any(m.gpa <= a and z <= m.gpa + m.size for m in story.mappings)
    ]


def render_html(story: Story, title: str = "vhostmem timeline") -> str:
    """The story as one self-contained HTML page: the verdict, then an SVG with time to the
    right and guest-physical addresses downwards (each interval between region edges gets a
    band, taller for more bytes, so small regions stay visible), one bar per mapping,
    violations and failed requests marked, then the requests as a table. One inline script
    (a click on a mark selects its requests' rows), no external reference."""
    e = html.escape
    left, top, width = 150, 30, 900
    bands = _bands(story)
    total = sum(z - a for a, z in bands) or 1
    ys: list[tuple[int, int, float, float]] = []
    y = float(top)
    for a, z in bands:
        h = 18 + 240 * (z - a) / total
        ys.append((a, z, y, h))
        y += h
    height = int(y) + 40
    span = (story.t1 - story.t0) or 1.0

    def x(ts: float) -> float:
        return left + width * (ts - story.t0) / span

    def y_range(gpa: int, end: int) -> tuple[float, float]:
        parts = [(yy, h) for a, z, yy, h in ys if gpa <= a and z <= end]
        if not parts:
            return (top, 4.0)
        return (parts[0][0], parts[-1][0] + parts[-1][1] - parts[0][0])

    svg: list[str] = [f'<svg width="{left + width + 20}" height="{height}" role="img">']
    for a, _z, yy, _h in ys:
        svg.append(f'<text x="4" y="{yy + 10:.1f}">0x{a:x}</text>')
    if ys:
        a, z, yy, h = ys[-1]
        svg.append(f'<text x="4" y="{yy + h:.1f}">0x{z:x}</text>')
    for c in story.commits:
        assert c.ts is not None
        svg.append(
            f'<line class="commit" x1="{x(c.ts):.1f}" x2="{x(c.ts):.1f}" y1="{top - 10}" '
            f'y2="{height - 30}"><title>QEMU commit, trace line {c.lineno}</title></line>'
        )
    for m in story.mappings:
        y0, h = y_range(m.gpa, m.gpa + m.size)
        x0 = x(m.start)
        x1 = x(story.t1 if m.end is None else m.end)
        backing = ", ".join(
            f"{key} {human_size(m.info[key]) if key == 'page_size' else m.info[key]}"
            for key in _BACKING_ARGS
            if key in m.info
        )
        tip = (
            f"{m.label()} conn {m.conn}: uaddr 0x{m.uaddr:x} mmap_offset 0x{m.mmap_offset:x}, "
            + (f"{backing}, " if backing else "")
            + f"mapped by #{m.added_by}, "
            + (
                f"unmapped by #{m.removed_by}"
                if m.removed_by
                else "mapped at the end"
                if m.end is None
                else "unmapped when the connection ended"
            )
        )
        seqs = " ".join(str(n) for n in (m.added_by, m.removed_by) if n)
        svg.append(
            f'<rect class="region" data-seqs="{seqs}" x="{x0:.1f}" y="{y0 + 1:.1f}" '
            f'width="{max(x1 - x0, 2):.1f}" height="{max(h - 2, 2):.1f}">'
            f"<title>{e(tip)}</title></rect>"
        )
    by_seq = story.by_seq()
    for v in story.violations:
        done = by_seq.get(int(v.get("completed_by", v["seq"])))
        rems = [by_seq[s] for s in v.get("removed_by", ()) if s in by_seq]
        end = done.ts if done else story.t1
        start = min((r.ts for r in rems), default=end)
        unmapped = v.get("unmapped", {})
        y0, h = y_range(int(unmapped.get("start", 0)), int(unmapped.get("end", 0)))
        seqs = " ".join(str(r.seq) for r in rems) + (f" {done.seq}" if done else "")
        svg.append(
            f'<rect class="violation" data-seqs="{seqs.strip()}" x="{x(start) - 2:.1f}" '
            f'y="{y0:.1f}" '
            f'width="{max(x(end) - x(start), 0) + 4:.1f}" height="{h:.1f}">'
            f"<title>{e(str(v['kind']))}: {e(str(v.get('why', '')))}</title></rect>"
        )
    for req in story.requests:
        if not req.ok:
            seqs = f' data-seqs="{req.seq}"' if req.seq else ""
            svg.append(
                f'<circle class="failure"{seqs} cx="{x(req.ts):.1f}" cy="{top - 14}" r="5">'
                f"<title>{e(req.name)} failed: {e(str(req.line.get('error', '')))}</title>"
                "</circle>"
            )
    for i in range(5):
        t = story.t0 + span * i / 4
        svg.append(f'<text x="{x(t):.1f}" y="{height - 12}">+{t - story.t0:.3f} s</text>')
    svg.append("</svg>")
    verdict = story.verdict
    head = (
        f'<p class="clean">check: clean, no violation in {verdict["requests"]} memory-table '
        f"request(s) ({e(verdict['source'])})</p>"
        if verdict.get("clean")
        else f'<p class="dirty">check: {verdict["violations"]} violation(s) in '
        f"{verdict['requests']} memory-table request(s) ({e(verdict['source'])})</p>"
    )
    items = "".join(
        f"<li>{e(str(v['kind']))} at #{v.get('completed_by', v['seq'])}: "
        f"{e(str(v.get('why', '')))}</li>"
        for v in story.violations
    )
    rows = "".join(
        ("<tr" + (f' id="req-{r.seq}"' if r.seq else "") + ">")
        + f"<td>+{r.ts - story.t0:.6f}</td><td>{e(r.socket)} {r.conn}</td><td>{r.seq or ''}"
        f"</td><td>{e(r.name)}</td><td>{e(str(r.line.get('result', 'ok')))}</td>"
        f"<td>{e(str(r.line.get('error', r.line.get('classification', ''))))}</td></tr>"
        for r in story.requests
    )
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{_CSS}</style></head><body>"
        f"<h1>{e(title)}</h1>{head}"
        f"<p>{story.verdict['failed']} failed request(s); {len(story.mappings)} region "
        f"mapping(s); {len(story.commits)} QEMU commit line(s). Time runs right, guest-physical "
        "addresses down; hover a bar for its numbers, click it to mark its requests in the "
        "table.</p>"
        + (f"<ul>{items}</ul>" if items else "")
        + "".join(svg)
        + "<table><tr><th>time</th><th>connection</th><th>seq</th><th>request</th>"
        f"<th>result</th><th>error / class</th></tr>{rows}</table>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
