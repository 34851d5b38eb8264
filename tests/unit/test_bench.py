"""tools/bench's pure parts: --datapath's command line, its table, its page section, the
profile summary. The measurements themselves are exercised by running the bench."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .helpers.tools import load_tool


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_tool("bench", monkeypatch)


# -- command line ------------------------------------------------------------------------------


def test_datapath_defaults_and_quick(bench: ModuleType) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    args = bench.parse_args(["--datapath"])
    assert (args.window, args.warmup, args.runs) == (3.0, 1.0, None)
    expected = (allowed[-2], allowed[-1]) if len(allowed) > 1 else (allowed[0], allowed[0])
    assert args.cpus == expected
    quick = bench.parse_args(["--datapath", "--quick", "--window", "2"])
    assert (quick.window, quick.warmup) == (2.0, 0.5)


def test_cpus_parsing(bench: ModuleType) -> None:
    assert bench.parse_cpus("0,1", {0, 1}) == (0, 1)
    assert bench.parse_cpus("1", {0, 1}) == (1, 1)
    assert bench.default_cpus({0, 1, 2, 3}) == (2, 3)
    assert bench.default_cpus({5}) == (5, 5)
    with pytest.raises(ValueError, match="CPU 7 is not in this process's affinity"):
        bench.parse_cpus("0,7", {0, 1})
    with pytest.raises(ValueError, match="give two CPUs"):
        bench.parse_cpus("0,1,0", {0, 1})
    with pytest.raises(ValueError, match="give CPU numbers"):
        bench.parse_cpus("a,b", {0, 1})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--datapath", "--floor"], "--floor does not go with --datapath"),
        (["--datapath", "--check"], "--check does not go with --datapath (no target yet)"),
        (["--datapath", "--cpu", "0"], "--cpu does not go with --datapath"),
        (
            ["--datapath", "--profile", "--profile-workload", "fill"],
            "--profile-workload does not go with --datapath",
        ),
        (["--window", "2"], "--window only go with --datapath"),
        (["--warmup", "1", "--cpus", "0,1"], "--warmup, --cpus only go with --datapath"),
        (["--datapath", "--window", "0"], "--window must be positive"),
        (["--datapath", "--runs", "0"], "--runs must be at least 1"),
        (["--datapath", "--cpus", "0,4096"], "CPU 4096 is not in this process's affinity"),
    ],
)
def test_datapath_refusals(
    bench: ModuleType, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_memory_table_mode_is_unchanged(bench: ModuleType) -> None:
    args = bench.parse_args(["--quick", "--cpu", "0", "--check"])
    assert not args.datapath and args.quick and args.cpu == 0 and args.check
    assert args.window is None and args.cpus is None


# -- frames and counters ---------------------------------------------------------------------


def test_udp_frame_is_testpmd_sized_with_a_valid_ip_checksum(bench: ModuleType) -> None:
    src, dst = bytes.fromhex("0a0000000001"), bytes.fromhex("020000000001")
    frame = bench.udp_frame(src, dst)
    assert len(frame) == 64
    assert frame[:6] == dst and frame[6:12] == src and frame[12:14] == b"\x08\x00"
    ip = frame[14:34]
    total = sum(struct.unpack("!10H", ip))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF  # RFC 1071: the header sums to all ones
    assert ip[16:20] == bytes([198, 18, 0, 2]) and ip[9] == 17
    assert struct.unpack("!HHH", frame[34:40]) == (9, 9, 64 - 14 - 20)


def test_rates_deltas_and_agreement(bench: ModuleType) -> None:
    r = bench.Reading
    before = {"a": r(100, 10.0), "b": r(5, 10.5)}
    after = {"a": r(400, 13.0), "b": r(5, 13.5), "c": r(1, 14.0)}
    assert bench.rates(before, after) == {"a": 100.0, "b": 0.0}
    assert bench.deltas(before, after) == {"a": 300, "b": 0}
    ok, line = bench.agreement(("a", "b"), {"a": 7, "b": 7})
    assert ok and line == "a 7 = b 7: agree"
    ok, line = bench.agreement(("a", "b", "c"), {"a": 7, "b": 9, "c": 8})
    assert not ok and line == "a 7 / b 9 / c 8: DIFFER by up to 2"


def _run(pps: float, agree: bool = True, drained: bool = True) -> dict[str, Any]:
    return {
        "pps": pps,
        "cpu_pct": 99.0 if pps < 100000 else 100.0,
        "counts": {"generator sent": 11, "generator refused": 4},
        "drained": drained,
        "agree": agree,
        "agreement": "x 1 = y 1: agree" if agree else "x 1 / y 2: DIFFER by up to 1",
    }


def test_best_of_runs_ratio_and_table(bench: ModuleType) -> None:
    results = {
        "vhostmem": {"tx": [_run(50000), _run(60000.4)], "rx": [_run(40000), _run(30000)]},
        "net_vhost": {
            "tx": [_run(4000000), _run(3000000)],
            "rx": [_run(2000000, drained=False), _run(1000000)],
        },
    }
    best = bench.dp_best(results)
    assert best["tx"]["vhostmem"] == {
        "pps": 60000.4,
        "cpu_pct": 99.0,
        "run": 2,
        "runs_pps": [50000, 60000],
    }
    assert best["tx"]["net_vhost"]["run"] == 1
    assert best["tx"]["ratio"] == pytest.approx(60000.4 / 4000000)
    assert best["rx"]["ratio"] == pytest.approx(0.02)
    text = bench.dp_table(best, ["HEADER", "pinning: ..."], results)
    lines = text.splitlines()
    assert lines[:2] == ["HEADER", "pinning: ..."]
    assert lines[2].split("  ")[0] == "direction"
    tx = next(line for line in lines if line.startswith("front-end TX"))
    assert "60,000" in tx and "4,000,000" in tx and "0.0150x" in tx and "50,000 60,000" in tx
    assert "99% / 100%" in tx
    assert "vhostmem pps per CPU-second: TX 60,606, RX 40,404 (" in text
    rx = next(line for line in lines if line.startswith("front-end RX"))
    assert "0.0200x" in rx and "2,000,000 1,000,000" in rx
    assert "  net_vhost RX: x 1 = y 1: agree (NOT drained)" in lines
    assert "  vhostmem RX: x 1 = y 1: agree; generator sent 11, generator refused 4" in lines
    assert "  net_vhost TX: x 1 = y 1: agree" in lines


def test_ratio_of_comparable_back_ends_has_two_decimals(bench: ModuleType) -> None:
    results = {
        name: {"tx": [_run(pps)], "rx": [_run(pps)]}
        for name, pps in (("vhostmem", 900.0), ("net_vhost", 1000.0))
    }
    text = bench.dp_table(bench.dp_best(results), [], results)
    assert " 0.90x " in text


# -- the page --------------------------------------------------------------------------------

TOP = "# vhostmem performance\n\nGenerated by X.\n\n```\nrows\n```\n"
SECTION = "## Data path: packets per second\n\nGenerated by Y.\n\n```\npps\n```\n"


def test_page_section_is_added_then_replaced_and_the_top_kept(bench: ModuleType) -> None:
    page = bench.merge_page(TOP, section=SECTION)
    assert page == TOP + "\n" + SECTION
    again = bench.merge_page(page, section=SECTION.replace("pps", "new"))
    assert again == TOP + "\n" + SECTION.replace("pps", "new")
    other = "## Other\n\ntext\n"
    both = bench.merge_page(bench.merge_page(TOP, section=other), section=SECTION)
    assert both == TOP + "\n" + other + "\n" + SECTION


def test_page_top_is_replaced_and_sections_kept(bench: ModuleType) -> None:
    page = bench.merge_page(TOP + "\n" + SECTION, top=TOP.replace("rows", "fresh"))
    assert page == TOP.replace("rows", "fresh") + "\n" + SECTION
    assert bench.merge_page("", top=TOP) == TOP
    assert bench.merge_page("", section=SECTION) == "# vhostmem performance\n\n" + SECTION


def test_write_page_keeps_the_other_mode(bench: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "performance.md"
    bench.write_page(str(path), "rows\n", ["--runs", "3"])
    bench.write_page(str(path), "pps\n", ["--datapath"], datapath=True)
    bench.write_page(str(path), "rows 2\n", ["--runs", "1"])
    text = path.read_text()
    assert text.startswith("# vhostmem performance\n\nGenerated by `tools/bench --runs 1`")
    assert "```\nrows 2\n```" in text and "```\nrows\n```" not in text
    _, sep, section = text.partition("\n## Data path: packets per second\n")
    assert sep and "Generated by `tools/bench --datapath`" in section and "```\npps\n```" in section


# -- profile summary -------------------------------------------------------------------------


def test_fold_summary_self_inclusive_and_files(bench: ModuleType) -> None:
    lines = [
        "<module> (vhostmem/__main__.py:1);run (vhostmem/datapath.py:280);"
        "step (vhostmem/datapath.py:409);pop (vhostmem/virtqueue.py:391) 6",
        "<module> (vhostmem/__main__.py:1);run (vhostmem/datapath.py:280);"
        "step (vhostmem/datapath.py:409) 3",
        # recursion: a frame twice on one stack counts once inclusively
        "<module> (vhostmem/__main__.py:1);f (vhostmem/x.py:1);f (vhostmem/x.py:1) 1",
        "",
    ]
    summary = bench.fold_summary(lines, top=3)
    assert summary["samples"] == 10
    assert summary["top_self"] == [
        {"frame": "pop (vhostmem/virtqueue.py:391)", "samples": 6, "pct": 60.0},
        {"frame": "step (vhostmem/datapath.py:409)", "samples": 3, "pct": 30.0},
        {"frame": "f (vhostmem/x.py:1)", "samples": 1, "pct": 10.0},
    ]
    assert summary["top_files"][0] == {"frame": "vhostmem/virtqueue.py", "samples": 6, "pct": 60.0}
    inclusive = {e["frame"]: e["samples"] for e in summary["top_inclusive"]}
    assert inclusive == {
        "run (vhostmem/datapath.py:280)": 9,
        "step (vhostmem/datapath.py:409)": 9,
        "pop (vhostmem/virtqueue.py:391)": 6,
    }
    assert bench.fold_summary([], top=3)["top_self"] == []
