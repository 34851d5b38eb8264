"""``vhostmem --qemu-trace FILE`` end to end: a fake front-end plays QEMU, sending messages and
writing QEMU's trace lines the way QEMU 10's log backend does (the write line after the message,
the read line after the reply), into a file vhostmem follows while it runs."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostmem.ctl import ctl_main
from vhostmem.protocol import ProtocolFeature
from vhostmem.testing.backend import RunningBackend, start_backend
from vhostmem.testing.frontend import FakeFrontend, make_memfd

GiB = 1 << 30
MiB = 1 << 20
BASE = 0x100000000
HOST = 0x7F0000000000


class QemuTrace:
    """Writes QEMU's trace lines into ``path`` (opened per write, as a line-flushed log)."""

    def __init__(self, path: Path, tid: int = 4321) -> None:
        self.path = path
        self.tid = tid

    def line(self, text: str) -> None:
        now = time.time()
        sec, usec = divmod(round(now * 1_000_000), 1_000_000)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{self.tid}@{sec}.{usec:06d}:{text}\n")

    def commit(self) -> None:
        self.line("vhost_commit Started: 1 Changed: 1")

    def message(self, code: int, *, read: bool = True) -> None:
        """The lines of one message vhostmem answered: QEMU's write, then its read of the ack."""
        self.line(f"vhost_user_write req:{code} flags:0x9")
        if read:
            self.line(f"vhost_user_read req:{code} flags:0x5")


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = make_memfd(4 * GiB)
    yield fd
    os.close(fd)


def start(tmp_path: Path, *args: str) -> RunningBackend:
    return start_backend(tmp_path, ["--trace-wait", "500", *args])


def check(
    backend: RunningBackend, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any]]:
    code = ctl_main(["--control", backend.control, "check", "--json"])
    return code, json.loads(capsys.readouterr().out)


def check_text(backend: RunningBackend, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = ctl_main(["--control", backend.control, "check"])
    return code, capsys.readouterr().out


def add(fe: FakeFrontend, trace: QemuTrace | None, i: int, memfd: int, *, slots: int = 1) -> None:
    assert fe.add_region(BASE + i * GiB, slots * GiB, HOST + i * GiB, i * GiB, memfd) == 0
    if trace is not None:
        trace.message(37)


def rem(fe: FakeFrontend, trace: QemuTrace | None, i: int) -> None:
    assert fe.rem_region(BASE + i * GiB, GiB, HOST + i * GiB) == 0
    if trace is not None:
        trace.message(38)


def test_merge_inside_one_commit_is_flagged_through_the_trace(
    tmp_path: Path, memfd: int, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = QemuTrace(tmp_path / "qemu-trace.log")
    trace.line("vhost_commit Started: 0 Changed: 1")  # QEMU's start: the file exists first
    backend = start(tmp_path, "--qemu-trace", str(trace.path))
    try:
        with FakeFrontend.connect(backend.socket) as fe:
            fe.handshake()
            add(fe, trace, 0, memfd)  # the device start
            trace.commit()
            rem(fe, trace, 0)
            time.sleep(0.05)  # a loaded runner: 50 ms between the REM's ack and the ADD
            add(fe, trace, 0, memfd, slots=2)
            code, doc = check(backend, capsys)
            assert code == 1 and doc["counts"]["violations"] == 1
            assert doc["batching"]["method"] == "qemu-trace" and doc["batching"]["commits"] == 2
            assert doc["batching"]["fallbacks"] == [] and doc["wire"]["mismatches"] == []
            (v,) = doc["violations"]
            assert v["kind"] == "merge"
            # The front-end is this test (python), not QEMU: no talk of QEMU's memslots.
            assert "533f5d6679" not in v["why"] and f"pid {os.getpid()}" in v["why"]
            code, out = check_text(backend, capsys)
            assert code == 1 and "batches: QEMU trace, 2 commits" in out
        backend.wait_for(lambda: len(backend.memory_events()) == 3, 5, "3 lines")
        lines = backend.memory_events()
        assert [e["batching"] for e in lines] == ["qemu-trace"] * 3
        assert lines[2]["commit"] == "QEMU commit at trace line 4"
    finally:
        assert backend.stop() == 0


def test_without_trace_the_gap_rule_misses_it_and_says_so(
    tmp_path: Path, memfd: int, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = start(tmp_path)
    try:
        with FakeFrontend.connect(backend.socket) as fe:
            fe.handshake()
            add(fe, None, 0, memfd)
            time.sleep(0.1)
            rem(fe, None, 0)
            time.sleep(0.05)
            add(fe, None, 0, memfd, slots=2)
            code, doc = check(backend, capsys)
            assert code == 0 and doc["counts"]["violations"] == 0
            assert doc["batching"]["method"] == "gap" and doc["wire"]["checked"] is False
            code, out = check_text(backend, capsys)
            assert "batches: 20 ms gap (heuristic; give --qemu-trace for exact batches)" in out
        backend.wait_for(lambda: len(backend.memory_events()) == 3, 5, "3 lines")
        lines = backend.memory_events()
        assert [e["batching"] for e in lines] == ["gap"] * 3
    finally:
        assert backend.stop() == 0


def test_a_trace_file_that_appears_after_the_first_messages_falls_back(
    tmp_path: Path, memfd: int, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "qemu-trace.log"
    backend = start(tmp_path, "--qemu-trace", str(path))
    try:
        with FakeFrontend.connect(backend.socket) as fe:
            fe.handshake()
            add(fe, None, 0, memfd)
            trace = QemuTrace(path)  # too late: the connection began without it
            trace.commit()
            add(fe, trace, 1, memfd)
            code, doc = check(backend, capsys)
            assert code == 0 and doc["batching"]["method"] == "gap"
            (fallback,) = doc["batching"]["fallbacks"]
            assert fallback["seq"] == 1
            assert (
                f"the trace file {path} did not exist when the front-end connected"
                in (fallback["reason"])
            )
        backend.wait_for(lambda: len(backend.memory_events()) == 2, 5, "2 lines")
        lines = backend.memory_events()
        assert [e["batching"] for e in lines] == ["gap", "gap"]
        assert "did not exist" in lines[0]["fallback"]
        assert "QEMU TRACE PAIRING ENDS" in backend.stderr()
    finally:
        assert backend.stop() == 0


def test_a_trace_file_replaced_mid_run_falls_back(
    tmp_path: Path, memfd: int, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "qemu-trace.log"
    trace = QemuTrace(path)
    trace.line("vhost_commit Started: 0 Changed: 1")
    backend = start(tmp_path, "--qemu-trace", str(path))
    try:
        with FakeFrontend.connect(backend.socket) as fe:
            fe.handshake()
            add(fe, trace, 0, memfd)
            code, doc = check(backend, capsys)
            assert code == 0 and doc["batching"]["method"] == "qemu-trace"
            path.unlink()  # another QEMU run writes a new file
            trace.line("vhost_commit Started: 1 Changed: 1")
            trace.commit()
            add(fe, trace, 1, memfd)
            code, doc = check(backend, capsys)
            assert code == 0 and doc["batching"]["method"] == "mixed"
            (fallback,) = doc["batching"]["fallbacks"]
            assert "ADD_MEM_REG #2" in fallback["reason"]
            assert f"the trace file {path} was replaced" in fallback["reason"]
    finally:
        assert backend.stop() == 0


def test_wire_cross_check_fails_check_naming_the_message(
    tmp_path: Path, memfd: int, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = QemuTrace(tmp_path / "qemu-trace.log")
    trace.line("vhost_commit Started: 0 Changed: 1")
    backend = start(tmp_path, "--qemu-trace", str(trace.path))
    try:
        with FakeFrontend.connect(backend.socket) as fe:
            fe.handshake()
            add(fe, trace, 0, memfd)
            trace.commit()
            trace.message(37)  # QEMU wrote an ADD_MEM_REG that never reached vhostmem
        backend.wait_for(
            lambda: any(e.get("event") == "disconnect" for e in backend.log_lines()), 5, "the end"
        )
        code, doc = check(backend, capsys)
        assert code == 1 and doc["counts"]["violations"] == 0
        (m,) = doc["wire"]["mismatches"]
        assert m["mismatch"] == (
            "QEMU wrote ADD_MEM_REG (trace line 5 (thread 4321)) that vhostmem never received"
        )
        assert "WIRE MISMATCH" in backend.stderr()
    finally:
        assert backend.stop() == 0


def test_dpdk_like_set_mem_tables_are_clean_and_each_remap_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DPDK 22.11's virtio-user grows one hugetlb region at one GPA by whole SET_MEM_TABLEs,
    disabling its rings around each change."""
    backend = start_backend(tmp_path)
    fd = make_memfd(370 * MiB)
    try:
        with FakeFrontend.connect(backend.socket) as fe:
            fe.handshake(protocol_features=ProtocolFeature.REPLY_ACK)  # whole tables
            for size in (2, 8, 14, 18, 370):
                assert fe.set_mem_table([(0, size * MiB, 0x7F5000000000, 0, fd)]) == 0
            code, doc = check(backend, capsys)
            assert code == 0 and doc["clean"] and doc["counts"]["violations"] == 0
            assert [(m["kind"], m["added"][0]["size"] // MiB) for m in doc["remaps"]] == [
                ("grow", 8),
                ("grow", 14),
                ("grow", 18),
                ("grow", 370),
            ]
            code, out = check_text(backend, capsys)
            assert code == 0 and "atomic: yes" in out and out.count("remap (grow") == 4
        assert "NON-ATOMIC" not in backend.stderr()
    finally:
        os.close(fd)
        assert backend.stop() == 0
