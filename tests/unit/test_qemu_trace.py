"""Batches from QEMU's own commits (vhostmem.qemu_trace + vhostmem.atomicity), pure.

A :class:`Qemu` writes trace lines the way QEMU 10's ``log`` backend does (hw/virtio/vhost.c
traces ``vhost_commit`` before a commit's messages, hw/virtio/vhost-user.c ``vhost_user_write``
after each message and ``vhost_user_read`` after each reply) and notes, on the same wall clock,
when vhostmem received each message and replied. :func:`book` pairs and records them as the
shell does. Memslot ``i`` is 1 GiB at 0x240000000 + i GiB.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from vhostmem.atomicity import (
    ADD_MEM_REG,
    DEFAULT_BATCH_GAP,
    REM_MEM_REG,
    SET_MEM_TABLE,
    History,
)
from vhostmem.qemu_trace import Pairer, parse_line, parse_lines
from vhostmem.regions import Region
from vhostmem.report import render_report

from .helpers.memslots import HOST, GiB, never_mapped, slot

MiB = 1 << 20
CODES = {SET_MEM_TABLE: 5, ADD_MEM_REG: 37, REM_MEM_REG: 38}
#: vhostmem's handling time: arrival to reply.
HANDLING = 0.0003


@dataclass
class Message:
    name: str
    arrived: float
    replied: float | None
    removed: Sequence[Region[None]] = ()
    added: Sequence[Region[None]] = ()
    kept: Sequence[Region[None]] = ()


@dataclass
class Qemu:
    """QEMU's trace file and the messages vhostmem received, on one wall clock."""

    tid: int = 20057
    now: float = 1796218704.0
    lines: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)

    def trace(self, text: str, *, tid: int | None = None) -> None:
        sec, usec = divmod(round(self.now * 1_000_000), 1_000_000)
        self.lines.append(f"{tid or self.tid}@{sec}.{usec:06d}:{text}")

    def wait(self, seconds: float) -> None:
        self.now += seconds

    def commit(self, started: bool = True, *, tid: int | None = None) -> None:
        self.wait(0.0001)
        self.trace(f"vhost_commit Started: {int(started)} Changed: 1", tid=tid)

    def send(
        self,
        name: str,
        *,
        removed: Sequence[Region[None]] = (),
        added: Sequence[Region[None]] = (),
        kept: Sequence[Region[None]] = (),
        traced: bool = True,
        reply: bool = True,
        then: float = 0.0,
        tid: int | None = None,
    ) -> Message:
        """One message: vhostmem has it, QEMU traces the write, vhostmem replies, QEMU reads the
        reply after ``then`` more seconds (a loaded runner)."""
        self.wait(0.0001)
        msg = Message(name, self.now, None, removed, added, kept)
        self.wait(0.00005)
        if traced:
            self.trace(f"vhost_user_write req:{CODES[name]} flags:0x9", tid=tid)
        self.wait(HANDLING)
        if reply:
            msg.replied = self.now
            self.wait(then + 0.00005)
            self.trace(f"vhost_user_read req:{CODES[name]} flags:0x5", tid=tid)
        self.messages.append(msg)
        return msg


def book(
    qemu: Qemu,
    *,
    trace: bool = True,
    pairer: Pairer | None = None,
    history: History | None = None,
    conn: int = 1,
    peer: str = "qemu-system-x86",
    lines: list[str] | None = None,
) -> History:
    """Pair and record every message as the shell does (all lines read before the booking)."""
    history = history or History()
    if trace:
        pairer = pairer or Pairer("/run/qemu-trace.log")
        pairer.feed(parse_lines(qemu.lines if lines is None else lines))
    for n, msg in enumerate(qemu.messages, 1):
        batching, commit, text, fallback = "gap", None, "", None
        if pairer is not None:
            res = pairer.pair(msg.name, n, arrived=msg.arrived, replied=msg.replied, now=1e12)
            assert res is not None  # "now" is far past every wait
            batching, commit, text, fallback = res.batching, res.commit, res.edge_text, res.fallback
            for text_ in res.wire:
                history.wire_mismatch(socket="/tmp/vu.sock", conn=conn, text=text_)
        history.record(
            socket="/tmp/vu.sock",
            conn=conn,
            request=msg.name,
            ok=True,
            removed=msg.removed,
            added=msg.added,
            kept=msg.kept,
            # History takes monotonic seconds; any clock works as long as it is one clock.
            arrived=msg.arrived,
            replied=msg.replied if msg.replied is not None else msg.arrived + HANDLING,
            batching=batching,
            commit=commit,
            commit_text=text,
            fallback=fallback,
            peer=peer,
            peer_pid=4242,
        )
    if pairer is not None:
        for text_ in pairer.finish(ended=None):
            history.wire_mismatch(socket="/tmp/vu.sock", conn=conn, text=text_)
    return history


def plug_slot0(qemu: Qemu) -> None:
    """Device start with boot RAM, then memslot 0 in its own commit, a while ago."""
    qemu.send(ADD_MEM_REG, added=[BOOT])
    qemu.wait(1.0)
    qemu.commit()
    qemu.send(ADD_MEM_REG, added=[slot(0)])
    qemu.wait(1.0)


BOOT = never_mapped(gpa=0, size=512 * MiB, uaddr=HOST - 4 * GiB, mmap_offset=0, file_id=(0x2D, 1))


# -- parsing --------------------------------------------------------------------------------


def test_parse_the_three_events_in_both_forms() -> None:
    commit = parse_line("20057@1796218704.008438:vhost_commit Started: 1 Changed: 1\n", 7)
    assert commit is not None
    assert (commit.event, commit.tid, commit.started, commit.changed, commit.lineno) == (
        "commit",
        20057,
        True,
        True,
        7,
    )
    assert commit.ts == pytest.approx(1796218704.008438)
    old = parse_line("20057@1796218704.008484:vhost_user_write req:37 flags:0x9", 1)
    new = parse_line("20057@1796218704.008484:vhost_user_write req:37 (ADD_MEM_REG) flags:0x9", 1)
    assert old == new
    assert old is not None and (old.event, old.request, old.flags) == ("write", 37, 9)
    read = parse_line("vhost_user_read req:38 flags:0x5", 2)  # without -msg timestamp=on
    assert read is not None and (read.event, read.request, read.flags, read.tid) == (
        "read",
        38,
        5,
        None,
    )
    stopped = parse_line("1@2.000003:vhost_commit Started: 0 Changed: 1", 3)
    assert stopped is not None and not stopped.started


@pytest.mark.parametrize(
    "text",
    [
        "20057@1796218704.008438:vhost_region_add_section mem0: 0x0+0x80000 @ 0x7f",
        "20057@1796218704.008438:virtio_set_status vdev 0x5 val 15",
        "qemu-system-x86_64: warning: host doesn't support requested feature",
        "",
        "20057@1796218704.0:vhost_user_write garbage",
    ],
)
def test_other_lines_are_ignored(text: str) -> None:
    assert parse_line(text, 1) is None


# -- batches from commits -------------------------------------------------------------------


def legacy_merge_in_one_commit() -> Qemu:
    """The pre-8.2 merge (REM of live memslot 0, ADD of memslots 0+1 merged) in ONE commit,
    with 50 ms between the REM's ack and the ADD: a loaded runner."""
    qemu = Qemu()
    plug_slot0(qemu)
    qemu.commit()
    qemu.send(REM_MEM_REG, removed=[slot(0)], then=0.050)
    qemu.send(ADD_MEM_REG, added=[slot(0, slots=2)])
    return qemu


def test_legacy_merge_in_one_commit_is_flagged_with_the_trace() -> None:
    qemu = legacy_merge_in_one_commit()
    doc = book(qemu).report()
    assert doc["counts"]["violations"] == 1 and not doc["clean"]
    (v,) = doc["violations"]
    assert v["kind"] == "merge" and v["request"] == ADD_MEM_REG
    assert "the QEMU commit at trace line 6" in v["why"]
    assert "qemu-system-x86, pid 4242" in v["why"] and "533f5d6679" in v["why"]
    assert doc["batching"] == {
        "method": "qemu-trace",
        "commits": 3,
        "requests": {"qemu-trace": 4, "gap": 0},
        "fallbacks": [],
        "gap_ms": DEFAULT_BATCH_GAP * 1000,
    }
    assert doc["wire"] == {"checked": True, "mismatches": []}
    assert [b["reason"] for b in doc["batches"]] == [
        "QEMU device start",
        "QEMU commit at trace line 3",
        "QEMU commit at trace line 6",
    ]
    assert all(b["batching"] == "qemu-trace" for b in doc["batches"])


def test_the_gap_rule_misses_the_legacy_merge_in_one_commit() -> None:
    # The same messages without the trace: the 50 ms pause splits the commit in two "batches".
    doc = book(legacy_merge_in_one_commit(), trace=False).report()
    assert doc["counts"]["violations"] == 0 and doc["batching"]["method"] == "gap"
    assert "batches: 20 ms gap (heuristic; give --qemu-trace for exact batches)" in (
        render_report(doc)
    )


def unplug_then_replug_in_two_commits() -> Qemu:
    """Memslot 0 unplugged in one commit and plugged again in the next, 2 ms later."""
    qemu = Qemu()
    plug_slot0(qemu)
    qemu.commit()
    qemu.send(REM_MEM_REG, removed=[slot(0)])
    qemu.wait(0.002)
    qemu.commit()
    qemu.send(ADD_MEM_REG, added=[slot(0)])
    return qemu


def test_unplug_and_replug_in_two_commits_is_clean_with_the_trace() -> None:
    doc = book(unplug_then_replug_in_two_commits()).report()
    assert doc["clean"] and doc["counts"]["violations"] == 0
    assert doc["batching"]["commits"] == 4 and doc["batching"]["method"] == "qemu-trace"
    assert "batches: QEMU trace, 4 commits" in render_report(doc)


def test_the_gap_rule_flags_unplug_and_replug_in_two_commits() -> None:
    doc = book(unplug_then_replug_in_two_commits(), trace=False).report()
    assert doc["counts"]["violations"] == 1
    assert doc["violations"][0]["kind"] == "readd"


def test_started_0_commits_carry_nothing_and_the_start_is_one_batch() -> None:
    qemu = Qemu()
    qemu.commit(started=False)  # the device is not running yet: nothing is sent
    qemu.commit(started=False)
    qemu.send(ADD_MEM_REG, added=[BOOT])  # vhost_dev_start
    qemu.send(ADD_MEM_REG, added=[slot(0)])
    history = book(qemu)
    assert [r.commit for r in history.records] == ["QEMU device start after trace line 2"] * 2
    assert len({r.batch for r in history.records}) == 1


# -- fallbacks ------------------------------------------------------------------------------


def fallback_of(history: History) -> dict[str, object]:
    doc = history.report()
    assert doc["batching"]["method"] == "mixed"
    (fallback,) = doc["batching"]["fallbacks"]
    assert isinstance(fallback, dict)
    return fallback


def test_a_missing_write_line_falls_back_saying_which_message() -> None:
    qemu = Qemu()
    plug_slot0(qemu)
    qemu.commit()
    qemu.send(ADD_MEM_REG, added=[slot(1)], traced=False)  # its write line is missing
    qemu.wait(1.0)
    qemu.commit()
    qemu.send(ADD_MEM_REG, added=[slot(2)])
    history = book(qemu)
    fallback = fallback_of(history)
    # Two replies read after ADD #2's write, with no write between them.
    assert fallback["request"] == ADD_MEM_REG and fallback["seq"] == 3
    reason = str(fallback["reason"])
    assert "ADD_MEM_REG #3: QEMU read a reply to ADD_MEM_REG at trace line 7" in reason
    assert "a vhost_user_write line is missing" in reason
    assert [r.batching for r in history.records] == ["qemu-trace", "qemu-trace", "gap", "gap"]
    out = render_report(history.report())
    assert "batches: mixed" in out and "FALLBACK to the gap rule" in out


def test_a_trace_that_stops_waits_then_falls_back() -> None:
    qemu = Qemu()
    qemu.send(ADD_MEM_REG, added=[BOOT])
    pairer = Pairer("/run/qemu-trace.log", wait=2.0)
    pairer.feed(parse_lines(qemu.lines))
    msg = qemu.messages[0]
    res = pairer.pair(ADD_MEM_REG, 1, arrived=msg.arrived, replied=msg.replied, now=msg.arrived)
    assert res is not None and res.batching == "qemu-trace"
    qemu.commit()
    qemu.lines.clear()  # QEMU writes nothing more
    second = qemu.send(ADD_MEM_REG, added=[slot(0)], traced=False)
    assert (
        pairer.pair(ADD_MEM_REG, 2, arrived=second.arrived, replied=None, now=second.arrived + 1.9)
        is None
    )
    late = pairer.pair(
        ADD_MEM_REG, 2, arrived=second.arrived, replied=None, now=second.arrived + 2.1
    )
    assert late is not None and late.batching == "gap" and late.fallback is not None
    assert "no vhost_user_write line for it within 2 s of its arrival" in late.fallback
    assert "the trace stopped at line 2" in late.fallback
    # From there on the gap rule, without another fallback.
    again = pairer.pair(ADD_MEM_REG, 3, arrived=0.0, replied=None, now=0.0)
    assert again is not None and again.batching == "gap" and again.fallback is None


def test_two_interleaved_devices_fall_back() -> None:
    """A second vhost-user device in the same QEMU: its commit and messages land in the same
    file between ours; its reply was read before vhostmem replied to the message it pairs with."""
    qemu = Qemu()
    plug_slot0(qemu)
    qemu.commit()
    qemu.send(ADD_MEM_REG, added=[slot(1)])
    other = Qemu(lines=qemu.lines, now=qemu.now)
    other.commit()
    other.send(ADD_MEM_REG, added=[slot(1)])  # the other device's message: not ours
    qemu.now = other.now + 1.0
    qemu.commit()
    qemu.send(ADD_MEM_REG, added=[slot(2)])
    fallback = fallback_of(book(qemu))
    assert fallback["seq"] == 4
    reason = str(fallback["reason"])
    assert "before vhostmem sent its reply" in reason and "another vhost device's" in reason


def test_a_write_by_another_thread_after_a_commit_starts_a_new_batch() -> None:
    """A commit's messages come from its own thread (QEMU's big lock): a write by another
    thread with no commit line before it (a device start from a vCPU) is a batch of its own."""
    qemu = Qemu()
    plug_slot0(qemu)
    qemu.commit()
    qemu.send(REM_MEM_REG, removed=[slot(0)])
    qemu.send(ADD_MEM_REG, added=[slot(0)], tid=999)
    history = book(qemu)
    doc = history.report()
    assert doc["batching"]["fallbacks"] == [] and doc["counts"]["violations"] == 0
    assert history.records[-1].commit == (
        "QEMU messages outside a commit (device start?) from trace line 9"
    )
    assert history.records[-1].batch == history.records[-2].batch + 1


def test_a_file_that_appears_after_the_connection_falls_back() -> None:
    qemu = Qemu()
    plug_slot0(qemu)
    history = book(qemu, pairer=Pairer("/run/qemu-trace.log", present=False))
    doc = history.report()
    assert doc["batching"]["method"] == "gap"
    (fallback,) = doc["batching"]["fallbacks"]
    assert fallback["seq"] == 1
    assert "did not exist when the front-end connected" in fallback["reason"]
    assert "/run/qemu-trace.log" in fallback["reason"]


def test_a_file_replaced_mid_run_falls_back() -> None:
    qemu = Qemu()
    plug_slot0(qemu)
    pairer = Pairer("/run/qemu-trace.log")
    pairer.feed(parse_lines(qemu.lines))
    for n, msg in enumerate(qemu.messages, 1):
        assert pairer.pair(msg.name, n, arrived=msg.arrived, replied=msg.replied, now=msg.arrived)
    pairer.replaced("inode 12 -> 13")
    res = pairer.pair(ADD_MEM_REG, 3, arrived=qemu.now, replied=None, now=qemu.now)
    assert res is not None and res.batching == "gap" and res.fallback is not None
    assert "ADD_MEM_REG #3" in res.fallback and "was replaced (inode 12 -> 13)" in res.fallback


def test_a_request_code_that_differs_falls_back() -> None:
    qemu = Qemu()
    plug_slot0(qemu)
    qemu.commit()
    msg = qemu.send(REM_MEM_REG, removed=[slot(0)])
    qemu.messages[-1] = Message(ADD_MEM_REG, msg.arrived, msg.replied, added=[slot(1)])
    reason = str(fallback_of(book(qemu))["reason"])
    assert "QEMU's next memory-table message is REM_MEM_REG (trace line 7" in reason
    assert "not ADD_MEM_REG" in reason


def test_pairing_waits_for_a_write_line_that_comes_late() -> None:
    """QEMU traces the write after the write: the line may come after vhostmem has the message."""
    qemu = Qemu()
    msg = qemu.send(ADD_MEM_REG, added=[BOOT])
    pairer = Pairer("/run/qemu-trace.log")
    assert (
        pairer.pair(ADD_MEM_REG, 1, arrived=msg.arrived, replied=msg.replied, now=msg.arrived)
        is None
    )
    pairer.feed(parse_lines(qemu.lines))
    res = pairer.pair(ADD_MEM_REG, 1, arrived=msg.arrived, replied=msg.replied, now=msg.arrived)
    assert res is not None and res.batching == "qemu-trace" and res.line == 1


# -- wire cross-check -----------------------------------------------------------------------


def test_wire_cross_check_names_what_qemu_wrote_and_read() -> None:
    qemu = Qemu()
    plug_slot0(qemu)
    qemu.commit()
    qemu.send(ADD_MEM_REG, added=[slot(1)], reply=False)
    qemu.trace("vhost_user_read req:37 flags:0x5")  # a reply vhostmem did not send
    qemu.wait(1.0)
    qemu.commit()
    qemu.trace("vhost_user_write req:38 flags:0x9")  # a message vhostmem never received
    doc = book(qemu).report()
    assert not doc["clean"] and doc["counts"]["violations"] == 0
    texts = [m["mismatch"] for m in doc["wire"]["mismatches"]]
    assert texts == [
        "QEMU read a reply to ADD_MEM_REG #3 (trace line 8 (thread 20057)) that vhostmem did "
        "not send",
        "QEMU wrote REM_MEM_REG (trace line 10 (thread 20057)) that vhostmem never received",
    ]
    out = render_report(doc)
    assert "wire vs QEMU trace: 2 MISMATCH(ES)" in out and "never received" in out


# -- SET_MEM_TABLE: one message is never a violation ------------------------------------------


def dpdk_region(size: int) -> Region[None]:
    return never_mapped(gpa=0, size=size, uaddr=0x7F5000000000, mmap_offset=0, file_id=(0x10, 77))


@pytest.mark.parametrize("trace", [True, False])
def test_dpdk_growing_one_region_by_set_mem_table_is_clean(trace: bool) -> None:
    """DPDK 22.11 virtio-user grows one hugetlb region at one GPA: 2 -> 8 -> 14 -> 18 -> 370 MiB,
    each a whole SET_MEM_TABLE (testpmd is not QEMU: no trace, the gap rule)."""
    qemu = Qemu()
    sizes = [2, 8, 14, 18, 370]
    qemu.send(SET_MEM_TABLE, added=[dpdk_region(2 * MiB)])
    for old, new in itertools.pairwise(sizes):
        qemu.wait(0.001)
        qemu.send(SET_MEM_TABLE, removed=[dpdk_region(old * MiB)], added=[dpdk_region(new * MiB)])
    doc = book(qemu, trace=trace, peer="dpdk-testpmd").report()
    assert doc["clean"] and doc["counts"]["violations"] == 0
    assert [(m["kind"], m["seq"]) for m in doc["remaps"]] == [("grow", n) for n in (2, 3, 4, 5)]
    assert doc["counts"]["by_classification"] == {"plug": 1, "remap": 4}
    first = doc["remaps"][0]
    assert first["removed"][0]["size"] == 2 * MiB and first["added"][0]["size"] == 8 * MiB
    assert "0x0-0x1fffff (2 MiB)" in first["why"] and "not a violation" in first["why"]
    out = render_report(doc)
    assert "atomic: yes" in out and "remap (grow, not a violation)" in out
    assert "QEMU" not in out.split("\n\n", 1)[1]


def test_two_set_mem_tables_in_one_commit_can_be_a_violation() -> None:
    """A sequence of messages can be non-atomic: one table drops memory, the next one of the
    same commit maps it again."""
    qemu = Qemu()
    qemu.send(SET_MEM_TABLE, added=[BOOT, slot(0)])
    qemu.wait(1.0)
    qemu.commit()
    qemu.send(SET_MEM_TABLE, removed=[slot(0)], kept=[BOOT])
    qemu.send(SET_MEM_TABLE, added=[slot(0)], kept=[BOOT])
    doc = book(qemu).report()
    assert doc["counts"]["violations"] == 1 and doc["violations"][0]["kind"] == "readd"


def test_a_front_end_that_is_not_qemu_is_named_not_qemu() -> None:
    qemu = legacy_merge_in_one_commit()
    doc = book(qemu, trace=False, peer="dpdk-testpmd").report()
    qemu2 = Qemu()
    plug_slot0(qemu2)
    qemu2.commit()
    qemu2.send(REM_MEM_REG, removed=[slot(0)])
    qemu2.send(ADD_MEM_REG, added=[slot(0, slots=2)])
    (v,) = book(qemu2, trace=False, peer="dpdk-testpmd").report()["violations"]
    assert "the front-end (dpdk-testpmd, pid 4242)" in v["why"]
    assert "QEMU" not in v["why"] and "533f5d6679" not in v["why"]
    assert doc["counts"]["violations"] == 0


def test_the_pairer_keeps_only_lines_still_to_pair() -> None:
    qemu = Qemu()
    for _ in range(500):  # a long-running QEMU: other requests' lines, empty commits
        qemu.trace("vhost_user_write req:12 flags:0x1")
        qemu.commit(started=False)
    qemu.send(ADD_MEM_REG, added=[BOOT])
    pairer = Pairer("/run/qemu-trace.log")
    pairer.feed(parse_lines(qemu.lines))
    assert pairer.held == 502  # the 500 commits, the ADD's write and read
    msg = qemu.messages[0]
    res = pairer.pair(ADD_MEM_REG, 1, arrived=msg.arrived, replied=msg.replied, now=msg.arrived)
    assert res is not None and res.commit == ("start", 1000)
    assert pairer.held == 0
