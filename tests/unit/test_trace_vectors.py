"""Real QEMU 10.0.2 traces, replayed through the pairing and the checker.

``tests/vectors/qemu-10.0.2-plug-cycle.trace.log`` is QEMU's own trace (``-trace vhost_commit
-trace vhost_user_write -trace vhost_user_read -D FILE -msg timestamp=on``) of the integration
run (tests/integration/test_qemu_atomicity.py, recorded with ``VHOSTMEM_RECORD_VECTORS``): the
guest boots (the device start sends boot RAM), then virtio-mem goes 0 -> 1 -> 3 -> 1 -> 0 GiB.
``...events.jsonl`` holds vhostmem's memory event lines of that run (reply time ``ts``, request,
region as received). The replay pairs them as the shell does.

``qemu-10.0.2-legacy-set-mem-table.*``: the same guest with ``vhostmem --no-mem-slots`` (whole
tables): the device start's SET_MEM_TABLE, then virtio-mem 0 -> 1 GiB -> 0 (one memslot for the
whole device), recorded the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vhostmem.atomicity import ADD_MEM_REG, SET_MEM_TABLE, History, RegionRef
from vhostmem.qemu_trace import Pairer, parse_lines

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
BASE = VECTORS / "qemu-10.0.2-plug-cycle"
LEGACY = VECTORS / "qemu-10.0.2-legacy-set-mem-table"
GiB = 1 << 30


def load(base: Path = BASE) -> tuple[list[str], list[dict[str, Any]]]:
    trace = Path(f"{base}.trace.log").read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in Path(f"{base}.events.jsonl").read_text().splitlines()]
    return trace, events


def replay(trace: list[str], events: list[dict[str, Any]], *, use_trace: bool = True) -> History:
    history = History()
    pairer = Pairer(str(BASE)) if use_trace else None
    if pairer is not None:
        pairer.feed(parse_lines(trace))
    live: dict[tuple[int, int, int], RegionRef] = {}
    for n, e in enumerate(events, 1):
        refs = [
            RegionRef(r["gpa"], r["size"], r["uaddr"], r["mmap_offset"])
            for r in e.get("regions", [e.get("region")])
        ]
        kept: list[RegionRef] = []
        if e["request"] == SET_MEM_TABLE:
            kept = [ref for ref in refs if live.get(ref.key) == ref]
            added = [ref for ref in refs if ref not in kept]
            removed = [ref for ref in live.values() if ref not in kept]
            live = {ref.key: ref for ref in refs}
        elif e["request"] == ADD_MEM_REG:
            live[refs[0].key] = refs[0]
            added, removed = refs, []
        else:
            added, removed = [], [live.pop(refs[0].key)]
        batching, commit, text, fallback = "gap", None, "", None
        if pairer is not None:
            # The reply time is all the event line keeps: it stands in for the arrival.
            res = pairer.pair(e["request"], n, arrived=e["ts"], replied=e["ts"], now=e["ts"] + 1e6)
            assert res is not None
            batching, commit, text, fallback = res.batching, res.commit, res.edge_text, res.fallback
            for text_ in res.wire:
                history.wire_mismatch(socket="vu", conn=1, text=text_)
        history.record(
            socket="vu",
            conn=1,
            request=e["request"],
            ok=True,
            removed=removed,
            added=added,
            arrived=e["ts"],
            replied=e["ts"],
            batching=batching,
            commit=commit,
            commit_text=text,
            fallback=fallback,
            peer="qemu-system-x86",
            peer_pid=1,
        )
    if pairer is not None:
        for text_ in pairer.finish(ended=None):
            history.wire_mismatch(socket="vu", conn=1, text=text_)
    return history


def test_the_recorded_plug_cycle_is_one_commit_per_batch() -> None:
    trace, events = load()
    doc = replay(trace, events).report()
    assert doc["clean"] and doc["counts"]["violations"] == 0
    assert doc["batching"]["method"] == "qemu-trace" and doc["batching"]["fallbacks"] == []
    assert doc["wire"] == {"checked": True, "mismatches": []}
    # The device start (boot RAM, written by the vCPU thread that started the device), then
    # QEMU maps or unmaps each 1 GiB memslot in a commit of its own.
    assert [(b["names"], b["reason"].split(" at ")[0]) for b in doc["batches"]] == [
        (["ADD_MEM_REG"], "QEMU device start after trace line 262"),
        *[(["ADD_MEM_REG"], "QEMU commit")] * 3,
        *[(["REM_MEM_REG"], "QEMU commit")] * 3,
    ]
    assert doc["batching"]["commits"] == 7
    # vhostmem batched them the same way when it ran (one batch number per line).
    assert len({e["batch"] for e in events}) == 7


def test_the_recorded_trace_parses_as_qemu_writes_it() -> None:
    trace, _ = load()
    lines = parse_lines(trace)
    commits = [x for x in lines if x.event == "commit"]
    assert sum(x.started for x in commits) == 6  # one per memslot plugged or unplugged
    writes = [x.request for x in lines if x.event == "write" and x.request in (5, 37, 38)]
    assert writes == [37, 37, 37, 37, 38, 38, 38]
    assert {x.tid for x in lines if x.event == "commit" and x.started} == {lines[0].tid}


def test_the_recorded_trace_without_one_write_line_falls_back() -> None:
    trace, events = load()
    third = [i for i, t in enumerate(trace) if "vhost_user_write req:37" in t][2]
    doc = replay(trace[:third] + trace[third + 1 :], events).report()
    assert doc["batching"]["method"] == "mixed"
    (fallback,) = doc["batching"]["fallbacks"]
    assert fallback["seq"] == 3 and "a vhost_user_write line is missing" in fallback["reason"]


def test_the_recorded_trace_with_a_reply_vhostmem_did_not_send() -> None:
    """QEMU's last reply read twice: the wire cross-check names it."""
    trace, events = load()
    last = max(i for i, t in enumerate(trace) if "vhost_user_read req:38" in t)
    doc = replay([*trace[: last + 1], trace[last], *trace[last + 1 :]], events).report()
    assert not doc["clean"]
    assert doc["wire"]["mismatches"]
    assert "that vhostmem did not send" in doc["wire"]["mismatches"][0]["mismatch"]


def test_the_recorded_legacy_tables_are_one_commit_each() -> None:
    trace, events = load(LEGACY)
    doc = replay(trace, events).report()
    assert doc["clean"] and doc["wire"] == {"checked": True, "mismatches": []}
    assert doc["batching"]["method"] == "qemu-trace" and doc["batching"]["commits"] == 3
    assert [(b["names"], b["reason"]) for b in doc["batches"]] == [
        (["SET_MEM_TABLE"], "QEMU device start after trace line 257"),
        (["SET_MEM_TABLE"], "QEMU commit at trace line 294"),
        (["SET_MEM_TABLE"], "QEMU commit at trace line 297"),
    ]
    assert doc["counts"]["by_classification"] == {"plug": 2, "unplug": 1}
