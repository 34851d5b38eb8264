"""The model of QEMU's side (vhostmem.qemu_model) against the seed layout and a real QEMU trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostmem.atomicity import History, classify_batch
from vhostmem.protocol import MemoryTable, MemRegMsg, Request, decode_message
from vhostmem.qemu_model import (
    DEFAULT_BOOT_RAM,
    ModelRegion,
    Section,
    explain,
    message_sequence,
    shadow_after,
    vhost_regions,
    virtio_mem_layout,
)
from vhostmem.report import render_explain

GiB = 1 << 30
MiB = 1 << 20
VECTORS = Path(__file__).parent.parent / "vectors"

# The seed: an 8 GiB virtio-mem container at 0x240000000-0x43fffffff over memory backend "mem2",
# memslot-i aliasing mem2 at i GiB.
SEED_GPA = 0x240000000
SEED_HOST = 0x7F4000000000


def seed(plugged: set[int], *, unmergeable: bool = True) -> list[Section]:
    return virtio_mem_layout(
        base_gpa=SEED_GPA,
        region_size=8 * GiB,
        memslot_size=GiB,
        host_base=SEED_HOST,
        mr="mem2",
        plugged_memslots=plugged,
        unmergeable=unmergeable,
    )


def test_seed_layout_three_regions_with_unmergeable_one_without() -> None:
    sections = seed({0, 1, 2})
    assert [(s.gpa, s.offset_in_mr) for s in sections] == [
        (0x240000000, 0),
        (0x280000000, GiB),
        (0x2C0000000, 2 * GiB),
    ]
    regions = vhost_regions(sections)
    assert [(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in regions] == [
        (0x240000000, GiB, SEED_HOST, 0),
        (0x280000000, GiB, SEED_HOST + GiB, GiB),
        (0x2C0000000, GiB, SEED_HOST + 2 * GiB, 2 * GiB),
    ]
    merged = vhost_regions(sections, unmergeable_supported=False)
    assert merged == [ModelRegion(0x240000000, 3 * GiB, SEED_HOST, 0, "mem2")]
    # Without the flag at all, 8.2's rule merges too: the flag is what keeps memslots apart.
    assert vhost_regions(seed({0, 1, 2}, unmergeable=False)) == merged


def test_plugging_memslot_1_next_to_0() -> None:
    before_sections, after_sections = seed({0}), seed({0, 1})
    with_flag = message_sequence(vhost_regions(before_sections), vhost_regions(after_sections))
    assert [(k, r.gpa, r.size) for k, r in with_flag] == [("add", 0x280000000, GiB)]

    old = vhost_regions(before_sections, unmergeable_supported=False)
    new = vhost_regions(after_sections, unmergeable_supported=False)
    without = message_sequence(old, new)
    assert [(k, r.gpa, r.size) for k, r in without] == [
        ("rem", 0x240000000, GiB),
        ("add", 0x240000000, 2 * GiB),
    ]
    # ... and the history flags exactly that.
    history = History()
    history.record(
        socket="s", conn=0, request="ADD_MEM_REG", ok=True, added=old, arrived=0.0, replied=0.0
    )
    rem = history.record(
        socket="s",
        conn=0,
        request="REM_MEM_REG",
        ok=True,
        removed=[old[0]],
        arrived=1.0,
        replied=1.0001,
    )
    add = history.record(
        socket="s",
        conn=0,
        request="ADD_MEM_REG",
        ok=True,
        added=[new[0]],
        arrived=1.0002,
        replied=1.0003,
    )
    assert add.batch == rem.batch and add.classification == "merge"
    assert add.violation is not None and add.violation.unmapped == (0x240000000, 0x280000000)
    assert classify_batch(old, with_flag) == []


def test_shadow_order_gives_reverse_insertion_removes() -> None:
    shadow: list[ModelRegion] = []
    for plugged in ({2}, {0, 2}, {0, 1, 2}):
        shadow = shadow_after(shadow, vhost_regions(seed(plugged)))
    assert [r.gpa for r in shadow] == [0x2C0000000, 0x240000000, 0x280000000]
    msgs = message_sequence(shadow, vhost_regions(seed(set())))
    assert [(k, r.gpa) for k, r in msgs] == [
        ("rem", 0x280000000),
        ("rem", 0x240000000),
        ("rem", 0x2C0000000),
    ]
    assert msgs[0][1].wire("rem")["mmap_offset"] == 0
    assert msgs[0][1].wire("add")["mmap_offset"] == GiB


# -- the recorded QEMU 10.0.2 runs ------------------------------------------------------------


def recorded(name: str) -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = []
    for text in (VECTORS / name).read_text().splitlines():
        line = json.loads(text)
        if line["dir"] != "in":
            continue
        header, payload = decode_message(bytes.fromhex(line["hex"]))
        if header.request in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
            assert isinstance(payload, MemRegMsg)
            r = payload.region
            kind = "add" if header.request == Request.ADD_MEM_REG else "rem"
            out.append((kind, (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)))
        elif header.request == Request.SET_MEM_TABLE:
            assert isinstance(payload, MemoryTable)
            out.append(
                (
                    "set",
                    tuple(
                        n
                        for r in payload.regions
                        for n in (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                    ),
                )
            )
    return out


# The recorded run: boot RAM 512 MiB memfd at gpa 0, virtio-mem 4 GiB memfd at 0x100000000 with
# 1 GiB memslots; QMP requested-size 1 GiB, 3 GiB, 1 GiB, 0.
TRACE_STEPS: list[set[int]] = [set(), {0}, {0, 1, 2}, {0}, set()]
TRACE_VMEM_HOST = 0x7F2113FFE000


def trace_vmem(
    plugged: set[int], *, memslot_size: int = GiB, host: int = TRACE_VMEM_HOST
) -> list[Section]:
    return virtio_mem_layout(
        base_gpa=0x100000000,
        region_size=4 * GiB,
        memslot_size=memslot_size,
        host_base=host,
        mr="mem1",
        plugged_memslots=plugged,
    )


def test_model_sends_what_qemu_sent_with_memslots() -> None:
    shadow: list[ModelRegion] = []
    sent: list[tuple[str, tuple[int, ...]]] = []
    for plugged in TRACE_STEPS:
        sections = [
            DEFAULT_BOOT_RAM,
            *trace_vmem(plugged),
        ]
        regions = vhost_regions(sections)
        for kind, region in message_sequence(shadow, regions):
            w = region.wire(kind)
            sent.append((kind, (w["gpa"], w["size"], w["uaddr"], w["mmap_offset"])))
        shadow = shadow_after(shadow, regions)
    assert sent == recorded("qemu-10.0.2-virtio-mem-memslots.jsonl")


def test_model_regions_match_the_single_memslot_legacy_run() -> None:
    # Without CONFIGURE_MEM_SLOTS QEMU allows 8 regions, so virtio-mem uses one memslot for the
    # whole device and each table goes out whole as SET_MEM_TABLE. Addresses in QEMU's process
    # differ from run to run: take this run's own.
    tables = [t for kind, t in recorded("qemu-10.0.2-virtio-mem-legacy.jsonl") if kind == "set"]
    boot = Section(0, 512 * MiB, "mem0", 0, host_addr=tables[0][2])
    for plugged, table in zip((set(), {0}, set()), tables, strict=True):
        sections = trace_vmem(plugged, memslot_size=4 * GiB, host=tables[1][6])
        regions = vhost_regions([boot, *sections])
        assert tuple(n for r in regions for n in (r.gpa, r.size, r.uaddr, r.mmap_offset)) == table


# -- vhost_region_add_section details -------------------------------------------------------


def test_rounding_to_huge_pages_merges_boot_ram_split_by_a_hole() -> None:
    # pc.ram below 1 MiB is cut by the VGA window: [0, 0xa0000) and [0xc0000, 512 MiB).
    def boot(page: int) -> list[ModelRegion]:
        host = 0x7F0000000000
        return vhost_regions(
            [
                Section(0, 0xA0000, "pc.ram", 0, host, page_size=page),
                Section(
                    0xC0000, 512 * MiB - 0xC0000, "pc.ram", 0xC0000, host + 0xC0000, page_size=page
                ),
            ]
        )

    assert [(r.gpa, r.size) for r in boot(2 * MiB)] == [(0, 512 * MiB)]
    assert [(r.gpa, r.size, r.mmap_offset) for r in boot(4096)] == [
        (0, 0xA0000, 0),
        (0xC0000, 512 * MiB - 0xC0000, 0xC0000),
    ]


def test_a_merged_region_grows_to_whole_pages() -> None:
    host = 0x7F0000000000
    regions = vhost_regions(
        [
            Section(0, 0xA0000, "pc.ram", 0, host, page_size=2 * MiB),
            Section(0xC0000, 0x100000, "pc.ram", 0xC0000, host + 0xC0000, page_size=2 * MiB),
        ]
    )
    assert [(r.gpa, r.size, r.uaddr) for r in regions] == [(0, 2 * MiB, host)]


def test_unmerged_sections_are_stored_unrounded() -> None:
    host = 0x7F0000001000  # 4 KiB aligned, not 2 MiB aligned
    regions = vhost_regions(
        [
            Section(0, 0x1000, "a", 0, host, page_size=2 * MiB),
            Section(0x1000, 0x3000, "b", 0, 0x7E0000000000, page_size=4096, fd_offset=0x5000),
        ]
    )
    assert [(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in regions] == [
        (0, 0x1000, host, 0),
        (0x1000, 0x3000, 0x7E0000000000, 0x5000),
    ]


def test_qemu_errors() -> None:
    with pytest.raises(ValueError, match="Section 'b' rounded to a000 prior to previous 'a' 10000"):
        vhost_regions(
            [
                Section(0x10000, 0x1000, "a", 0, 0x100000),
                Section(0x11000, 0x1000, "b", 0, 0x27000, page_size=0x8000),
            ]
        )
    with pytest.raises(ValueError, match="Overlapping but not coherent sections at 2000"):
        vhost_regions(
            [
                Section(0, 0x3000, "a", 0, 0x100000),
                Section(0x3000, 0x1000, "b", 0, 0x201000, page_size=0x2000),
            ]
        )
    with pytest.raises(ValueError, match="another section"):
        vhost_regions([Section(0, 0x1000, "a", 0, 0x100000), Section(0x1000, 0x1000, "a", 0, 0x1)])
    with pytest.raises(ValueError, match="power of 2"):
        Section(0, 0x1000, "a", 0, 0, page_size=3000)


def test_unmergeable_skips_the_overlap_check_too() -> None:
    # QEMU only looks at the previous entry when the new section is mergeable.
    sections = [
        Section(0, 0x3000, "a", 0, 0x100000),
        Section(0x3000, 0x1000, "b", 0, 0x201000, page_size=0x2000, unmergeable=True),
    ]
    assert len(vhost_regions(sections)) == 2
    with pytest.raises(ValueError, match="Overlapping"):
        vhost_regions(sections, unmergeable_supported=False)


def test_virtio_mem_layout_edges() -> None:
    last = virtio_mem_layout(
        base_gpa=0,
        region_size=3 * GiB + GiB // 2,
        memslot_size=GiB,
        host_base=0,
        plugged_memslots={3},
    )
    assert [(s.gpa, s.size) for s in last] == [(3 * GiB, GiB // 2)]
    with pytest.raises(ValueError, match="memslot 4 is outside the device's 4 memslots"):
        virtio_mem_layout(
            base_gpa=0, region_size=4 * GiB, memslot_size=GiB, host_base=0, plugged_memslots={4}
        )


# -- explain ----------------------------------------------------------------------------------


def test_explain_side_by_side() -> None:
    doc = explain([{0}, {0, 1}, {0}])
    assert json.loads(json.dumps(doc)) == doc
    assert doc["totals"] == {
        "8.2+": {"messages": 4, "violations": 0},
        "pre-8.2": {"messages": 6, "violations": 2},
    }
    step2 = doc["steps"][2]["variants"]
    assert [m["request"] for m in step2["8.2+"]["messages"]] == ["ADD_MEM_REG"]
    pre = step2["pre-8.2"]["messages"]
    assert [(m["request"], m["classification"]) for m in pre] == [
        ("REM_MEM_REG", "unplug"),
        ("ADD_MEM_REG", "merge"),
    ]
    assert pre[0]["mmap_offset"] == 0
    assert pre[1]["violation"]["unmapped"] == {
        "start": 0x100000000,
        "end": 0x140000000,
        "size": GiB,
    }
    text = render_explain(doc)
    assert "QEMU >= 8.2" in text and "QEMU < 8.2" in text
    assert "ADD 0x100000000-0x17fffffff 2 GiB  !! merge" in text
    assert "4 messages, 0 non-atomic" in text and "6 messages, 2 non-atomic" in text
    assert "533f5d6679" in text


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(steps=st.lists(st.sets(st.integers(min_value=0, max_value=7)), min_size=1, max_size=8))
def test_unmergeable_memslots_are_always_atomic(steps: list[set[int]]) -> None:
    """With QEMU 8.2's flag every commit is per-memslot ADDs and REMs; without it, whenever a
    step keeps a memslot plugged whose merged region changes, the history flags it."""
    doc = explain(steps, region_size=8 * GiB)
    assert doc["totals"]["8.2+"]["violations"] == 0
    for step in doc["steps"]:
        for m in step["variants"]["8.2+"]["messages"]:
            assert m["size"] in (GiB, 512 * MiB)
    prev: set[int] = set()
    for step in doc["steps"][1:]:
        now = set(step["plugged"])
        old = vhost_regions(
            virtio_mem_layout(
                base_gpa=0x100000000,
                region_size=8 * GiB,
                memslot_size=GiB,
                host_base=0x7F2113FFE000,
                plugged_memslots=prev,
            ),
            unmergeable_supported=False,
        )
        new_keys = {
            r.key
            for r in vhost_regions(
                virtio_mem_layout(
                    base_gpa=0x100000000,
                    region_size=8 * GiB,
                    memslot_size=GiB,
                    host_base=0x7F2113FFE000,
                    plugged_memslots=now,
                ),
                unmergeable_supported=False,
            )
        }
        # A merged region that goes away while some of its memslots stay plugged: non-atomic.
        expect = any(
            r.key not in new_keys
            and any(r.gpa <= 0x100000000 + i * GiB < r.gpa_end for i in prev & now)
            for r in old
        )
        flagged = any(m["violation"] for m in step["variants"]["pre-8.2"]["messages"])
        assert flagged == expect, (sorted(prev), sorted(now))
        prev = now
