"""Atomicity checking end to end: a front-end replays what QEMU before 8.2 sent (REM of a live
memslot, then at once an ADD of the merged range); vhostmem flags it in the event log and in
``vhostmem-ctl check``; QEMU >= 8.2's per-memslot updates stay clean."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostmem.ctl import ctl_main
from vhostmem.testing.backend import RunningBackend, start_backend
from vhostmem.testing.frontend import FakeFrontend, make_memfd

GiB = 1 << 30
BASE = 0x100000000
HOST = 0x7F0000000000

#: vhostmem, a front-end that shook hands with it, and a 4 GiB memfd to map.
CheckRig = tuple[RunningBackend, FakeFrontend, int]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[CheckRig]:
    backend = start_backend(tmp_path)
    fe = FakeFrontend.connect(backend.socket)
    fe.handshake()
    memfd = make_memfd(4 * GiB)
    yield backend, fe, memfd
    fe.close()
    os.close(memfd)
    assert backend.stop() == 0


def check(
    backend: RunningBackend, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any]]:
    code = ctl_main(["--control", backend.control, "check", "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_pre_82_merge_is_flagged(rig: CheckRig, capsys: pytest.CaptureFixture[str]) -> None:
    backend, fe, memfd = rig
    assert fe.add_region(BASE, GiB, HOST, 0, memfd) == 0  # memslot 0 plugged
    time.sleep(0.1)  # a later commit
    # plugging memslot 1 the pre-8.2 way: remove live memslot 0, add 0+1 merged, at once
    assert fe.rem_region(BASE, GiB, HOST) == 0
    assert fe.add_region(BASE, 2 * GiB, HOST, 0, memfd) == 0
    # the ack goes out first; the event-log line follows at once
    [line] = backend.wait_for(backend.violations, 5, "the violation in the event log")
    assert line["request"] == "ADD_MEM_REG" and (line["added"], line["removed"]) == (1, 0)
    [violation] = line["violations"]
    assert violation["kind"] == "merge"
    assert (violation["unmapped"]["start"], violation["unmapped"]["end"]) == (BASE, BASE + GiB)
    # The front-end here is not QEMU: the explanation does not speak of QEMU's memslots.
    assert "533f5d6679" not in violation["why"] and "the front-end" in violation["why"]
    code, doc = check(backend, capsys)
    assert code == 1 and not doc["clean"] and doc["counts"]["violations"] == 1
    assert ctl_main(["--control", backend.control, "check"]) == 1
    assert "atomic: NO" in capsys.readouterr().out
    assert "NON-ATOMIC UPDATE (merge)" in backend.stderr()


def test_rem_one_memslot_add_another_is_clean(
    rig: CheckRig, capsys: pytest.CaptureFixture[str]
) -> None:
    backend, fe, memfd = rig
    for i in (0, 1):
        assert fe.add_region(BASE + i * GiB, GiB, HOST + i * GiB, i * GiB, memfd) == 0
    time.sleep(0.1)
    assert fe.rem_region(BASE + GiB, GiB, HOST + GiB) == 0
    assert fe.add_region(BASE + 3 * GiB, GiB, HOST + 3 * GiB, 3 * GiB, memfd) == 0
    time.sleep(0.1)
    # unplug and replug the same memslot in separate batches: not a violation either
    assert fe.rem_region(BASE, GiB, HOST) == 0
    time.sleep(0.1)
    assert fe.add_region(BASE, GiB, HOST, 0, memfd) == 0
    backend.wait_for(lambda: len(backend.memory_events()) == 6, 5, "six event-log lines")
    assert backend.violations() == []
    code, doc = check(backend, capsys)
    assert code == 0 and doc["clean"] and doc["counts"]["requests"] == 6
    classes = [e["classification"] for e in backend.memory_events()]
    assert classes == ["plug", "plug", "unplug", "plug", "unplug", "plug"]


def test_check_cannot_run_without_control(tmp_path: Path) -> None:
    assert ctl_main(["--control", str(tmp_path / "none.ctl"), "check"]) == 2


def test_explain_needs_no_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl_main(["explain", "0", "0,1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == 1
    assert ctl_main(["explain"]) == 0
    out = capsys.readouterr().out
    assert "!! merge" in out and "QEMU >= 8.2" in out
    assert ctl_main(["explain", "x"]) == 2
