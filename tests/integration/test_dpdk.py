"""DPDK's virtio-user (dpdk-testpmd, DPDK 22.11 from Debian's dpdk-dev) as vhostmem's front-end.

A second real front-end beside QEMU: the three ways DPDK backs its memory arrive as the regions
they are; packets move both ways through ``vhostmem --tap`` with vhostmem's, the TAP's and
testpmd's counters equal; a front-end killed mid-traffic leaves nothing behind; a port asking for
more queue pairs than vhostmem has gets refusals, not a disconnect; and DPDK's server mode
(vhostmem ``--connect``) survives a vhostmem restart.

testpmd runs pinned, both lcores on the last CPU (:mod:`vhostmem.testing.testpmd`), for a few
seconds at a time, with a watchdog; every wait is bounded. Root, /dev/net/tun, hugetlbfs and
dpdk-testpmd are prerequisites: missing, a test fails naming the fix (never skips). What a test
started is stopped by pid; its namespace and TAP are removed by name. Marked ``dpdk`` (and, as
everything under tests/integration, ``qemu``: ``-m "not qemu"`` deselects these too).

Counters: testpmd's ``show port stats 0`` TX-packets counts what virtio-user put on the TX ring
(drivers/net/virtio/virtio_rxtx.c, ``virtio_xmit_pkts``); vhostmem's ``tx_packets`` what it
took off the ring and wrote to the TAP; the TAP's ``rx`` what the kernel got from vhostmem. The
other way: the TAP's ``tx`` counts what vhostmem read (drivers/net/tun.c, ``tun_put_user``),
vhostmem's ``rx_packets`` what it put on the RX ring, testpmd's RX-packets what rxonly took.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostmem.ctl import ctl_main
from vhostmem.testing.backend import RunningBackend
from vhostmem.testing.testpmd import (
    Memory,
    Testpmd,
    TestpmdConfig,
    TestpmdMissing,
    find_testpmd,
    runtime_dir,
    virtio_user_vdev,
)

from ..hugetlbfs import hugetlbfs_mount
from ..netns import fresh_tap_and_netns, ip
from .conftest import MiB, hugepages

pytestmark = pytest.mark.dpdk

Factory = Callable[..., RunningBackend]
NS = f"vhmd{os.getpid() % 100000}"
TAP = f"vhmd{os.getpid() % 100000}"
TAP_ADDRESS = "192.0.2.1/24"  # RFC 5737; the namespace has no route out
#: MiB of hugetlb memory testpmd preallocates (``-m``): its region's size.
HUGE_MB = 64
#: Seconds each traffic window lasts: it must carry more than the 1000 frames
#: txonly_window asserts (tools/bench --datapath measures the rates).
WINDOW = 1.5


@pytest.fixture(scope="session")
def testpmd_ready() -> None:
    try:
        find_testpmd()
    except TestpmdMissing as err:
        pytest.fail(str(err))


@pytest.fixture
def pmds(testpmd_ready: None, tmp_path: Path) -> Iterator[Callable[..., Testpmd]]:
    """``start(vdev, memory=Memory.MEMFD, **config) -> Testpmd``, started; all stopped (by
    pid) at teardown, and none may leave its runtime directory behind."""
    started: list[Testpmd] = []

    def start(vdev: str, memory: Memory = Memory.MEMFD, **config: Any) -> Testpmd:
        config.setdefault("lifetime", 40.0)
        config.setdefault("memory_mb", 1024 if memory is Memory.MEMFD else HUGE_MB)
        pmd = Testpmd(TestpmdConfig(vdev=vdev, memory=memory, workdir=tmp_path, **config))
        started.append(pmd)
        return pmd.start()

    yield start
    for pmd in started:
        pmd.stop()
        assert not runtime_dir(pmd.config.prefix).exists()


@pytest.fixture
def huge_dir(tmp_path: Path) -> Iterator[Path]:
    """A hugetlbfs of the test's own with pages for one testpmd. Request it before ``pmds``:
    fixtures end in reverse, so testpmd has exited (and its files are gone) before the
    unmount."""
    with hugetlbfs_mount(tmp_path / "huge") as huge, hugepages(HUGE_MB // 2 + 8):
        yield huge


@pytest.fixture
def net() -> Iterator[tuple[str, ...]]:
    """vhostmem arguments for a TAP in a namespace of this test's own."""
    with fresh_tap_and_netns(NS, TAP):
        yield ("--tap", TAP, "--netns", NS, "--tap-address", TAP_ADDRESS)


# ---- what each side counts --------------------------------------------------------------


def tap_counters() -> dict[str, int]:
    """The TAP's own counters (``ip -s``, the kernel's rtnl_link_stats64)."""
    [link] = json.loads(ip("-n", NS, "-j", "-s", "link", "show", "dev", TAP))
    stats = link["stats64"]
    return {f"{way}_{what}": stats[way][what] for way in ("rx", "tx") for what in stats[way]}


def datapath(backend: RunningBackend) -> dict[str, Any]:
    """The one connection's data-path counters (``stats`` ``datapath``)."""
    dps = backend.stats()["datapath"]
    assert len(dps) == 1, dps
    dp: dict[str, Any] = dps[0]
    return dp


def wait_equal(what: str, read: Callable[[], tuple[int, int]], timeout: float = 10.0) -> int:
    """Wait until both numbers of ``read()`` are equal (a ring drains, a poll loop catches
    up); fail with both after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        a, b = read()
        if a == b:
            return a
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: {a} != {b} after {timeout:g} s")
        time.sleep(0.05)


def txonly_window(pmd: Testpmd, backend: RunningBackend, seconds: float = WINDOW) -> int:
    """testpmd's txonly for ``seconds``; then vhostmem's, the TAP's and testpmd's counters of
    that window must be equal, packets and bytes. Returns the packets."""
    pmd.command("set fwd txonly")
    pmd_before = pmd.port_stats()
    dp_before, tap_before = datapath(backend), tap_counters()
    pmd.start_forwarding()
    time.sleep(seconds)  # a traffic window of fixed length, not a wait for an event
    pmd.stop_forwarding()
    pmd_after = pmd.port_stats()
    sent = pmd_after.tx_packets - pmd_before.tx_packets
    # What testpmd put on the ring is on it until vhostmem has taken it: a bounded wait.
    wait_equal(
        "vhostmem's tx_packets against testpmd's TX-packets",
        lambda: (datapath(backend)["tx_packets"] - dp_before["tx_packets"], sent),
    )
    dp, tap = datapath(backend), tap_counters()
    counted = {
        "testpmd TX-packets": sent,
        "vhostmem tx_packets": dp["tx_packets"] - dp_before["tx_packets"],
        "TAP rx packets": tap["rx_packets"] - tap_before["rx_packets"],
    }
    assert len(set(counted.values())) == 1, counted
    bytes_ = {
        "testpmd TX-bytes": pmd_after.tx_bytes - pmd_before.tx_bytes,
        "vhostmem tx_bytes": dp["tx_bytes"] - dp_before["tx_bytes"],
        "TAP rx bytes": tap["rx_bytes"] - tap_before["rx_bytes"],
    }
    assert len(set(bytes_.values())) == 1, bytes_
    assert dp["tx_dropped"] == dp["tx_errors"] == 0, dp
    assert pmd_after.tx_errors == 0
    assert sent > 1000, f"only {sent} packets in {seconds} s"
    print(f"txonly: {sent} packets in {seconds} s: {sent / seconds:.0f} packets/s")
    return sent


#: Sends COUNT Ethernet frames (broadcast, IEEE 802 local experimental ethertype 0x88B5) on
#: the TAP from inside the namespace, about RATE a second, and prints how many it sent.
SENDER = """
import socket, sys, time
tap, count, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((tap, 0))
frame = b"\\xff" * 6 + b"\\x02\\x00\\x00\\x00\\x00\\x01" + b"\\x88\\xb5" + bytes(range(46))
start, sent = time.monotonic(), 0
while sent < count:
    s.send(frame)
    sent += 1
    if sent % 64 == 0:
        ahead = start + sent / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
print(sent)
"""


def send_into_tap(count: int, rate: float) -> int:
    res = subprocess.run(
        ["ip", "netns", "exec", NS, sys.executable, "-c", SENDER, TAP, str(count), str(rate)],
        capture_output=True,
        text=True,
        timeout=30 + count / rate,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return int(res.stdout)


def rxonly_window(pmd: Testpmd, backend: RunningBackend, count: int, rate: float) -> int:
    """Frames sent into the TAP reach testpmd's rxonly: the TAP's, vhostmem's and testpmd's
    counters agree, and all equal what was sent."""
    # The kernel's own frames (IPv6 router and multicast listener messages) would be counted
    # too, at any moment: none on this TAP.
    ip("netns", "exec", NS, "sysctl", "-qw", f"net.ipv6.conf.{TAP}.disable_ipv6=1")
    pmd.command("set fwd rxonly")
    pmd.start_forwarding()
    pmd_before = pmd.port_stats()
    dp_before, tap_before = datapath(backend), tap_counters()
    started = time.monotonic()
    sent = send_into_tap(count, rate)
    wait_equal(
        "testpmd's RX-packets against vhostmem's rx_packets",
        lambda: (
            pmd.port_stats().rx_packets - pmd_before.rx_packets,
            datapath(backend)["rx_packets"] - dp_before["rx_packets"],
        ),
    )
    took = time.monotonic() - started
    pmd.stop_forwarding()
    pmd_after, dp, tap = pmd.port_stats(), datapath(backend), tap_counters()
    counted = {
        "sent": sent,
        "TAP tx packets": tap["tx_packets"] - tap_before["tx_packets"],
        "vhostmem rx_packets": dp["rx_packets"] - dp_before["rx_packets"],
        "testpmd RX-packets": pmd_after.rx_packets - pmd_before.rx_packets,
    }
    assert len(set(counted.values())) == 1, (counted, tap, dp)
    assert tap["tx_dropped"] == tap_before["tx_dropped"], (tap_before, tap)
    assert pmd_after.rx_bytes - pmd_before.rx_bytes == sent * 60
    assert dp["rx_bytes"] - dp_before["rx_bytes"] == sent * 60
    assert dp["rx_dropped"] == dp["rx_errors"] == 0, dp
    print(f"rxonly: {sent} frames in {took:.2f} s: {sent / took:.0f} frames/s")
    return sent


# ---- the vhostmem process: fds, maps, events -------------------------------------------


def baseline(backend: RunningBackend) -> tuple[dict[int, str], list[str]]:
    """The vhostmem process's fds and shared maps once it serves (it binds its sockets
    first and sets up the rest after, so: once it has answered on its control socket and
    closed that connection, which it does after answering)."""
    backend.stats()
    settled: list[dict[int, str]] = []

    def still() -> bool:
        settled.append(proc_fds(backend.pid))
        return len(settled) >= 3 and settled[-1] == settled[-2] == settled[-3]

    backend.wait_for(still, 5, "vhostmem's fds to settle")
    return settled[-1], proc_shared_maps(backend.pid)


def wait_fds(backend: RunningBackend, fds: dict[int, str]) -> None:
    """Wait until vhostmem holds exactly ``fds`` again (a control connection closes after its
    answer, a vhost-user connection after the front-end's end is seen)."""
    try:
        backend.wait_for(lambda: proc_fds(backend.pid) == fds, 5, "vhostmem's fds")
    except TimeoutError:
        now = proc_fds(backend.pid)
        pytest.fail(
            f"vhostmem pid {backend.pid} holds fds it did not hold before: "
            f"{ {fd: what for fd, what in now.items() if fds.get(fd) != what} }; "
            f"gone: { {fd: what for fd, what in fds.items() if now.get(fd) != what} }"
        )


def proc_fds(pid: int) -> dict[int, str]:
    """fd -> what it is, of process ``pid``."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:  # closed while listing
            continue
    return out


def proc_shared_maps(pid: int) -> list[str]:
    """Shared mappings of process ``pid`` (DPDK's memory is mapped shared); thread stacks and
    heap arenas come and go, these must not."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return [line for line in lines if line.split()[1][3] == "s"]


def events(backend: RunningBackend, kind: str) -> list[dict[str, Any]]:
    return [e for e in backend.log_lines() if e.get("event") == kind]


def wait_released(backend: RunningBackend) -> None:
    backend.wait_for(
        lambda: (s := backend.stats())["connections_live"] == 0 and s["regions"] == 0,
        10,
        "vhostmem to release the connection",
    )


def check(backend: RunningBackend, capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    """``vhostmem-ctl check --json``: its exit status and document."""
    capsys.readouterr()
    code = ctl_main(["--control", backend.control, "check", "--json"])
    return code, json.loads(capsys.readouterr().out)


# ---- tests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "backing", "page_size"),
    [
        (Memory.HUGETLBFS, "hugetlbfs", 2 * MiB),
        (Memory.HUGETLB_MEMFD, "memfd-hugetlb", 2 * MiB),
        (Memory.MEMFD, "memfd", 4096),
    ],
)
def test_memory_variants_map_as_the_regions_they_are(
    huge_dir: Path,
    vhostmem_factory: Factory,
    pmds: Callable[..., Testpmd],
    capsys: pytest.CaptureFixture[str],
    memory: Memory,
    backing: str,
    page_size: int,
) -> None:
    backend = vhostmem_factory(name="vu.sock", qemu_trace=False)
    fds, maps = baseline(backend)
    pmd = pmds(virtio_user_vdev(backend.socket), memory, huge_dir=huge_dir)
    pmd.wait_ready(30)
    # DPDK sends its memory with SET_MEM_TABLE once the port starts (virtio_user_dev.c,
    # virtio_user_start_device): one region per memseg list; with single-file segments
    # or without huge pages, its whole preallocated size (-m) in one file.
    [region] = backend.wait_for(backend.regions, 10, "DPDK's memory table")
    size = pmd.config.memory_mb * MiB
    assert (region["backing"], region["page_size"], region["size"]) == (
        backing,
        page_size,
        size,
    ), region
    assert region["peer_pid"] == pmd.pid and region["mmap_offset"] == 0
    assert region["map_length"] == size and region["fd_offset"] == 0
    # virtio-user gives each region's own virtual address as its guest physical address
    # (virtio_user/vhost_user.c, vhost_user_set_memory_table -> update_memory_region).
    assert region["gpa"] == region["uaddr"]
    if memory is Memory.HUGETLBFS:
        assert region["file"] == f"{huge_dir}/{pmd.config.prefix}map_0"
    else:
        assert region["file"].startswith("/memfd:"), region
    [table] = backend.memory_events()
    assert (table["request"], table["result"], table["violations"]) == (
        "SET_MEM_TABLE",
        "ok",
        [],
    )
    status, doc = check(backend, capsys)
    assert status == 0 and doc["clean"] is True and doc["violations"] == [], doc
    assert doc["counts"]["requests"] == 1 and doc["counts"]["failed"] == 0
    stats = backend.stats()
    # stdlib mmap keeps a dup of the fd; a hugetlb fd is kept too (peek reads through it).
    fds_held = 1 if memory is Memory.MEMFD else 2
    assert (stats["maps"], stats["mapping_fds"]) == (1, fds_held), stats
    assert pmd.stop() == 0
    # testpmd's exit releases the region: nothing of it stays in vhostmem.
    wait_released(backend)
    wait_fds(backend, fds)
    assert proc_shared_maps(backend.pid) == maps
    assert not events(backend, "request-failed")


def test_traffic_both_ways_counters_agree(
    vhostmem_factory: Factory, pmds: Callable[..., Testpmd], net: tuple[str, ...]
) -> None:
    backend = vhostmem_factory(net, qemu_trace=False)
    pmd = pmds(virtio_user_vdev(backend.socket))
    pmd.wait_ready(30)
    txonly_window(pmd, backend)
    # Well below the rate vhostmem moves frames from the TAP at: the TAP's queue (txqueuelen
    # 1000) never overflows, and every frame sent must arrive.
    rxonly_window(pmd, backend, count=6000, rate=10000)
    assert not events(backend, "request-failed")
    assert not events(backend, "ring-error")


def test_kill_9_mid_traffic_releases_everything(
    vhostmem_factory: Factory, pmds: Callable[..., Testpmd], net: tuple[str, ...]
) -> None:
    backend = vhostmem_factory(net, qemu_trace=False)
    fds, maps = baseline(backend)
    pmd = pmds(virtio_user_vdev(backend.socket))
    pmd.wait_ready(30)
    pmd.start_forwarding()
    backend.wait_for(lambda: datapath(backend)["tx_packets"] > 1000, 10, "traffic")
    held = backend.stats()
    assert held["maps"] == 1 and held["connections_live"] == 1
    assert len(proc_fds(backend.pid)) > len(fds)  # the region's fd, kick and call eventfds
    assert pmd.kill() == -9
    wait_released(backend)
    stats = backend.stats()
    assert (stats["maps"], stats["mapping_fds"], stats["mapped_bytes"]) == (0, 0, 0)
    # The process itself, not only what vhostmem counts: every fd and shared map is gone.
    wait_fds(backend, fds)
    assert proc_shared_maps(backend.pid) == maps
    [gone] = events(backend, "disconnect")
    assert gone["released"] == 1 and gone["unmap_failed"] == []
    # The next testpmd gets a working device.
    pmd = pmds(virtio_user_vdev(backend.socket))
    pmd.wait_ready(30)
    txonly_window(pmd, backend, 1.0)
    assert pmd.stop() == 0
    wait_released(backend)
    wait_fds(backend, fds)
    assert proc_shared_maps(backend.pid) == maps


def test_two_queue_pairs_against_one_refused_cleanly(
    vhostmem_factory: Factory, pmds: Callable[..., Testpmd], net: tuple[str, ...]
) -> None:
    backend = vhostmem_factory(("--queues", "1", *net), qemu_trace=False)
    pmd = pmds(virtio_user_vdev(backend.socket, queues=2))
    pmd.wait_ready(30)
    # DPDK 22.11's virtio-user sets up every vring of the queue pairs its devargs ask for
    # (virtio_user_dev.c, virtio_user_dev_init: max_queue_pairs = queues; queues=2 is vrings
    # 0-3), whatever the back-end has; vhostmem refuses each request on vrings 2 and 3 and
    # keeps the connection.
    # Those requests need no reply, so testpmd's prompt may come before vhostmem has booked
    # the last of them: wait until every one is there.
    wanted = {"SET_VRING_NUM", "SET_VRING_ADDR", "SET_VRING_KICK"}

    def refused_per_vring() -> dict[int, set[str]]:
        per_vring: dict[int, set[str]] = {}
        for e in events(backend, "request-failed"):
            m = re.fullmatch(
                rf"{e['name']}: vring index (\d+) is out of range: the device has 2 vrings "
                r"\(--queues 1\)",
                e["error"],
            )
            assert m, e
            per_vring.setdefault(int(m.group(1)), set()).add(e["name"])
        return per_vring

    backend.wait_for(
        lambda: all(wanted <= refused_per_vring().get(v, set()) for v in (2, 3)),
        10,
        f"refusals of {sorted(wanted)} on vrings 2 and 3",
    )
    assert set(refused_per_vring()) == {2, 3}, refused_per_vring()
    # The pair vhostmem has works: traffic on queue 0, counters equal.
    txonly_window(pmd, backend, 1.0)
    assert not events(backend, "disconnect")
    assert backend.stats()["connections_live"] == 1
    assert len(events(backend, "connect")) == 1
    # DPDK asks for no reply to those requests (no NACK while it runs); only when it stops
    # the device does it read one, GET_VRING_BASE of vring 2, and gives up on stopping it
    # (virtio_user_dev.c, virtio_user_stop_device) before it closes the connection.
    running = pmd.output()
    assert "NACK" not in running and "fail" not in running.lower(), running
    assert pmd.stop() == 0
    failed = [line for line in pmd.output().splitlines() if "fail" in line.lower()]
    assert failed and all(re.search("get_vring_base|stop device", f) for f in failed), failed
    assert any(f.endswith("get_vring_base failed, index=2") for f in failed), failed
    [gone] = events(backend, "disconnect")
    assert gone["reason"] == "front-end closed the connection"


def test_server_mode_survives_a_vhostmem_restart(
    vhostmem_factory: Factory, pmds: Callable[..., Testpmd], net: tuple[str, ...], tmp_path: Path
) -> None:
    # testpmd listens (server=1) and waits for a back-end before its port starts
    # (virtio_user/vhost_user.c, vhost_user_start_server); vhostmem connects to it.
    sock = str(tmp_path / "dpdk.sock")
    pmd = pmds(virtio_user_vdev(sock, server=True))
    pmd.wait_output("waiting for client connection", 30)
    first = vhostmem_factory(net, name="first", qemu_trace=False, connect=sock)
    pmd.wait_ready(30)
    txonly_window(pmd, first, 1.0)
    assert first.stop() == 0
    # DPDK notices the back-end gone and listens again (virtio_user_ethdev.c,
    # virtio_user_dev_server_reconnect on the next link-status check); a new vhostmem on the
    # same path gets the device back: DPDK sends the device state it kept, without SET_OWNER.
    mark = pmd.mark()
    second = vhostmem_factory(net, name="second", qemu_trace=False, connect=sock)
    pmd.wait_output("reconnection succeeds", 15, since=mark)
    try:
        second.wait_for(second.regions, 10, "DPDK's memory table on the new connection")
    except TimeoutError:
        refused = [f"{e['name']}: {e['error']}" for e in events(second, "request-failed")]
        pytest.fail(
            "DPDK reconnected but its memory table was never mapped; vhostmem refused "
            f"{len(refused)} request(s):\n" + "\n".join(refused)
        )
    txonly_window(pmd, second, 1.0)
    # Served, and said: the requests before SET_OWNER, and the rings' base 0 behind their
    # used indexes (DPDK kept them running), each a protocol-deviation.
    kinds = {e["deviation"] for e in events(second, "protocol-deviation")}
    assert kinds == {"request-before-owner", "vring-base-mismatch"}, kinds
    assert not events(second, "request-failed") and not events(second, "ring-error")
    assert pmd.stop() == 0
    wait_released(second)


def test_harness_removes_its_directory_only_after_a_run_that_ended_as_asked(
    testpmd_ready: None,
) -> None:
    # DPDK's null PMD (net_null0): a port with nothing behind it, so testpmd runs on its own.
    for end in (Testpmd.stop, Testpmd.kill):
        pmd = Testpmd(TestpmdConfig(vdev="net_null0", lifetime=20.0)).start()
        pmd.wait_ready(20)
        assert pmd.log_path.is_file()
        end(pmd)
        assert not pmd.workdir.exists(), end
        assert not runtime_dir(pmd.config.prefix).exists()
    # The watchdog had to stop it: the directory and its output log stay for the reader.
    pmd = Testpmd(TestpmdConfig(vdev="net_null0", lifetime=2.0)).start()
    pmd.wait_ready(20)
    pmd.wait_exit(20)
    try:
        assert pmd.expired and pmd.log_path.is_file()
        assert not runtime_dir(pmd.config.prefix).exists()
    finally:
        shutil.rmtree(pmd.workdir, ignore_errors=True)
