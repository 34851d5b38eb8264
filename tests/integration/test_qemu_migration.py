"""Live migration of a real QEMU guest with vhostmem attached (the source side).

The guest, on vhostmem's TAP in a network namespace, is pinged while QEMU migrates it to a file
(``migrate file:``): the whole precopy runs on the source, so QEMU maps a dirty log
(SET_LOG_BASE), turns VHOST_F_LOG_ALL on, sets VHOST_VRING_F_LOG on the rings, and turns it
all off at the end. vhostmem's event log shows logging start and end, with pages marked. The
same migration with ``--no-dirty-log`` is refused by QEMU, naming LOG_SHMFD: the feature is
what makes migration possible.

Root, /dev/net/tun and busybox are prerequisites: missing, the test fails (never skips).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from vhostmem.ctl import ctl_main
from vhostmem.testing.backend import RunningBackend
from vhostmem.testing.qemu import Guest, GuestConfig

from ..netns import fresh_tap_and_netns, own_name
from .conftest import GiB, MakeRig, Rig
from .test_qemu_datapath import GUEST_ADDR, HOST_ADDR, ping_from_namespace, received

NS = TAP = own_name("vhmm")


@pytest.fixture
def net_names() -> Iterator[None]:
    with fresh_tap_and_netns(NS, TAP):
        yield


def start(make_rig: MakeRig, *extra: str) -> Rig:
    rig = make_rig(
        vhostmem_args=("--tap", TAP, "--netns", NS, "--tap-address", f"{HOST_ADDR}/24", *extra)
    )
    out = rig.guest.run_in_guest(f"ping -c 3 -W 1 {HOST_ADDR}", timeout=40)
    assert received(out) >= 2, out
    return rig


def test_migration_logs_the_pages_vhostmem_writes(
    make_rig: MakeRig, net_names: None, tmp_path: Path
) -> None:
    rig = start(make_rig)
    rig.guest.plug(GiB, 60)
    rig.wait_table_matches_qemu()
    # pings from the namespace during the migration: RX buffers written while logging is on
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", NS, "busybox", "ping", "-c", "50", "-i", "0.1", GUEST_ADDR],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        info = rig.guest.migrate(f"file:{tmp_path / 'state'}")
    finally:
        pinger.wait(timeout=30)
    assert info["status"] == "completed", info
    events = [e for e in rig.backend.log_lines() if e.get("event") == "dirty-log"]
    names = [(e["name"], e["logging"]) for e in events]
    # the log is mapped, then LOG_ALL turns logging on (hw/virtio/vhost.c vhost_dev_set_log);
    # at completion QEMU stops the VM and with it the rings (GET_VRING_BASE) and sends no
    # SET_FEATURES without LOG_ALL: vhost_migration_log only notes it for a stopped device
    assert names[:2] == [("SET_LOG_BASE", False), ("SET_FEATURES", True)], names
    [conn] = [c for s in rig.backend.stats()["sockets"] for c in s["connections"]]
    area = conn["dirty_log"]
    assert area is not None and area["marked"] > 0 and area["beyond"] == 0, area
    assert area["size"] * 8 * 4096 >= 5 * GiB, area  # the log covers boot RAM and virtio-mem
    dp = rig.backend.stats()["datapath"][0]
    assert dp["ring_errors"] == 0, dp
    assert rig.backend.violations() == []


def test_without_dirty_log_qemu_refuses_to_migrate(
    make_rig: MakeRig, net_names: None, tmp_path: Path
) -> None:
    rig = start(make_rig, "--no-dirty-log")
    with pytest.raises(ExecuteError) as caught:
        rig.guest.migrate(f"file:{tmp_path / 'state'}")
    assert "LOG_SHMFD" in str(caught.value), str(caught.value)


#: Five seconds of 1000-byte UDP datagrams to the discard port of the address in argv[1].
UDP_FLOOD = (
    "import socket, sys, time\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "end = time.monotonic() + 5\n"
    "while time.monotonic() < end:\n"
    "    try:\n"
    "        s.sendto(b'x' * 1000, (sys.argv[1], 9))\n"
    "    except OSError:\n"
    "        pass\n"
)

NS_DST = TAP_DST = own_name("vhmn")  # not test_dpdk.py's vhmd


@pytest.fixture
def dst_names() -> Iterator[None]:
    with fresh_tap_and_netns(NS_DST, TAP_DST):
        yield


def check_qmp(backend: RunningBackend, guest: Guest, capsys: pytest.CaptureFixture[str]) -> None:
    """``vhostmem-ctl check --qmp`` against ``guest``'s QEMU exits 0: the table is what QEMU
    should send and no violation was seen."""
    capsys.readouterr()
    code = ctl_main(
        ["--control", backend.control, "check", "--json", "--qmp", str(guest.qmp_user_path)]
    )
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["qmp"]["matches"] and doc["clean"], doc


def region_table(backend: RunningBackend) -> list[dict[str, int]]:
    """``backend``'s live region table, by GPA: what the run's JSON line quotes."""
    keys = ("gpa", "size", "uaddr", "mmap_offset")
    return sorted(({k: r[k] for k in keys} for r in backend.regions()), key=lambda r: r["gpa"])


def gpa_ranges(table: list[dict[str, int]]) -> list[tuple[int, int]]:
    return [(r["gpa"], r["size"]) for r in table]


def test_migrate_to_a_second_qemu_and_vhostmem(
    make_rig: MakeRig,
    net_names: None,
    dst_names: None,
    vhostmem_factory: Callable[..., RunningBackend],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rig = start(make_rig)
    rig.guest.plug(3 * GiB, 90)
    src_table = rig.wait_table_matches_qemu()
    assert len(src_table) == 3, src_table  # three 1 GiB memslots
    # the destination: its own vhostmem with its own TAP and namespace, QEMU waiting
    dst = vhostmem_factory(
        ("--tap", TAP_DST, "--netns", NS_DST, "--tap-address", f"{HOST_ADDR}/24"),
        name="vu-dst.sock",
    )
    incoming = tmp_path / "migrate.sock"
    guest = Guest(
        GuestConfig(
            vhost_socket=dst.socket,
            incoming=f"unix:{incoming}",
            qemu_trace=dst.qemu_trace or False,
        )
    )
    try:
        guest.start()
        dst.wait_for(incoming.exists, 30, "the destination QEMU to listen for the migration")
        # pings and a UDP flood from the source's namespace while the guest migrates
        traffic = [
            subprocess.Popen(
                ["ip", "netns", "exec", NS, *argv],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for argv in (
                ["busybox", "ping", "-c", "30", "-i", "0.1", GUEST_ADDR],
                ["python3", "-c", UDP_FLOOD, GUEST_ADDR],
            )
        ]
        try:
            # the source's table as it stands when the migration starts
            src_before = region_table(rig.backend)
            info = rig.guest.migrate(f"unix:{incoming}")
        finally:
            for proc in traffic:
                proc.wait(timeout=60)
        assert info["status"] == "completed", info
        guest.wait_running(60)
        # the destination's table is QEMU's memslots, reached without a violation
        want = [(s.gpa_start, s.size, s.offset) for s in guest.memslots()]
        assert len(want) == 3, want

        def dst_table() -> list[tuple[int, int, int]]:
            return sorted(
                (r["gpa"], r["size"], r["mmap_offset"]) for r in dst.regions() if r["gpa"] != 0
            )

        dst.wait_for(lambda: dst_table() == want, 30, f"the destination table to be {want}")
        check_qmp(dst, guest, capsys)
        dst_after_migration = region_table(dst)
        # the same guest-physical layout on both sides; only the uaddrs (each QEMU's own
        # mappings) differ
        assert gpa_ranges(dst_after_migration) == gpa_ranges(src_before), (
            src_before,
            dst_after_migration,
        )
        pings = ping_from_namespace(ns=NS_DST)
        [conn] = [c for s in rig.backend.stats()["sockets"] for c in s["connections"]]
        assert conn["dirty_log"] is not None and conn["dirty_log"]["marked"] > 0, conn
        # resize on the destination, 3 -> 1 GiB, and check again
        guest.plug(GiB, 90)
        want = [(s.gpa_start, s.size, s.offset) for s in guest.memslots()]
        dst.wait_for(lambda: dst_table() == want, 30, f"the destination table to be {want}")
        check_qmp(dst, guest, capsys)
        pings_after_resize = ping_from_namespace(2, ns=NS_DST)
        dst_after_resize = region_table(dst)
        assert dst.violations() == []
        dp = dst.stats()["datapath"][0]
        assert dp["ring_errors"] == 0, dp
        # QEMU announces a migrated guest (migration parameter announce-rounds, 5 by default);
        # vhostmem offers no GUEST_ANNOUNCE, so each round is a SEND_RARP, which vhostmem sends
        # out of the destination's TAP as the RARP frame for the guest's MAC.
        assert dp["rarp_sent"] >= 1, dp
        # the guest's virtio-net saw no broken ring (drivers/net/virtio_net.c and
        # drivers/virtio/virtio_ring.c report them with BAD_RING / "is not a head")
        kernel = guest.run_in_guest("dmesg | grep -ci -e 'not a head' -e 'bad_ring' -e 'vring'")
        assert kernel.strip().splitlines()[-1].strip() == "0", kernel
        print(
            json.dumps(
                {
                    "query_migrate": info,
                    "source_table_before_migration": src_before,
                    "destination_table_after_migration": dst_after_migration,
                    "destination_table_after_resize": dst_after_resize,
                    "source_dirty_log": conn["dirty_log"],
                    "destination_rx_tx": [dp["rx_packets"], dp["tx_packets"]],
                    "destination_rarp_sent": dp["rarp_sent"],
                    "destination_ping": pings.strip().splitlines(),
                    "destination_ping_after_resize": pings_after_resize.strip().splitlines(),
                }
            )
        )
    finally:
        guest.close()
