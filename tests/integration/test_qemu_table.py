"""vhostmem beside a real QEMU 10 and a Linux guest with virtio-mem: the table is QEMU's.

Ground truth is QEMU itself: its memslot aliases (HMP ``info mtree``), its virtio-mem state
(QMP ``query-memory-devices``) and guest memory as the guest sees it (HMP ``xp``).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from vhostmem.testing.backend import start_backend

from .conftest import BOOT_RAM, NR_HUGEPAGES, GiB, MakeRig, MiB, Rig, hugepages, require_root

POOL_2M = "/sys/kernel/mm/hugepages/hugepages-2048kB/"


def nonzero_gpas(
    rig: Rig, start: int, stop: int, step: int, want: int, length: int = 64
) -> list[int]:
    """GPAs in [start, stop) where QEMU shows non-zero guest memory (the guest must be paused)."""
    found = []
    for gpa in range(start, stop, step):
        if any(rig.guest.xp(gpa, length)):
            found.append(gpa)
            if len(found) == want:
                break
    return found


def assert_peek_equals_xp(rig: Rig, gpas: list[int], length: int = 64) -> None:
    for gpa in gpas:
        assert rig.backend.peek(gpa, length) == rig.guest.xp(gpa, length), f"at gpa 0x{gpa:x}"


def memory_requests(rig: Rig) -> list[tuple[str, int, int]]:
    return [
        (e["request"], e["region"]["gpa"], e["region"]["size"])
        for e in rig.backend.memory_events()
        if e["result"] == "ok" and "region" in e
    ]


def test_boot_region_and_peek_equals_xp(make_rig: MakeRig) -> None:
    rig = make_rig()
    [boot] = [r for r in rig.backend.regions() if r["gpa"] == 0]
    assert boot["size"] == BOOT_RAM and boot["backing"] == "memfd"
    assert boot["peer_pid"] == rig.guest.pid
    rig.guest.stop()
    try:
        # The decompressed kernel runs at 16 MiB (CONFIG_PHYSICAL_START): non-zero content.
        gpas = nonzero_gpas(rig, 0x1000000, 0x3000000, 0x40000, want=6)
        assert len(gpas) >= 4, gpas
        assert_peek_equals_xp(rig, gpas)
        assert_peek_equals_xp(rig, [0x1000000], length=4096)
    finally:
        rig.guest.cont()
    # handshake completed: the event log has the connect and the boot RAM ADD
    events = rig.backend.log_lines()
    assert events[0]["event"] == "connect"
    assert memory_requests(rig)[0] == ("ADD_MEM_REG", 0, BOOT_RAM)


def plug_steps(rig: Rig, steps: list[int], *, memslot: int = GiB, check_peek: bool = True) -> None:
    """Plug to each size; after each: table == QEMU's memslots, one ADD per memslot plugged,
    one REM per memslot unplugged, nothing else touched."""
    base = rig.guest.virtio_mem()["memaddr"]
    before = set(rig.memslot_regions())
    seen = len(memory_requests(rig))
    for size in steps:
        rig.guest.plug(size, 60)
        now = set(rig.wait_table_matches_qemu())
        assert len(now) == -(-size // memslot)
        assert all(gpa == base + off for gpa, _, off in now)
        requests = memory_requests(rig)[seen:]
        seen += len(requests)
        added = {(g, s) for r, g, s in requests if r == "ADD_MEM_REG"}
        removed = {(g, s) for r, g, s in requests if r == "REM_MEM_REG"}
        assert added == {(g, s) for g, s, _ in now - before}, requests
        assert removed == {(g, s) for g, s, _ in before - now}, requests
        assert len(requests) == len(added) + len(removed)  # one message per memslot, no others
        assert all(g != 0 for _, g, _ in requests)  # boot RAM never touched
        if check_peek and now:
            rig.guest.stop()
            try:
                gpas = [
                    gpa + i * (memslot // 4) + 0x1000 for gpa, _, _ in sorted(now) for i in range(4)
                ]
                assert_peek_equals_xp(rig, gpas)
            finally:
                rig.guest.cont()
        before = now
    assert rig.backend.violations() == []


def test_virtio_mem_plug_sequence(make_rig: MakeRig) -> None:
    rig = make_rig()
    plug_steps(rig, [GiB, 3 * GiB, GiB, 0])
    # nothing of the memslots is left mapped
    stats = rig.backend.stats()
    assert stats["regions"] == 1 and stats["maps"] == 1


def test_hugetlb_memfd_backends(make_rig: MakeRig) -> None:
    with hugepages(256 + 512 + 32):
        rig = make_rig(hugetlb=True)
        [boot] = [r for r in rig.backend.regions() if r["gpa"] == 0]
        assert boot["page_size"] == 2 * MiB
        plug_steps(rig, [GiB, 0])
        rig.guest.close()


def test_hugetlbfs_file_backends(make_rig: MakeRig, tmp_path: Path) -> None:
    mount = tmp_path / "hugetlbfs"
    mount.mkdir()
    require_root("mounting hugetlbfs", "deselect this test with -k 'not hugetlbfs_file'")
    subprocess.run(["mount", "-t", "hugetlbfs", "none", str(mount)], check=True)
    try:
        with hugepages(256 + 512 + 32):
            rig = make_rig(hugetlb=True, hugetlb_path=str(mount))
            [boot] = [r for r in rig.backend.regions() if r["gpa"] == 0]
            assert boot["backing"] == "hugetlbfs" and boot["page_size"] == 2 * MiB
            plug_steps(rig, [GiB, 0])
            rig.guest.close()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def pool_2m(name: str) -> int:
    return int(Path(POOL_2M, name).read_text())


@contextlib.contextmanager
def free_huge_pages(pages: int) -> Iterator[None]:
    """Set the 2 MiB pool so that ``pages`` are free; put nr_hugepages back after."""
    require_root("sizing the huge page pool", f"echo N > {NR_HUGEPAGES} so {pages} are free")
    before = int(Path(NR_HUGEPAGES).read_text())
    wanted = before + pages - pool_2m("free_hugepages")
    Path(NR_HUGEPAGES).write_text(str(wanted))
    try:
        # Another process may change the pool meanwhile: near enough is enough, the test
        # reads every number it compares from sysfs.
        if not pages <= pool_2m("free_hugepages") < pages + 64:
            raise AssertionError(
                f"could not make {pages} 2 MiB pages free (nr_hugepages "
                f"{pool_2m('nr_hugepages')}, free {pool_2m('free_hugepages')})"
            )
        yield
    finally:
        Path(NR_HUGEPAGES).write_text(str(before))


def test_hugetlb_memslot_beyond_free_pool_is_served_with_a_shortfall_note(
    make_rig: MakeRig,
) -> None:
    # Boot RAM (256 pages, reserved by QEMU) plus 64 spare pages; a plugged virtio-mem memslot
    # (reserve=off) spans 512 pages. vhostmem must ack it and say the pool is short; the guest
    # is plugged only 64 MiB (32 pages), so it can never touch a page the pool lacks.
    with free_huge_pages(BOOT_RAM // (2 * MiB) + 64):
        rig = make_rig(hugetlb=True)
        rig.guest.plug(64 * MiB, 60)
        [(gpa, size, _)] = rig.wait_table_matches_qemu()
        assert size == GiB
        [add] = rig.backend.wait_for(
            lambda: [
                e
                for e in rig.backend.memory_events()
                if e["request"] == "ADD_MEM_REG" and e["region"]["gpa"] == gpa
            ],
            15,
            "the memslot's ADD_MEM_REG event line",
        )
        assert add["result"] == "ok"
        [note] = add["notes"]
        uaddr = add["region"]["uaddr"]
        assert note.startswith(
            f"ADD_MEM_REG gpa=0x{gpa:x}-0x{gpa + size - 1:x} size=0x{size:x} (1 GiB) "
            f"uaddr=0x{uaddr:x} mmap_offset=0x{add['region']['mmap_offset']:x}: huge page "
            f"shortfall: the region spans 512 pages of 2 MiB (memfd-hugetlb '"
        ), note
        assert "pages short if every page is touched. Served anyway" in note
        assert "gets SIGBUS: QEMU" in note
        rig.guest.stop()  # nothing allocates while the numbers are compared
        try:
            doc = rig.backend.client.call("diagnose")
            free, resv = pool_2m("free_hugepages"), pool_2m("resv_hugepages")
        finally:
            rig.guest.cont()
        [short] = [s for s in doc["shortfalls"] if s["gpa"] == gpa]
        assert (short["size"], short["uaddr"], short["region_pages"]) == (size, uaddr, 512)
        assert (short["free"], short["resv"]) == (free, resv)
        # The boot RAM file lacks exactly the pages QEMU reserved for it, which are counted in
        # free: what is short is the memslot's unallocated pages beyond the spare 64.
        assert short["short"] == 512 - short["held"] + short["other_missing"] - free > 0
        assert [s["gpa"] for s in doc["shortfalls"]] == [gpa]  # boot RAM is covered
        rig.guest.plug(0, 60)
        rig.backend.wait_for(
            lambda: not rig.backend.client.call("diagnose")["shortfalls"],
            15,
            "no shortfall once the memslot is unplugged",
        )
        rig.guest.close()


def test_dimm_hot_add(make_rig: MakeRig) -> None:
    rig = make_rig()
    seen = len(memory_requests(rig))
    rig.guest.hot_add_dimm("dimm0", 256 * MiB)
    [dimm] = [d for d in rig.guest.memory_devices() if d["type"] == "dimm"]
    addr = dimm["data"]["addr"]
    rig.backend.wait_for(
        lambda: any(r["gpa"] == addr for r in rig.backend.regions()), 15, "the DIMM region"
    )
    assert memory_requests(rig)[seen:] == [("ADD_MEM_REG", addr, 256 * MiB)]
    [region] = [r for r in rig.backend.regions() if r["gpa"] == addr]
    assert region["size"] == 256 * MiB and region["file"].startswith("/dev/shm/")


def test_legacy_set_mem_table(make_rig: MakeRig) -> None:
    rig = make_rig(vhostmem_args=("--no-mem-slots",))
    [boot] = rig.backend.regions()
    rig.guest.plug(GiB, 60)
    base = rig.guest.virtio_mem()["memaddr"]
    # QEMU allows 8 regions without CONFIGURE_MEM_SLOTS, so virtio-mem uses ONE memslot for the
    # whole 4 GiB device (hw/mem/memory-device.c memory_device_memslot_decision_limit).
    rig.backend.wait_for(lambda: len(rig.backend.regions()) == 2, 15, "the virtio-mem region")
    regions = sorted(rig.backend.regions(), key=lambda r: r["gpa"])
    assert (regions[1]["gpa"], regions[1]["size"]) == (base, 4 * GiB)
    assert regions[0]["address"] == boot["address"]  # unchanged region kept its mapping
    tables = [e for e in rig.backend.memory_events() if e["request"] == "SET_MEM_TABLE"]
    assert [len(e["regions"]) for e in tables] == [1, 2]
    assert tables[1]["kept"] == 1 and tables[1]["added"] == 1
    assert not [e for e in rig.backend.memory_events() if e["request"] != "SET_MEM_TABLE"]
    rig.guest.plug(0, 60)
    rig.backend.wait_for(lambda: len(rig.backend.regions()) == 1, 15, "the device region to go")
    assert rig.backend.regions()[0]["address"] == boot["address"]


def test_max_slots_8_falls_back_to_one_memslot(make_rig: MakeRig) -> None:
    """Documents QEMU's behaviour: with fewer than 509 slots on offer, virtio-mem uses a single
    memslot for the whole device even though CONFIGURE_MEM_SLOTS is negotiated."""
    rig = make_rig(vhostmem_args=("--max-slots", "8"))
    rig.guest.plug(GiB, 60)
    base = rig.guest.virtio_mem()["memaddr"]
    rig.backend.wait_for(lambda: rig.memslot_regions(), 15, "the virtio-mem region")
    assert rig.memslot_regions() == [(base, 4 * GiB, 0)]
    assert [r for r, _, _ in memory_requests(rig)] == ["ADD_MEM_REG", "ADD_MEM_REG"]


def test_qemu_killed_mid_plug_releases_everything(make_rig: MakeRig) -> None:
    rig = make_rig()
    backend = rig.backend
    idle = backend.stats()
    baseline_fds = idle["process_fds"] - idle["mapping_fds"]
    rig.guest.qmp(
        "qom-set", path="/machine/peripheral/vm0", property="requested-size", value=3 * GiB
    )
    rig.backend.wait_for(
        lambda: any(r[1] != 0 for r in memory_requests(rig)), 30, "the first memslot ADD_MEM_REG"
    )
    rig.guest.kill_hard()
    plugged_at_kill = [g for _, g, _ in memory_requests(rig) if g != 0]
    backend.wait_for(
        lambda: [e for e in backend.log_lines() if e.get("event") == "disconnect"],
        15,
        "the disconnect",
    )
    stats = backend.stats()
    assert stats["regions"] == 0 and stats["maps"] == 0 and stats["mapped_bytes"] == 0
    assert stats["mapping_fds"] == 0
    assert stats["process_fds"] <= baseline_fds
    assert plugged_at_kill  # at least the first memslot had arrived
    # still listening: the next QEMU is served
    second = make_rig(backend=backend)
    assert [r["gpa"] for r in second.backend.regions()] == [0]


def test_reconnect_rebuilds_the_table(make_rig: MakeRig, tmp_path: Path) -> None:
    rig = make_rig(reconnect_ms=200)
    rig.guest.plug(GiB, 60)
    want = rig.wait_table_matches_qemu()
    # restart vhostmem on the same socket path; QEMU reconnects and sends the table again
    assert rig.backend.stop() == 0
    directory = Path(rig.backend.socket).parent
    rig.backend = start_backend(directory, name=Path(rig.backend.socket).name)
    rig.backend.wait_for(
        lambda: len(rig.backend.regions()) == 1 + len(want), 30, "the rebuilt table"
    )
    assert rig.memslot_regions() == rig.qemu_memslots() == want


def test_system_reset_follows_qemu(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.guest.plug(GiB, 60)
    [memslot] = rig.wait_table_matches_qemu()
    rig.guest.system_reset()
    # virtio-mem unplugs everything on a system reset (virtio_mem_system_reset_hold) ...
    rig.backend.wait_for(lambda: rig.memslot_regions() == [], 30, "the memslot to be removed")
    # ... and requested-size is still 1 GiB, so the rebooted guest's driver plugs it again.
    rig.guest.wait_ready(60)
    rig.backend.wait_for(lambda: rig.memslot_regions() == [memslot], 60, "the memslot to come back")
    assert rig.qemu_memslots() == [memslot]
    requests = [r for r, g, _ in memory_requests(rig) if g != 0]
    assert requests == ["ADD_MEM_REG", "REM_MEM_REG", "ADD_MEM_REG"]
    assert rig.backend.regions()[0]["gpa"] == 0  # boot RAM stayed throughout
    assert rig.backend.violations() == []  # unplug and replug in different batches
