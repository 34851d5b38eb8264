"""QEMU 10 updates the table atomically per memslot, and vhostmem can prove it.

After every plug step: ``vhostmem-ctl check --qmp`` exits 0 (no violation, and the live table
equals QEMU's flat view run through the model of QEMU's vhost merging), and the messages
vhostmem recorded are exactly those the model predicts (hw/virtio/vhost-user.c
``scrub_shadow_regions``: removes newest first, then adds by GPA). With QEMU's trace (the
harness default) every batch is one QEMU commit and the wire matches what QEMU says it wrote;
without it the check says it used the gap heuristic.

``VHOSTMEM_RECORD_VECTORS=DIR`` copies the run's QEMU trace and memory event lines to DIR
(tests/vectors: replayed by tests/unit/test_trace_vectors.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from vhostmem.ctl import ctl_main
from vhostmem.qemu_model import message_sequence, shadow_after
from vhostmem.qmp import expected_regions, query_memory

from .conftest import GiB, MakeRig, Rig


def recorded(rig: Rig, since: int) -> list[tuple[str, int, int]]:
    return [
        (e["request"], e["region"]["gpa"], e["region"]["size"])
        for e in rig.backend.memory_events()[since:]
    ]


@pytest.mark.parametrize("qemu_trace", [True, False], ids=["qemu-trace", "gap"])
def test_plug_steps_are_atomic_and_as_modelled(
    make_rig: MakeRig,
    capsys: pytest.CaptureFixture[str],
    qemu_trace: bool,
) -> None:
    rig: Rig = make_rig(qemu_trace=qemu_trace)
    qmp = str(rig.guest.qmp_user_path)
    shadow = expected_regions(query_memory(qmp))  # boot RAM: what QEMU's shadow holds now
    assert [(r.gpa, r.size) for r in shadow] == [(0, 512 << 20)]
    seen = len(rig.backend.memory_events())
    for size in (GiB, 3 * GiB, GiB, 0):
        rig.guest.plug(size, 60)
        rig.wait_table_matches_qemu()
        after = expected_regions(query_memory(qmp))
        predicted = [
            ("ADD_MEM_REG" if kind == "add" else "REM_MEM_REG", r.gpa, r.size)
            for kind, r in message_sequence(shadow, after)
        ]
        # The defaults bind this step's values (B023), though wait_for calls it before the loop
        # moves on.
        want = len(predicted)
        rig.backend.wait_for(
            lambda since=seen, n=want: len(recorded(rig, since)) >= n,
            10,
            "the step's event-log lines",
        )
        assert recorded(rig, seen) == predicted, size
        seen += len(predicted)
        shadow = shadow_after(shadow, after)
        code = ctl_main(["--control", rig.backend.control, "check", "--qmp", qmp, "--json"])
        doc = json.loads(capsys.readouterr().out)
        assert code == 0, doc
        assert doc["clean"] and doc["qmp"]["matches"]
    assert rig.backend.violations() == []
    code = ctl_main(["--control", rig.backend.control, "check", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["counts"]["violations"] == 0, doc
    events = rig.backend.memory_events()
    if not qemu_trace:
        assert doc["batching"]["method"] == "gap" and not doc["wire"]["checked"]
        assert {e["batching"] for e in events} == {"gap"}
        ctl_main(["--control", rig.backend.control, "check"])
        print(capsys.readouterr().out)  # quoted in the closing note
        return
    batching = doc["batching"]
    assert batching["method"] == "qemu-trace" and batching["fallbacks"] == [], batching
    assert doc["wire"] == {"checked": True, "mismatches": []}
    assert {e["batching"] for e in events} == {"qemu-trace"}
    # Every batch is one QEMU commit: the device start (boot RAM), then QEMU 10 maps or unmaps
    # each memslot in a memory transaction of its own as the guest plugs or unplugs its blocks
    # (measured: 3 ADDs, then 3 REMs, each under its own "vhost_commit Started: 1").
    assert batching["commits"] == len(doc["batches"]) == 7, doc["batches"]
    assert [b["names"] for b in doc["batches"]] == [["ADD_MEM_REG"]] * 4 + [["REM_MEM_REG"]] * 3
    assert doc["batches"][0]["reason"].startswith("QEMU device start")
    assert all(b["reason"].startswith("QEMU commit at trace line ") for b in doc["batches"][1:])
    ctl_main(["--control", rig.backend.control, "check"])
    out = capsys.readouterr().out
    assert "batches: QEMU trace, 7 commits" in out and "wire vs QEMU trace: matches" in out
    print(out)  # quoted in the closing note
    record = os.environ.get("VHOSTMEM_RECORD_VECTORS")
    if record:
        assert rig.backend.qemu_trace is not None
        rig.guest.close()  # QEMU's last lines are in the file
        base = Path(record) / "qemu-10.0.2-plug-cycle"
        shutil.copyfile(rig.backend.qemu_trace, f"{base}.trace.log")
        with open(f"{base}.events.jsonl", "w", encoding="utf-8") as f:
            for e in rig.backend.memory_events():
                f.write(
                    json.dumps({k: e[k] for k in ("ts", "request", "region", "batch") if k in e})
                    + "\n"
                )
