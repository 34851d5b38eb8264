"""vhostmem-ctl timeline: the Perfetto trace and the HTML page of a run (vhostmem/timeline.py).

The plug cycle is QEMU 10.0.2's recorded run (tests/vectors/qemu-10.0.2-plug-cycle.*: memslots,
no violation). No recorded event log holds a violation (the legacy vector is SET_MEM_TABLE only,
which is never one), so the legacy replay is made here the way vhostmem makes its lines: the
atomicity history classifies what QEMU before 8.2 sent for a virtio-mem plug next to a plugged
memslot (REM the live region, ADD the merged one), and the lines are checked against the
event-log schema.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent

from vhostmem.atomicity import History
from vhostmem.ctl import ctl_main
from vhostmem.qemu_trace import parse_lines
from vhostmem.testing import schema
from vhostmem.testing.backend import start_backend
from vhostmem.testing.frontend import FakeFrontend, make_memfd
from vhostmem.timeline import MARK_NS, Story, build_trace, render_html, replay

from .helpers.tools import load_tool

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
PLUG_EVENTS = VECTORS / "qemu-10.0.2-plug-cycle.events.jsonl"
PLUG_TRACE = VECTORS / "qemu-10.0.2-plug-cycle.trace.log"
GIB = 1 << 30
BASE = 4 * GIB  # the virtio-mem device's memaddr in the recorded runs
HPAGE = 2 << 20


def _plug_cycle() -> Story:
    from vhostmem.timeline import parse_event_lines

    events = parse_event_lines(PLUG_EVENTS.read_text().splitlines())
    return replay(events, parse_lines(PLUG_TRACE.read_text().splitlines()))


def _region(gpa: int, size: int, uaddr: int, offset: int) -> dict[str, int]:
    return {"gpa": gpa, "size": size, "uaddr": uaddr, "mmap_offset": offset}


def _legacy_lines() -> list[dict[str, Any]]:
    """Event-log lines of QEMU before 8.2 plugging memslots 1 and 2 of a virtio-mem device next
    to plugged memslot 0: each plug removes the live region and adds the merged one (two merge
    violations), then a failed ADD_MEM_REG."""
    history = History()
    uaddr = 0x7F0000000000
    steps: list[tuple[str, dict[str, int], bool]] = [
        ("ADD_MEM_REG", _region(0, GIB // 2, 0x7E0000000000, 0), True),
        ("ADD_MEM_REG", _region(BASE, GIB, uaddr, 0), True),
        ("REM_MEM_REG", _region(BASE, GIB, uaddr, 0), True),
        ("ADD_MEM_REG", _region(BASE, 2 * GIB, uaddr, 0), True),
        ("REM_MEM_REG", _region(BASE, 2 * GIB, uaddr, 0), True),
        ("ADD_MEM_REG", _region(BASE, 3 * GIB, uaddr, 0), True),
        ("ADD_MEM_REG", _region(BASE + 3 * GIB, GIB, uaddr + 3 * GIB, 3 * GIB), False),
    ]
    lines = []
    ts = 1796222000.0
    for i, (name, region, ok) in enumerate(steps):
        # The first two requests are the device's start, the others come in two commits,
        # each a REM and an ADD a millisecond apart.
        ts += 1.0 if i in (1, 2, 4, 6) else 0.001
        regions = [_Ref(region)]
        record = history.record(
            socket="/run/vm.sock",
            conn=0,
            request=name,
            ok=ok,
            removed=regions if ok and name == "REM_MEM_REG" else [],
            added=regions if ok and name == "ADD_MEM_REG" else [],
            requested=[region],
            arrived=ts - 0.0001,
            replied=ts,
        )
        line: dict[str, Any] = {
            "version": 1,
            "event": "memory-table",
            "ts": ts,
            "socket": "/run/vm.sock",
            "conn": 0,
            "request": name,
            "result": "ok" if ok else "error",
            "region": region,
            "added": int(ok and name == "ADD_MEM_REG"),
            "removed": int(ok and name == "REM_MEM_REG"),
            "kept": 0,
            **record.as_json(),
        }
        if not ok:
            line["error"] = "mmap of GPA 0x1c0000000-0x200000000 (1 GiB) failed: ENOMEM"
            line["error_kind"] = "injected"
        lines.append(line)
    problems = [p for line in lines for p in schema.problems(line, "event-log")]
    assert problems == []
    return lines


class _Ref:
    """A region for :meth:`History.record` from its JSON numbers."""

    def __init__(self, doc: dict[str, int]) -> None:
        self.gpa = doc["gpa"]
        self.size = doc["size"]
        self.uaddr = doc["uaddr"]
        self.mmap_offset = doc["mmap_offset"]


def _parse(data: bytes) -> tuple[dict[int, str], list[Any]]:
    """The trace's track names by uuid, and its track events (packets)."""
    trace = Trace()
    trace.ParseFromString(data)
    names = {
        p.track_descriptor.uuid: p.track_descriptor.name
        for p in trace.packet
        if p.HasField("track_descriptor")
    }
    return names, [p for p in trace.packet if p.HasField("track_event")]


def _slices(names: dict[int, str], packets: list[Any]) -> list[tuple[str, Any, int]]:
    """``(track name, event, begin ts)`` of every slice begin."""
    return [
        (names[p.track_event.track_uuid], p.track_event, p.timestamp)
        for p in packets
        if p.track_event.type == TrackEvent.TYPE_SLICE_BEGIN
    ]


def test_plug_cycle_trace_has_a_track_per_connection_and_region() -> None:
    story = _plug_cycle()
    names, packets = _parse(build_trace(story))
    slices = _slices(names, packets)
    per_track = Counter(track for track, _, _ in slices)
    regions = sorted(n for n in names.values() if n.startswith("GPA "))
    assert regions == [
        "GPA 0x0-0x20000000 (512 MiB)",
        "GPA 0x100000000-0x140000000 (1 GiB)",
        "GPA 0x140000000-0x180000000 (1 GiB)",
        "GPA 0x180000000-0x1c0000000 (1 GiB)",
    ]
    assert all(per_track[r] == 1 for r in regions)  # one mapping per region in the cycle
    requests = [e.name for track, e, _ in slices if track == "vhost-user conn 0"]
    assert requests == ["ADD_MEM_REG"] * 4 + ["REM_MEM_REG"] * 3
    assert per_track["vhost-user conn 0 batches"] == 7
    # Memslots: no violation, so no flow and no violations track.
    assert "violations" not in names.values()
    assert all(not e.flow_ids and not e.terminating_flow_ids for _, e, _ in slices)
    # QEMU's commits are on their own track, one slice per vhost_commit line.
    commits = sum(1 for line in PLUG_TRACE.read_text().splitlines() if ":vhost_commit " in line)
    assert per_track["QEMU commits"] == commits > 0
    # Each request names the QEMU write line it was paired with, in order, and starts there
    # when QEMU traced the write before vhostmem replied.
    paired = [
        next(a.int_value for a in e.debug_annotations if a.name == "qemu_write_line")
        for track, e, _ in slices
        if track == "vhost-user conn 0"
    ]
    assert paired == [w.lineno for w, _ in story.messages]
    early = {round(w.ts * 1e9) for w, _ in story.messages if w.ts is not None}
    starts = [ts for track, _, ts in slices if track == "vhost-user conn 0"]
    assert len(set(starts) & early) >= 4
    # The counters end where the cycle ends: the 512 MiB of boot memory, one region.
    counters: dict[str, list[int]] = {}
    for p in packets:
        if p.track_event.type == TrackEvent.TYPE_COUNTER:
            counters.setdefault(names[p.track_event.track_uuid], []).append(
                p.track_event.counter_value
            )
    assert counters["mapped bytes"][-1] == GIB // 2
    assert max(counters["mapped bytes"]) == GIB // 2 + 3 * GIB
    assert counters["regions"][-1] == 1
    mapped = next(e for track, e, _ in slices if track.startswith("GPA 0x180000000"))
    notes = {a.name: a.string_value or a.int_value for a in mapped.debug_annotations}
    assert notes["mmap_offset"] == "0x80000000" and notes["mapped_by"] == 4
    assert notes["unmapped_by"] == 5


def test_legacy_replay_has_one_flow_per_violation_from_rem_to_add() -> None:
    lines = _legacy_lines()
    story = replay(lines)
    assert [v["kind"] for v in story.violations] == ["merge", "merge"]
    names, packets = _parse(build_trace(story))
    slices = _slices(names, packets)
    starts = {f: e.name for _, e, _ in slices for f in e.flow_ids}
    ends = {f: e.name for _, e, _ in slices for f in e.terminating_flow_ids}
    assert starts == {1: "REM_MEM_REG", 2: "REM_MEM_REG"}
    assert ends == {1: "ADD_MEM_REG", 2: "ADD_MEM_REG"}
    assert [e.name for track, e, _ in slices if track == "violations"] == ["merge", "merge"]
    failed = [e for _, e, _ in slices if e.name == "ADD_MEM_REG (failed)"]
    assert len(failed) == 1
    notes = {a.name: a.string_value for a in failed[0].debug_annotations}
    assert notes["result"] == "error" and "ENOMEM" in notes["error"]
    # Without QEMU's trace a request is a marker ending at its reply.
    begins = {p.timestamp for p in packets if p.track_event.type == TrackEvent.TYPE_SLICE_BEGIN}
    # (floats of Unix seconds hold about a quarter microsecond)
    assert min(abs(b - (round(lines[0]["ts"] * 1e9) - MARK_NS)) for b in begins) < 300


def test_lines_without_violations_are_replayed_by_the_gap_rule() -> None:
    lines = [
        {k: v for k, v in line.items() if k not in ("violations", "seq")}
        for line in _legacy_lines()
    ]
    story = replay(lines)
    assert [v["kind"] for v in story.violations] == ["merge", "merge"]
    assert story.verdict["source"].startswith("replayed with the gap rule")
    assert [(v["removed_by"], v["completed_by"]) for v in story.violations] == [
        ([3], 4),
        ([5], 6),
    ]


class _Checker(HTMLParser):
    """Tags must nest; counts elements by class."""

    VOID = {"meta", "br", "img", "input", "link", "hr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.classes: Counter[str] = Counter()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.classes.update(f"{tag}.{v}" for k, v in attrs if k == "class" and v)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"</{tag}> closes nothing open")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _check_html(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert "http" not in page.lower()
    # one inline script, nothing loaded from elsewhere
    assert page.lower().count("<script") == page.count("<script>") == 1
    assert " src=" not in page and " href=" not in page
    return checker


def test_html_of_the_plug_cycle_has_one_bar_per_region() -> None:
    story = _plug_cycle()
    page = render_html(story)
    checker = _check_html(page)
    assert checker.classes["rect.region"] == len(story.mappings) == 4
    # each bar names the requests that mapped and unmapped it; each memory request has a row
    assert [f'data-seqs="{m.added_by} {m.removed_by}"' in page for m in story.mappings] == [
        False,
        True,
        True,
        True,
    ]
    assert all(f'<tr id="req-{r.seq}">' in page for r in story.requests)
    assert checker.classes["rect.violation"] == 0
    assert "check: clean, no violation in 7 memory-table request(s)" in "".join(checker.text)


def test_html_of_the_legacy_replay_marks_violations_and_failures() -> None:
    story = replay(_legacy_lines())
    checker = _check_html(render_html(story))
    assert checker.classes["rect.region"] == len(story.mappings) == 4
    assert checker.classes["rect.violation"] == 2
    assert checker.classes["circle.failure"] == 1
    assert "check: 2 violation(s) in 7 memory-table request(s)" in "".join(checker.text)


def test_ctl_timeline_writes_both_files_from_the_recorded_run(tmp_path: Path) -> None:
    out, page = tmp_path / "run.pftrace", tmp_path / "run.html"
    status = ctl_main(
        [
            "timeline",
            "--event-log",
            str(PLUG_EVENTS),
            "--qemu-trace",
            str(PLUG_TRACE),
            "-o",
            str(out),
            "--html",
            str(page),
        ]
    )
    assert status == 0
    names, _ = _parse(out.read_bytes())
    assert "vhost-user conn 0" in names.values()
    assert _check_html(page.read_text()).classes["rect.region"] == 4


def test_ctl_timeline_needs_an_output_and_an_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VHOSTMEM_CONTROL", raising=False)
    assert ctl_main(["timeline", "--event-log", str(PLUG_EVENTS)]) == 2
    assert ctl_main(["timeline", "-o", str(tmp_path / "x.pftrace")]) == 2
    missing = tmp_path / "absent.jsonl"
    assert ctl_main(["timeline", "--event-log", str(missing), "-o", str(tmp_path / "x")]) == 2


def test_timeline_of_a_running_vhostmem_and_of_its_event_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real vhostmem flags the pre-8.2 merge (as in test_check.py); the timeline read from its
    control socket and the one read from its event log both hold the violation as one flow."""
    backend = start_backend(tmp_path)
    fe = FakeFrontend.connect(backend.socket)
    memfd = make_memfd(2 * GIB)
    try:
        fe.handshake()
        host = 0x7F0000000000
        assert fe.add_region(BASE, GIB, host, 0, memfd) == 0
        time.sleep(0.1)  # a later commit (the gap rule's batch edge)
        assert fe.rem_region(BASE, GIB, host) == 0
        assert fe.add_region(BASE, 2 * GIB, host, 0, memfd) == 0
        backend.wait_for(backend.violations, 5, "the violation in the event log")
        live = tmp_path / "live.pftrace"
        assert ctl_main(["--control", backend.control, "timeline", "-o", str(live)]) == 0
    finally:
        fe.close()
        os.close(memfd)
        assert backend.stop() == 0
    logged, page = tmp_path / "logged.pftrace", tmp_path / "logged.html"
    argv = ["timeline", "--event-log", str(backend.event_log), "-o", str(logged)]
    assert ctl_main([*argv, "--html", str(page)]) == 0
    assert "1 violation(s)" in capsys.readouterr().out
    for out in (live, logged):
        names, packets = _parse(out.read_bytes())
        slices = _slices(names, packets)
        assert [(e.name, list(e.flow_ids)) for _, e, _ in slices if e.flow_ids] == [
            ("REM_MEM_REG", [1])
        ]
        ends = [(e.name, list(e.terminating_flow_ids)) for _, e, _ in slices]
        assert ("ADD_MEM_REG", [1]) in ends
        assert [e.name for track, e, _ in slices if track == "violations"] == ["merge"]
    checker = _check_html(page.read_text())
    assert checker.classes["rect.violation"] == 1 and checker.classes["rect.region"] == 2
    # the merged region stayed until the front-end went away
    assert "mapped by #3, unmapped when the connection ended" in page.read_text()


def test_run_guest_writes_the_timeline_of_its_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tools/run-guest's stop step, fed the recorded run's files: both files, every request."""
    run_guest = load_tool("run-guest", monkeypatch)
    written = run_guest.write_timeline(tmp_path, PLUG_EVENTS, PLUG_TRACE)
    assert written == [tmp_path / "timeline.pftrace", tmp_path / "timeline.html"]
    names, packets = _parse(written[0].read_bytes())
    requests = [e for track, e, _ in _slices(names, packets) if track == "vhost-user conn 0"]
    assert len(requests) == len(PLUG_EVENTS.read_text().splitlines()) == 7
    assert _check_html(written[1].read_text()).classes["rect.region"] == 4


def _counters(packets: list[Any], names: dict[int, str]) -> dict[str, list[tuple[int, float]]]:
    """``(ts, value)`` of every counter event, by track name."""
    out: dict[str, list[tuple[int, float]]] = {}
    for p in packets:
        event = p.track_event
        if event.type == TrackEvent.TYPE_COUNTER:
            value = (
                event.double_counter_value
                if event.HasField("double_counter_value")
                else event.counter_value
            )
            out.setdefault(names[event.track_uuid], []).append((p.timestamp, value))
    return out


def test_counters_of_fds_and_huge_pages_come_from_what_each_line_mapped(tmp_path: Path) -> None:
    """A memfd region (one fd held), a hugetlb one (two: the received fd is kept for peek), the
    hugetlb one removed: the fds counter follows, the huge page pool is sampled when the
    hugetlb region was mapped, and each region's track carries its backing."""
    try:
        huge = os.memfd_create("timeline-huge", os.MFD_HUGETLB)
    except OSError as err:
        pytest.fail(f"cannot create a hugetlb memfd ({err}): this test needs 2 MiB huge pages")
    os.ftruncate(huge, 2 * HPAGE)
    memfd = make_memfd(HPAGE)
    backend = start_backend(tmp_path)
    fe = FakeFrontend.connect(backend.socket)
    try:
        fe.handshake()
        assert fe.add_region(0, HPAGE, 0x7E0000000000, 0, memfd) == 0
        assert fe.add_region(BASE, 2 * HPAGE, 0x7F0000000000, 0, huge) == 0
        assert fe.rem_region(BASE, 2 * HPAGE, 0x7F0000000000) == 0
        backend.wait_for(lambda: len(backend.memory_events()) == 3, 5, "three memory lines")
    finally:
        fe.close()
        os.close(memfd)
        os.close(huge)
        assert backend.stop() == 0
    lines = backend.memory_events()
    [mapped] = lines[1]["mapped"]
    assert (mapped["backing"], mapped["fds_held"]) == ("memfd-hugetlb", 2)
    out = tmp_path / "run.pftrace"
    assert ctl_main(["timeline", "--event-log", backend.event_log, "-o", str(out)]) == 0
    names, packets = _parse(out.read_bytes())
    counters = _counters(packets, names)
    # the disconnect releases the last one
    assert [v for _, v in counters["fds held by mappings"]] == [0, 1, 3, 1, 0]
    assert counters["huge pages free (2 MiB)"] == [
        (round(lines[1]["ts"] * 1e9), mapped["hugepages_free_at_map"])
    ]
    region = next(e for track, e, _ in _slices(names, packets) if track.startswith("GPA 0x1000"))
    notes = {a.name: a.string_value or a.int_value for a in region.debug_annotations}
    assert notes["backing"] == "memfd-hugetlb" and notes["page_size"] == HPAGE
    assert notes["fds_held"] == 2


def test_packets_per_second_from_datapath_stats_lines() -> None:
    """Two lines a second apart, then a quiet spell and a half-second burst: the rate holds
    over each line's interval and drops to zero when the next does not follow at once."""
    from vhostmem import journal

    def stats(ts: float, tx: int, interval: float) -> dict[str, Any]:
        counters = dict.fromkeys(journal.DATAPATH_COUNTERS, 0) | {"tx_packets": tx}
        return journal.datapath_stats(
            socket="/run/vm.sock", conn=1, tap="vhm0", counters=counters, interval=interval, ts=ts
        )

    lines = [stats(10.0, 100, 1.0), stats(11.0, 300, 1.0), stats(20.0, 350, 0.5)]
    assert [p for line in lines for p in schema.problems(line, "event-log")] == []
    names, packets = _parse(build_trace(replay(lines)))
    counters = _counters(packets, names)
    s = 1_000_000_000
    assert counters["/run/vm.sock conn 1 tx packets/s"] == [
        (9 * s, 100.0),
        (10 * s, 200.0),
        (11 * s, 0.0),
        (round(19.5 * s), 100.0),
        (20 * s, 0.0),
    ]
    assert {v for _, v in counters["/run/vm.sock conn 1 rx packets/s"]} == {0.0}
    # counters, not instants on the connection's track
    assert not [p for p in packets if p.track_event.type == TrackEvent.TYPE_INSTANT]
