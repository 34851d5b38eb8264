"""QEMU 10 updates the table atomically per memslot, and vhostmem can prove it.

After every plug step: ``vhostmem-ctl check --qmp`` exits 0 (no violation, and the live table
equals QEMU's flat view run through the model of QEMU's vhost merging), and the messages
vhostmem recorded are exactly those the model predicts (hw/virtio/vhost-user.c
``scrub_shadow_regions``: removes newest first, then adds by GPA).
"""

from __future__ import annotations

import json

import pytest

from vhostmem.cli import ctl_main
from vhostmem.qemu_model import message_sequence, shadow_after
from vhostmem.qmp import expected_regions, query_memory

from .conftest import GiB, Rig


def recorded(rig: Rig, since: int) -> list[tuple[str, int, int]]:
    return [(e["request"], e["region"]["gpa"], e["region"]["size"])
            for e in rig.backend.memory_events()[since:]]


def test_plug_steps_are_atomic_and_as_modelled(make_rig, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = make_rig()
    qmp = str(rig.guest.qmp_user_path)
    shadow = expected_regions(query_memory(qmp))  # boot RAM: what QEMU's shadow holds now
    assert [(r.gpa, r.size) for r in shadow] == [(0, 512 << 20)]
    seen = len(rig.backend.memory_events())
    for size in (GiB, 3 * GiB, GiB, 0):
        rig.guest.plug(size, 60)
        rig.wait_table_matches_qemu()
        after = expected_regions(query_memory(qmp))
        predicted = [("ADD_MEM_REG" if kind == "add" else "REM_MEM_REG", r.gpa, r.size)
                     for kind, r in message_sequence(shadow, after)]
        rig.backend.wait_for(lambda: len(recorded(rig, seen)) >= len(predicted), 10,
                             "the step's event-log lines")
        assert recorded(rig, seen) == predicted, size
        seen += len(predicted)
        shadow = shadow_after(shadow, after)
        code = ctl_main(["--control", rig.backend.control, "check", "--qmp", qmp, "--json"])
        doc = json.loads(capsys.readouterr().out)
        assert code == 0, doc
        assert doc["clean"] and doc["qmp"]["matches"]
    assert rig.backend.violations() == []
