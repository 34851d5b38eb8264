"""How a real QEMU 10 copes with a back-end that fails a memory-table update (fault injection)."""

from __future__ import annotations

import json

import pytest

from vhostmem.ctl import ctl_main

from .conftest import GiB, MakeRig, Rig


def test_injected_enomem_on_second_memslot(
    make_rig: MakeRig, capsys: pytest.CaptureFixture[str]
) -> None:
    # ADD_MEM_REG #1 is boot RAM, #2 memslot 0, #3 memslot 1.
    rig: Rig = make_rig(vhostmem_args=("--inject", "ADD_MEM_REG:nth=3:errno=ENOMEM"))
    base = rig.guest.virtio_mem()["memaddr"]
    rig.guest.plug(3 * GiB, 60)  # the plug completes: QEMU does not abort on a failed ack
    events = rig.backend.memory_events()
    [failed] = [e for e in events if e["result"] == "error"]
    assert failed["region"]["gpa"] == base + GiB
    assert failed["injected"] == "ADD_MEM_REG:nth=3:errno=ENOMEM"
    assert "ENOMEM" in failed["error"] and "max_map_count" in failed["error"]
    stderr = rig.guest.stderr_path.read_text()
    assert "vhost_set_mem_table failed: Input/output error (5)" in stderr
    # QEMU left the failed region out of its own table and sends it again with its next change
    # (the guest plugs block by block, so a later memslot's commit usually carries it).
    if not any(r["gpa"] == base + GiB for r in rig.backend.regions()):
        rig.guest.plug(4 * GiB, 60)
    want = rig.wait_table_matches_qemu()
    assert (base + GiB, GiB, GiB) in want
    after = rig.backend.memory_events()[events.index(failed) + 1 :]
    assert ("ADD_MEM_REG", base + GiB) in [(e["request"], e["region"]["gpa"]) for e in after]
    # the table is what the model of QEMU's merging predicts from QEMU's own flat view, and the
    # failure and its retry are no violation (the memslot was not mapped before)
    code = ctl_main(
        ["--control", rig.backend.control, "check", "--json", "--qmp", str(rig.guest.qmp_user_path)]
    )
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["qmp"]["matches"] and doc["clean"], doc
    # nothing leaked by the failure: one mapping per region, fds to match
    stats = rig.backend.stats()
    assert stats["maps"] == stats["regions"] == len(rig.backend.regions())
    assert stats["mapping_fds"] == stats["maps"]
