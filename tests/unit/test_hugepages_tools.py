"""hugepages/ scripts as a person runs them: reserve and restore, and see who holds pages."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NR = Path("/proc/sys/vm/nr_hugepages")


def test_setup_reserves_idempotently_and_restores(tmp_path: Path) -> None:
    before = int(NR.read_text())
    state = tmp_path / "hp.state"
    cmd = [
        str(ROOT / "hugepages/setup.sh"),
        "--size",
        "2M",
        "--pages",
        str(before + 4),
        "--save",
        str(state),
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    try:
        assert first.returncode == 0, first.stderr
        assert int(NR.read_text()) == before + 4
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0 and int(NR.read_text()) == before + 4
        assert "ok" in second.stdout
    finally:
        restore = subprocess.run(
            [str(ROOT / "hugepages/setup.sh"), "--restore", str(state)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert restore.returncode == 0, restore.stderr
    assert int(NR.read_text()) == before


def test_probe_shows_pools_and_this_process_holding_pages() -> None:
    before = int(NR.read_text())
    NR.write_text(str(before + 2))
    try:
        fd = os.memfd_create("probe-test", os.MFD_HUGETLB | os.MFD_CLOEXEC)
        os.ftruncate(fd, 2 << 20)
        with mmap.mmap(fd, 2 << 20) as mm:
            mm[0] = 1  # fault the huge page in
            out = subprocess.run(
                [sys.executable, str(ROOT / "hugepages/probe.py"), "--json"],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
        os.close(fd)
    finally:
        NR.write_text(str(before))
    doc = json.loads(out)
    assert doc["version"] == 1
    assert any(p["page_size_bytes"] == 2 << 20 and p["total"] >= 2 for p in doc["pools"])
    mine = [h for h in doc["holders"] if h["pid"] == os.getpid()]
    assert mine and mine[0]["hugetlb_bytes"] >= 2 << 20
