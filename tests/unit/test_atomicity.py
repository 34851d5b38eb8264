"""Batches, the update history and violations (vhostmem.atomicity).

Times are fixed floats handed in by the test, as the shell hands in monotonic seconds, so every
test is deterministic. Memslot ``i`` is the seed layout's: 1 GiB at 0x240000000 + i GiB, one
memfd, mmap_offset i GiB.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostmem.atomicity import (
    ADD_MEM_REG,
    DEFAULT_BATCH_GAP,
    REM_MEM_REG,
    SET_MEM_TABLE,
    History,
    Record,
    RegionRef,
    classify_batch,
)
from vhostmem.protocol import Request
from vhostmem.regions import Region
from vhostmem.report import render_report

from .helpers.memslots import BASE, FILE, HOST, GiB, never_mapped, slot

T = DEFAULT_BATCH_GAP
#: Well inside a batch / well outside it.
SOON = 0.001
LATER = 1.0

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None)


def rng(i: int, slots: int = 1) -> tuple[int, int]:
    return (BASE + i * GiB, BASE + (i + slots) * GiB)


class Front:
    """Feeds a History the way the shell does: a clock that advances by the gap before each
    request and by a small handling time after it."""

    def __init__(
        self, history: History | None = None, conn: int = 1, peer: str = "qemu-system-x86"
    ) -> None:
        self.history = history or History()
        self.conn = conn
        self.peer = peer
        self.now = 100.0

    def send(
        self,
        request: str,
        *,
        gap: float = SOON,
        removed: Sequence[Region[None]] = (),
        added: Sequence[Region[None]] = (),
        kept: Sequence[Region[None]] = (),
        ok: bool = True,
        handling: float = 0.0001,
        conn: int | None = None,
    ) -> Record:
        arrived = self.now + gap
        self.now = arrived + handling
        return self.history.record(
            socket="/tmp/vu.sock",
            conn=self.conn if conn is None else conn,
            request=request,
            ok=ok,
            removed=removed,
            added=added,
            kept=kept,
            arrived=arrived,
            replied=self.now,
            batch_gap=T,
            peer=self.peer,
            peer_pid=4242,
        )

    def add(self, region: Region[None], gap: float = SOON) -> Record:
        return self.send(ADD_MEM_REG, gap=gap, added=[region])

    def rem(self, region: Region[None], gap: float = SOON) -> Record:
        return self.send(REM_MEM_REG, gap=gap, removed=[region])


def plugged(front: Front, *slots: int) -> dict[int, Region[None]]:
    """Plug memslots in one earlier batch, return them by index."""
    regions = {i: slot(i) for i in slots}
    for n, region in enumerate(regions.values()):
        front.add(region, gap=LATER if n == 0 else SOON)
    return regions


# -- the examples -----------------------------------------------------------------------


def test_pre_82_replay_is_a_merge_violation() -> None:
    front = Front()
    live = plugged(front, 0)
    rem = front.rem(live[0], gap=LATER)
    add = front.add(slot(0, slots=2))  # memslots 0+1 merged, as QEMU before 8.2 sends it

    assert rem.classification == "unplug" and rem.violation is None
    assert add.batch == rem.batch
    assert add.classification == "merge"
    v = add.violation
    assert v is not None
    assert v.kind == "merge"
    assert v.unmapped == rng(0)
    assert v.removed == (RegionRef.of(live[0]),)
    assert v.added == (RegionRef.of(slot(0, slots=2)),)
    assert v.removed_by == (rem.seq,) and v.completed_by == add.seq
    assert v.unmapped_ms == pytest.approx(SOON * 1000)
    for text in (
        "0x240000000-0x27fffffff (1 GiB)",
        "merged with 0x280000000-0x2bfffffff",
        "REM_MEM_REG #",
        "533f5d6679",
        "1.0 ms",
    ):
        assert text in v.why
    doc = add.as_json()
    [found] = doc["violations"]
    assert found["kind"] == "merge" and doc["seq"] == add.seq
    assert found["unmapped"] == {"start": BASE, "end": BASE + GiB, "size": GiB}
    assert front.history.violations() == [v]


def test_rem_one_memslot_add_another_at_once_is_clean() -> None:
    front = Front()
    live = plugged(front, 0, 1)
    rem = front.rem(live[1], gap=LATER)
    add = front.add(slot(3))
    assert add.batch == rem.batch
    assert (rem.classification, add.classification) == ("unplug", "plug")
    assert front.history.violations() == []
    batch = front.history.batches()[-1]
    assert batch.plugged == (rng(3),) and batch.unplugged == (rng(1),)


def test_identical_readd_in_one_batch_is_a_readd() -> None:
    front = Front()
    live = plugged(front, 0, 1)
    front.rem(live[1], gap=LATER)
    add = front.add(slot(1))
    assert add.classification == "readd"
    assert add.violation is not None and add.violation.unmapped == rng(1)
    assert "re-added it unchanged" in add.violation.why


def test_unplug_then_replug_in_a_later_batch_is_clean() -> None:
    front = Front()
    live = plugged(front, 0, 1)
    rem = front.rem(live[1], gap=LATER)
    add = front.add(slot(1), gap=LATER)
    assert add.batch == rem.batch + 1
    assert add.classification == "plug"
    assert front.history.report()["clean"] is True


@pytest.mark.parametrize(
    ("again", "kind"),
    [
        (
            never_mapped(
                gpa=BASE + GiB, size=GiB, uaddr=HOST + 9 * GiB, mmap_offset=GiB, file_id=FILE
            ),
            "moved",
        ),
        (
            never_mapped(
                gpa=BASE + GiB, size=GiB, uaddr=HOST + GiB, mmap_offset=GiB, file_id=(1, 1)
            ),
            "moved",
        ),
        (
            never_mapped(
                gpa=BASE + GiB, size=GiB // 2, uaddr=HOST + GiB, mmap_offset=GiB, file_id=FILE
            ),
            "resize",
        ),
        (
            never_mapped(
                gpa=BASE + GiB + GiB // 2, size=GiB, uaddr=HOST, mmap_offset=0, file_id=FILE
            ),
            "replace",
        ),
    ],
)
def test_other_kinds(again: Region[None], kind: str) -> None:
    front = Front()
    live = plugged(front, 1)
    front.rem(live[1], gap=LATER)
    add = front.add(again)
    assert add.classification == kind


def test_split_by_two_adds_reports_each_half_once() -> None:
    front = Front()
    live = plugged(front, 0)
    front.rem(live[0], gap=LATER)
    half = GiB // 2
    first = never_mapped(gpa=BASE, size=half, uaddr=HOST, mmap_offset=0, file_id=FILE)
    second = never_mapped(
        gpa=BASE + half, size=half, uaddr=HOST + half, mmap_offset=half, file_id=FILE
    )
    a = front.add(first)
    b = front.add(second)
    assert a.violation is not None and a.violation.unmapped == (BASE, BASE + half)
    assert b.violation is not None and b.violation.unmapped == (BASE + half, BASE + GiB)
    assert b.classification == "split"
    assert len(b.violation.added) == 2


def test_merge_of_two_live_regions() -> None:
    front = Front()
    live = plugged(front, 0, 1)
    front.rem(live[1], gap=LATER)
    front.rem(live[0])
    add = front.add(slot(0, slots=2))
    assert add.violation is not None
    assert add.violation.kind == "merge"
    assert add.violation.unmapped == rng(0, 2)
    assert len(add.violation.removed) == 2
    assert "merged into region" in add.violation.why


# -- SET_MEM_TABLE --------------------------------------------------------------------------


BOOT = never_mapped(gpa=0, size=GiB, uaddr=HOST - 4 * GiB, mmap_offset=0, file_id=(0x2D, 1))


def test_set_mem_table_keeping_a_region_is_clean() -> None:
    front = Front()
    first = front.send(SET_MEM_TABLE, added=[BOOT])
    second = front.send(SET_MEM_TABLE, kept=[BOOT], added=[slot(0)])
    assert (first.classification, second.classification) == ("plug", "plug")
    assert second.batch == first.batch + 1
    assert front.history.violations() == []
    third = front.send(SET_MEM_TABLE, kept=[BOOT], removed=[slot(0)], added=[slot(2)])
    assert third.classification == "plug+unplug"
    fourth = front.send(SET_MEM_TABLE, kept=[BOOT, slot(2)])
    assert fourth.classification == "unchanged"


def test_set_mem_table_splitting_boot_ram_is_a_remap_not_a_violation() -> None:
    front = Front()
    front.send(SET_MEM_TABLE, added=[BOOT])
    half = GiB // 2
    halves = [
        never_mapped(gpa=0, size=half, uaddr=BOOT.uaddr, mmap_offset=0, file_id=BOOT.file_id),
        never_mapped(
            gpa=half, size=half, uaddr=BOOT.uaddr + half, mmap_offset=half, file_id=BOOT.file_id
        ),
    ]
    rec = front.send(SET_MEM_TABLE, removed=[BOOT], added=halves)
    # One message hands over the whole new table: nothing went unmapped on the wire.
    assert rec.classification == "remap" and rec.violations == ()
    (m,) = rec.remaps
    assert m.kind == "split" and m.ranges == ((0, GiB),) and m.seq == rec.seq
    assert "SET_MEM_TABLE" in m.why and "split into 2 regions" in m.why
    assert "not a violation" in m.why
    assert front.history.report()["clean"]


def test_set_mem_table_with_two_separate_remaps() -> None:
    front = Front()
    front.send(SET_MEM_TABLE, added=[BOOT, slot(0), slot(2)])
    moved = [
        never_mapped(
            gpa=r.gpa,
            size=r.size,
            uaddr=r.uaddr + 64 * GiB,
            mmap_offset=r.mmap_offset,
            file_id=FILE,
        )
        for r in (slot(0), slot(2))
    ]
    rec = front.send(SET_MEM_TABLE, kept=[BOOT], removed=[slot(0), slot(2)], added=moved)
    assert [m.kind for m in rec.remaps] == ["moved", "moved"] and rec.violations == ()
    doc = rec.as_json()
    assert doc["violations"] == [] and [m["kind"] for m in doc["remaps"]] == ["moved", "moved"]


# -- batch rules ----------------------------------------------------------------------------


def test_gap_of_exactly_t_continues_the_batch() -> None:
    # 100.0001 + 0.02 is not exactly representable: nanosecond rounding keeps it on the edge.
    front = Front()
    a = front.add(slot(0), gap=LATER)
    b = front.add(slot(1), gap=T)
    c = front.add(slot(2), gap=T + 1e-9)
    assert b.batch == a.batch
    assert c.batch == a.batch + 1
    assert "gap 20.000 ms > 20 ms" in front.history.batches()[-1].reason


def test_gap_is_measured_from_our_reply() -> None:
    # An injected 5 s reply delay does not split QEMU's batch: QEMU waited for our ack.
    front = Front()
    live = plugged(front, 0)
    rem = front.send(REM_MEM_REG, gap=LATER, removed=[live[0]], handling=5.0)
    add = front.add(slot(0))
    assert add.batch == rem.batch and add.classification == "readd"


def test_rem_after_add_starts_a_new_batch() -> None:
    front = Front()
    live = plugged(front, 0)
    add = front.add(slot(1), gap=LATER)
    rem = front.rem(live[0])
    assert rem.batch == add.batch + 1
    again = front.add(slot(0))
    assert again.batch == rem.batch and again.classification == "readd"


def test_set_mem_table_is_a_batch_by_itself() -> None:
    front = Front()
    rem_first = front.add(slot(0), gap=LATER)
    table = front.send(SET_MEM_TABLE, kept=[slot(0)], added=[slot(1)])
    after = front.add(slot(2))
    assert rem_first.batch < table.batch < after.batch
    reasons = [b.reason for b in front.history.batches()]
    assert reasons[1:] == ["SET_MEM_TABLE is a batch by itself", "after SET_MEM_TABLE"]


def test_connections_do_not_share_batches() -> None:
    history = History()
    one, two = Front(history, conn=1), Front(history, conn=2)
    live = plugged(one, 0)
    r = one.rem(live[0], gap=LATER)
    # The same region re-added on another connection (QEMU reconnected): not one batch.
    a = two.add(slot(0))
    assert a.batch != r.batch and a.classification == "plug"
    history.close_batch(socket="/tmp/vu.sock", conn=1)
    b = one.add(slot(0))
    assert b.batch not in (r.batch, a.batch) and b.classification == "plug"


def test_failed_requests_are_recorded_and_change_nothing() -> None:
    front = Front()
    live = plugged(front, 0)
    bad_rem = front.rem(live[0], gap=LATER)
    failed = front.send(REM_MEM_REG, ok=False)  # REM of a region we do not have
    bad_add = front.send(ADD_MEM_REG, ok=False, added=[slot(0)])
    assert failed.classification == "failed" and bad_add.classification == "failed"
    assert bad_add.added == () and bad_add.violation is None
    assert {bad_rem.batch, failed.batch, bad_add.batch} == {bad_rem.batch}
    # A failed ADD still counts as an ADD for the batch shape: the REM after it is a new batch.
    assert front.rem(slot(5)).batch == bad_rem.batch + 1
    assert front.history.report()["counts"]["failed"] == 2


def test_unknown_request_name() -> None:
    with pytest.raises(ValueError, match="not a memory-table request"):
        History().record(
            socket="s", conn=0, request="SET_VRING_ADDR", ok=True, arrived=0.0, replied=0.0
        )


def test_request_names_are_the_protocol_names() -> None:
    """atomicity spells the names as literals (it must not import protocol); they must agree."""
    assert SET_MEM_TABLE == Request.SET_MEM_TABLE.name
    assert ADD_MEM_REG == Request.ADD_MEM_REG.name
    assert REM_MEM_REG == Request.REM_MEM_REG.name


def test_report_and_text() -> None:
    front = Front()
    live = plugged(front, 0)
    front.rem(live[0], gap=LATER)
    front.add(slot(0, slots=2))
    doc = front.history.report()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["version"] == 1 and doc["clean"] is False
    assert doc["counts"]["violations"] == 1 and doc["counts"]["batches"] == 2
    assert doc["counts"]["by_classification"] == {"plug": 1, "unplug": 1, "merge": 1}
    assert doc["violations"][0]["seq"] == 3 and doc["violations"][0]["batch"] == 2
    assert doc["batches"][1]["plugged"] == [
        {"start": BASE + GiB, "end": BASE + 2 * GiB, "size": GiB}
    ]
    text = render_report(doc)
    assert text.startswith("atomic: NO, 1 violation(s) in 3 memory-table requests in 2 batches")
    assert "MERGE: ADD_MEM_REG #3" in text and "0x240000000-0x27fffffff" in text
    assert render_report(History().report()).startswith("atomic: yes")


# -- classify_batch -------------------------------------------------------------------------


def test_classify_batch_matches_rem_on_gpa_uaddr_size() -> None:
    live = [slot(0), slot(1)]
    wire_rem = RegionRef(slot(0).gpa, GiB, slot(0).uaddr, 0)  # QEMU sends mmap_offset 0
    found = classify_batch(live, [("rem", wire_rem), ("add", slot(0, slots=1))])
    assert [v.kind for v in found] == ["readd"]
    assert found[0].removed_by == (1,) and found[0].completed_by == 2
    assert "REM_MEM_REG (message 1)" in found[0].why


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([("add", slot(3)), ("rem", slot(0))], "starts a new batch"),
        ([("rem", slot(4))], "names no live region"),
        ([("add", slot(0, slots=2))], "overlaps live region"),
        ([("move", slot(0))], "neither"),
    ],
)
def test_classify_batch_refuses_what_a_back_end_would(
    requests: list[tuple[str, Region[None]]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        classify_batch([slot(0), slot(1)], requests)


# -- properties -----------------------------------------------------------------------------

SLOTS = st.integers(min_value=0, max_value=15)


@PROPERTY
@given(steps=st.lists(st.sets(SLOTS, max_size=16), min_size=1, max_size=12))
def test_per_memslot_plugs_and_unplugs_never_violate(steps: list[set[int]]) -> None:
    """Any sequence of plug states, each reached in its own batch the way QEMU >= 8.2 does it
    (REM of each memslot that went, then ADD of each that came), is clean; a memslot unplugged in
    one step and replugged in a later one included."""
    front = Front()
    live: set[int] = set()
    for target in steps:
        gap = LATER
        for i in sorted(live - target, reverse=True):
            front.rem(slot(i), gap=gap)
            gap = SOON
        for i in sorted(target - live):
            front.add(slot(i), gap=gap)
            gap = SOON
        live = set(target)
    assert front.history.violations() == []
    assert all(r.classification in ("plug", "unplug") for r in front.history.records)


@st.composite
def recover_batches(draw: st.DrawFn) -> tuple[set[int], int, str, list[int], list[int]]:
    live = draw(st.sets(SLOTS, min_size=1, max_size=16))
    victim = draw(st.sampled_from(sorted(live)))
    mode = draw(st.sampled_from(["readd", "moved", "merge", "split"]))
    others = sorted(live - {victim})
    free = sorted(set(range(16)) - live)
    unplug = draw(st.sets(st.sampled_from(others))) if others else set()
    plug = draw(st.sets(st.sampled_from(free))) if free else set()
    rem_order = draw(st.permutations(sorted(unplug | {victim})))
    return live, victim, mode, list(rem_order), sorted(plug)


@PROPERTY
@given(case=recover_batches())
def test_removing_a_live_range_the_batch_recovers_always_violates(
    case: tuple[set[int], int, str, list[int], list[int]],
) -> None:
    """Inside a batch of ordinary plugs and unplugs, a REM of live memslot ``victim`` whose range
    the same batch re-covers (identically, moved, merged with a neighbour, split in halves) is
    always flagged, over exactly the victim's range."""
    live, victim, mode, rem_order, plug = case
    front = Front()
    for n, i in enumerate(sorted(live)):
        front.add(slot(i), gap=LATER if n == 0 else SOON)
    adds: list[Region[None]] = [slot(i) for i in plug]
    if mode == "readd":
        adds.append(slot(victim))
    elif mode == "moved":
        adds.append(
            never_mapped(
                gpa=slot(victim).gpa,
                size=GiB,
                uaddr=HOST + 100 * GiB,
                mmap_offset=victim * GiB,
                file_id=FILE,
            )
        )
    elif mode == "split":
        half = GiB // 2
        v = slot(victim)
        adds += [
            never_mapped(
                gpa=v.gpa, size=half, uaddr=v.uaddr, mmap_offset=v.mmap_offset, file_id=FILE
            ),
            never_mapped(
                gpa=v.gpa + half,
                size=half,
                uaddr=v.uaddr + half,
                mmap_offset=v.mmap_offset + half,
                file_id=FILE,
            ),
        ]
    else:  # merge with the neighbour above, which this batch plugs or also removes
        buddy = victim + 1 if victim < 15 else victim - 1
        if buddy in live and buddy not in rem_order:
            rem_order.append(buddy)
        if buddy in plug:
            adds = [r for r in adds if r.gpa != slot(buddy).gpa]
        adds.append(slot(min(victim, buddy), slots=2))
    gap = LATER
    for i in rem_order:
        front.rem(slot(i), gap=gap)
        gap = SOON
    for region in sorted(adds, key=lambda r: r.gpa):
        front.add(region)
    found = front.history.violations()
    assert found, "re-covered live memslot not flagged"
    covered = sorted(r for v in found for r in v.ranges)
    assert covered[0][0] <= rng(victim)[0] and covered[-1][1] >= rng(victim)[1]
    kinds = {v.kind for v in found}
    assert {"readd": "readd", "moved": "moved", "merge": "merge", "split": "split"}[mode] in kinds
    # Only the re-covered range is a violation: nothing outside the victim (and a merge buddy).
    allowed = rng(min(victim, victim + 1 if victim < 15 else victim - 1), 2)
    assert all(allowed[0] <= s and e <= allowed[1] for s, e in covered)
    assert len({v.completed_by for v in found}) == len(found)


@PROPERTY
@given(
    gaps_us=st.lists(
        st.one_of(st.integers(min_value=0, max_value=60_000), st.just(20_000), st.just(20_001)),
        min_size=1,
        max_size=15,
    ),
    t_ms=st.sampled_from([1, 5, 20, 50]),
)
def test_gaps_longer_than_t_split_batches_shorter_ones_do_not(
    gaps_us: list[int], t_ms: int
) -> None:
    history = History()
    replied = 50.0
    batch = history.record(
        socket="s",
        conn=0,
        request=ADD_MEM_REG,
        ok=True,
        added=[slot(0)],
        arrived=replied,
        replied=replied,
        batch_gap=t_ms / 1000,
    ).batch
    for n, gap in enumerate(gaps_us, 1):
        arrived = replied + gap / 1_000_000
        replied = arrived + 0.0002
        rec = history.record(
            socket="s",
            conn=0,
            request=ADD_MEM_REG,
            ok=True,
            added=[slot(n)],
            arrived=arrived,
            replied=replied,
            batch_gap=t_ms / 1000,
        )
        expected = batch + 1 if gap > t_ms * 1000 else batch
        assert rec.batch == expected, (gap, t_ms)
        batch = rec.batch


def test_region_straddling_two_removed_regions_is_a_merge() -> None:
    front = Front()
    live = plugged(front, 0, 1)
    front.rem(live[1], gap=LATER)
    front.rem(live[0])
    half = GiB // 2
    straddle = never_mapped(
        gpa=BASE + half, size=GiB, uaddr=HOST + half, mmap_offset=half, file_id=FILE
    )
    add = front.add(straddle)
    assert add.violation is not None
    assert (add.violation.kind, add.violation.unmapped) == (
        "merge",
        (BASE + half, BASE + GiB + half),
    )
