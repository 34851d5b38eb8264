"""vhostmem.testing.testpmd without DPDK: its command line, its parser and its failures.

The real runs are in tests/integration/test_dpdk.py; these pin what the harness builds and
reads (a ``show port stats`` block as DPDK 22.11's testpmd prints it).
"""

from __future__ import annotations

from typing import Any

import pytest

from vhostmem.testing.testpmd import (
    Memory,
    PortStats,
    Testpmd,
    TestpmdConfig,
    TestpmdError,
    TestpmdMissing,
    find_testpmd,
    virtio_user_vdev,
)

# app/test-pmd/config.c, nic_stats_display, as dpdk-testpmd 22.11 printed it here.
STATS = """
  ######################## NIC statistics for port 0  ########################
  RX-packets: 17         RX-missed: 1          RX-bytes:  1088
  RX-errors: 2
  RX-nombuf:  3@PAD@
  TX-packets: 256        TX-errors: 4          TX-bytes:  16384

  Throughput (since last show)
  Rx-pps:            5          Rx-bps:            0
  Tx-pps:        61234          Tx-bps:     31351808
  ############################################################################
""".replace("@PAD@", " " * 9)  # testpmd pads this line


def test_port_stats_parse_every_counter() -> None:
    assert PortStats.parse(STATS) == PortStats(
        rx_packets=17,
        rx_missed=1,
        rx_bytes=1088,
        rx_errors=2,
        rx_nombuf=3,
        tx_packets=256,
        tx_errors=4,
        tx_bytes=16384,
        rx_pps=5,
        tx_pps=61234,
    )
    with pytest.raises(TestpmdError, match="no TX-bytes"):
        PortStats.parse(STATS.replace("TX-bytes", "TX-whatever"))


def test_vdev_and_command_line_per_memory_variant() -> None:
    assert virtio_user_vdev("/s", queues=2, server=True) == (
        "net_virtio_user0,path=/s,queues=2,server=1"
    )
    base: dict[str, Any] = dict(vdev="net_virtio_user0,path=/s,queues=1", cpus=(1,), prefix="p1")
    argv = TestpmdConfig(memory=Memory.MEMFD, **base).argv("T")
    assert argv == [
        "T", "--lcores", "0@1,1@1", "--no-pci", "--no-huge", "-m", "1024",
        "--file-prefix", "p1", "--vdev", "net_virtio_user0,path=/s,queues=1",
        "--", "-i", "--forward-mode=txonly", "--nb-cores=1", "--total-num-mbufs=8192",
    ]  # fmt: skip
    memfd = TestpmdConfig(memory=Memory.HUGETLB_MEMFD, memory_mb=64, **base)
    assert memfd.memory_args() == ["--in-memory", "--single-file-segments", "-m", "64"]
    fs = TestpmdConfig(memory=Memory.HUGETLBFS, huge_dir="/h", memory_mb=64, **base)
    assert fs.memory_args() == ["--single-file-segments", "--huge-dir", "/h", "-m", "64"]
    with pytest.raises(TestpmdError, match="needs huge_dir"):
        TestpmdConfig(memory=Memory.HUGETLBFS, **base).memory_args()
    two = TestpmdConfig(vdev="v", cpus=(0, 1), prefix="p2").argv("T")
    assert two[1:3] == ["--lcores", "0@0,1@1"] and "--nb-cores=1" in two
    # Each config its own prefix by default: two testpmds never share a runtime directory.
    assert TestpmdConfig(vdev="v").prefix != TestpmdConfig(vdev="v").prefix


def test_missing_testpmd_names_setup_host() -> None:
    with pytest.raises(TestpmdMissing, match=r"tools/setup-host.*dpdk-dev"):
        find_testpmd("dpdk-testpmd-not-installed")
    pmd = Testpmd(TestpmdConfig(vdev="v", binary="dpdk-testpmd-not-installed"))
    with pytest.raises(TestpmdMissing, match="dpdk-testpmd-not-installed is not on PATH"):
        pmd.start()
    assert pmd.stop() is None  # never started: nothing to stop
