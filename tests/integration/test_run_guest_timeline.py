"""tools/run-guest's plug cycle against a real QEMU: the timeline it writes when it stops.

run-guest starts vhostmem and QEMU (with QEMU's trace), boots the guest and plugs 2 GiB (two
memslots); the test unplugs them through the QMP socket run-guest leaves free, then stops
run-guest with SIGTERM, as a user's Ctrl-C would. WORKDIR/timeline.pftrace must hold every
request line of the event log as a slice on its connection's track, in order, and
WORKDIR/timeline.html a table row per request and a bar per region mapping.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent
from qemu.qmp.legacy import QEMUMonitorProtocol

from vhostmem.timeline import parse_event_lines

from .conftest import GiB

RUN_GUEST = Path(__file__).resolve().parents[2] / "tools" / "run-guest"
#: Event-log kinds that are one request each (the timeline's slices on a connection's track).
REQUEST_LINES = ("memory-table", "request-failed", "request-note")


def _wait_output(out: Path, proc: subprocess.Popen[bytes], pattern: str, timeout: float) -> str:
    """The first match of ``pattern`` in run-guest's output, waiting at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        text = out.read_text(errors="replace")
        found = re.search(pattern, text, re.MULTILINE)
        if found:
            return found.group(1)
        if proc.poll() is not None:
            pytest.fail(f"run-guest exited with {proc.returncode} before {pattern!r}:\n{text}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {pattern!r} from run-guest within {timeout:g} s:\n{text}")
        time.sleep(0.1)


def _unplug_all(qmp_path: str, timeout: float) -> None:
    """Set virtio-mem's requested-size to 0 and wait until the guest unplugged it."""
    qmp = QEMUMonitorProtocol(qmp_path)
    qmp.connect()
    try:
        path = "/machine/peripheral/vm0"
        qmp.cmd("qom-set", path=path, property="requested-size", value=0)
        deadline = time.monotonic() + timeout
        while True:
            size = qmp.cmd("qom-get", path=path, property="size")
            if size == 0:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"virtio-mem still has {size:#x} plugged after {timeout:g} s")
            time.sleep(0.1)
    finally:
        qmp.close()


def _stop(proc: subprocess.Popen[bytes], out: Path) -> None:
    """SIGTERM run-guest (it stops QEMU, then vhostmem, then writes the timeline); if it does
    not exit in time, SIGKILL it and the QEMU and vhostmem pids it printed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for pid in re.findall(r"^run-guest: (?:vhostmem|QEMU) pid (\d+)", out.read_text(), re.M):
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_run_guest_plug_cycle_timeline_holds_every_request(
    qemu_ready: None, tmp_path: Path
) -> None:
    workdir = tmp_path / "run"
    out = tmp_path / "run-guest.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(RUN_GUEST),
                "--start-vhostmem",
                "--plug",
                "2G",
                "--workdir",
                str(workdir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C goes to the test, not to it
        )
    try:
        qmp_user = _wait_output(out, proc, r"^  QMP \(free for you\): +(\S+)", 180)
        _wait_output(out, proc, r"^run-guest: (running); Ctrl-C", 30)
        _unplug_all(qmp_user, 90)
    finally:
        _stop(proc, out)
    log = out.read_text()
    assert proc.returncode == 0, log
    assert f"run-guest: timeline: {workdir / 'timeline.pftrace'}" in log
    assert f"run-guest: timeline: {workdir / 'timeline.html'}" in log

    lines = parse_event_lines((workdir / "vu.events.jsonl").read_text().splitlines())
    requests = [e for e in lines if e["event"] in REQUEST_LINES]
    memory = [e for e in requests if e["event"] == "memory-table"]
    # the plug cycle: boot RAM and two memslots added, the two memslots removed
    assert [(e["request"], e["result"]) for e in memory] == [("ADD_MEM_REG", "ok")] * 3 + [
        ("REM_MEM_REG", "ok")
    ] * 2
    assert {m["size"] for e in memory for m in e.get("mapped", ())} == {512 << 20, GiB}
    # every line stands for one request, and nothing of the run is of a kind the timeline
    # draws otherwise (dirty-log lines are requests too: none without a migration)
    assert not [e for e in lines if e["event"] == "dirty-log"]

    trace = Trace()
    trace.ParseFromString((workdir / "timeline.pftrace").read_bytes())
    names = {
        p.track_descriptor.uuid: p.track_descriptor.name
        for p in trace.packet
        if p.HasField("track_descriptor")
    }
    slices = [
        (names[p.track_event.track_uuid], p.track_event.name)
        for p in trace.packet
        if p.HasField("track_event") and p.track_event.type == TrackEvent.TYPE_SLICE_BEGIN
    ]
    per_connection = Counter(track for track, _ in slices if re.search(r" conn \d+$", track))
    want = Counter(f"{e['socket']} conn {e['conn']}" for e in requests)
    assert per_connection == want
    for track in want:
        assert [name.removesuffix(" (failed)") for t, name in slices if t == track] == [
            e.get("request") or e["name"]
            for e in requests
            if f"{e['socket']} conn {e['conn']}" == track
        ]
    # QEMU's trace was there: its commits are on their own track
    assert any(track == "QEMU commits" for track, _ in slices)

    page = (workdir / "timeline.html").read_text()
    assert page.count("<tr><td>") + page.count('<tr id="req-') == len(requests)
    assert all(f'<tr id="req-{e["seq"]}">' in page for e in memory)
    assert page.count('<rect class="region"') == 3  # boot RAM and the two memslots
    assert "check: clean, no violation in 5 memory-table request(s)" in page
