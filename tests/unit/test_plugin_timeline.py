"""The pytest plugin (vhostmem/testing/plugin.py) attaches a failed test's timeline.

An inner pytest session (pytester, in a subprocess with this checkout's plugin only) runs two
tests on a real vhostmem each: one fails on purpose, one passes. The failed one gets both files
beside its back-end's event log, named in its failure output and as junitxml properties; the
passing one gets none.
"""

from __future__ import annotations

import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent

from vhostmem.testing.plugin import TIMELINE

pytest_plugins = ("pytester",)

INNER = """
import os

from vhostmem.testing.frontend import FakeFrontend, make_memfd

MIB = 1 << 20


def plug(backend, gpa):
    fe = FakeFrontend.connect(backend.socket)
    fd = make_memfd(2 * MIB)
    try:
        fe.handshake()
        assert fe.add_region(gpa, 2 * MIB, 0x7F0000000000, 0, fd) == 0
    finally:
        os.close(fd)
    return fe


def test_fails_on_purpose(vhostmem_backend):
    fe = plug(vhostmem_backend, 0x100000000)
    try:
        assert vhostmem_backend.regions() == [], "this test fails on purpose"
    finally:
        fe.close()


def test_passes(vhostmem_backend):
    plug(vhostmem_backend, 0).close()
"""


@pytest.fixture
def short_basetemp() -> Iterator[Path]:
    """The inner session's temp root: its socket paths must fit AF_UNIX's 108 bytes, which
    pytester's own directory does not leave room for."""
    path = Path(tempfile.mkdtemp(prefix="vhm-plugin-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def test_a_failed_test_gets_its_timeline_and_a_passing_one_none(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, short_basetemp: Path
) -> None:
    # Only this checkout's plugin, whatever else the machine has installed.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_inner=INNER)
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(
        "-p",
        "vhostmem.testing.plugin",
        f"--junitxml={junit}",
        f"--basetemp={short_basetemp}",
        timeout=120,
    )
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    # The failure output has the section, listing both files.
    section = out.split(f" {TIMELINE} ", 1)[1].split("\n", 1)[1]
    listed = [Path(line) for line in section.splitlines()[:2]]
    assert [p.name for p in listed] == ["vu.sock.timeline.pftrace", "vu.sock.timeline.html"]
    assert all(p.parent.name.startswith("test_fails_on_purpose") for p in listed)
    # junitxml: the failed test carries them as properties; the passing one has none.
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    props = {
        name: [
            (p.get("name"), p.get("value"))
            for p in case.iter("property")
            if p.get("name") == "vhostmem_timeline"
        ]
        for name, case in cases.items()
    }
    assert props == {
        "test_fails_on_purpose": [("vhostmem_timeline", str(p)) for p in listed],
        "test_passes": [],
    }
    # Only the failed test wrote any (the runs' whole temp tree).
    assert sorted(short_basetemp.rglob("*.timeline.*")) == sorted(listed)
    # Both parse: the ADD is a slice on the connection's track, the region one bar.
    trace = Trace()
    trace.ParseFromString(listed[0].read_bytes())
    names = {p.track_descriptor.uuid: p.track_descriptor.name for p in trace.packet}
    slices = [
        (names[p.track_event.track_uuid], p.track_event.name)
        for p in trace.packet
        if p.HasField("track_event") and p.track_event.type == TrackEvent.TYPE_SLICE_BEGIN
    ]
    socket = str(listed[0].parent / "vu.sock")
    assert (f"{socket} conn 1", "ADD_MEM_REG") in slices
    assert ("GPA 0x100000000-0x100200000 (2 MiB)", "mapped (conn 1)") in slices
    page = listed[1].read_text()
    assert page.count('class="region"') == 1 and "check: clean" in page
