"""Traffic through vhostmem: a real QEMU guest and a network namespace that vhostmem's TAP is in.

Both ends use documentation addresses (RFC 5737): the guest's /init puts 192.0.2.2/24 on eth0,
vhostmem puts 192.0.2.1/24 on its TAP inside a namespace of its own, which has no default route.
Nothing is routed anywhere else. Ping goes both ways (busybox ping on both sides), before and
after virtio-mem plug and unplug cycles; the data path's counters show which regions carried it.

Root, /dev/net/tun and busybox are prerequisites: missing, the test fails (never skips).
Whatever a failing run left behind is removed by name (our namespace, our link).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace

from vhostmem.timeline import build_trace, replay

from ..netns import fresh_tap_and_netns, ip, netns_exists
from .conftest import GiB, MakeRig, Rig

NS = f"vhmq{os.getpid() % 100000}"
TAP = f"vhmq{os.getpid() % 100000}"
HOST_ADDR = "192.0.2.1"
GUEST_ADDR = "192.0.2.2"


@pytest.fixture
def net_names() -> Iterator[None]:
    with fresh_tap_and_netns(NS, TAP):
        yield


def received(output: str) -> int:
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", output)
    assert m, output
    return int(m.group(2))


def ping_from_guest(rig: Rig, count: int = 3) -> str:
    out = rig.guest.run_in_guest(f"ping -c {count} -W 1 {HOST_ADDR}", timeout=30 + 2 * count)
    assert received(out) >= count - 1, out
    return out


def ping_from_namespace(count: int = 3, ns: str = NS) -> str:
    """Ping the guest from a namespace (the TAP's side); most of ``count`` must come back."""
    res = subprocess.run(
        ["ip", "netns", "exec", ns, "busybox", "ping", "-c", str(count), "-W", "1", GUEST_ADDR],
        capture_output=True,
        text=True,
        timeout=30 + 2 * count,
        check=False,
    )
    assert received(res.stdout) >= count - 1, res.stdout + res.stderr
    return res.stdout


def packet_rates(data: bytes) -> dict[str, list[float]]:
    """The values of the trace's ``packets/s`` counters, by track name."""
    trace = Trace()
    trace.ParseFromString(data)
    names = {p.track_descriptor.uuid: p.track_descriptor.name for p in trace.packet}
    rates: dict[str, list[float]] = {}
    for p in trace.packet:
        event = p.track_event
        if p.HasField("track_event") and names[event.track_uuid].endswith(" packets/s"):
            rates.setdefault(names[event.track_uuid], []).append(event.double_counter_value)
    return rates


def datapath(rig: Rig) -> dict[str, Any]:
    dp: dict[str, Any]
    [dp] = rig.backend.stats()["datapath"]
    return dp


def test_ping_both_ways_through_vhostmem_across_plug_cycles(
    make_rig: MakeRig, net_names: None
) -> None:
    rig = make_rig(vhostmem_args=("--tap", TAP, "--netns", NS, "--tap-address", f"{HOST_ADDR}/24"))
    # the namespace: our TAP with its address, up, and no way out
    out = ip("-n", NS, "addr", "show", "dev", TAP)
    assert f"{HOST_ADDR}/24" in out and ",UP" in out
    assert ip("-n", NS, "route", "show", "default") == ""
    assert TAP not in ip("link", "show")
    tap = rig.backend.stats()["tap"]
    assert tap["tap"] == TAP and tap["netns"] == NS and tap["created_netns"] is True

    ping_from_guest(rig)
    ping_from_namespace()
    dp = datapath(rig)
    assert dp["mrg_rxbuf"] and dp["event_idx"]
    assert dp["tx_packets"] >= 3 and dp["rx_packets"] >= 3
    assert all(ring["running"] and ring["error"] is None for ring in dp["rings"])
    boot = [r for r in dp["regions"] if r["gpa"] == 0]
    assert boot and boot[0]["translations"] > 0  # the rings live in boot RAM

    # virtio-mem plug/unplug cycles while the rings run: traffic still flows after each
    for size in (GiB, 3 * GiB, GiB, 0, 2 * GiB, 0):
        rig.guest.plug(size, 60)
        rig.wait_table_matches_qemu()
        ping_from_namespace(2)
        ping_from_guest(rig, 2)
    dp = datapath(rig)
    assert dp["ring_errors"] == 0 and dp["rx_dropped"] == 0
    translated = {r["gpa"] for r in dp["regions"] if r["translations"]}
    assert 0 in translated
    # boot RAM stayed in the table throughout, so its counter kept counting (a region's
    # counter is dropped only when the region is removed)
    [boot_after] = [r for r in dp["regions"] if r["gpa"] == 0]
    assert boot_after["translations"] > boot[0]["translations"], (boot, boot_after)
    events = rig.backend.log_lines()
    assert not [e for e in events if e.get("event") == "ring-error"], events
    assert rig.backend.violations() == []

    # everything vhostmem created goes away with it
    rig.guest.close()
    assert rig.backend.stop() == 0, rig.backend.stderr()[-2000:]
    assert not netns_exists(NS)
    assert TAP not in ip("link", "show")

    # the running totals went to the event log (the last line when the connection ended),
    # and the timeline turns them into packets per second each way
    lines = rig.backend.log_lines()
    stats = [e for e in lines if e.get("event") == "datapath-stats"]
    assert stats and stats[-1]["tap"] == TAP, lines
    assert (
        stats[-1]["tx_packets"] >= dp["tx_packets"] and stats[-1]["rx_packets"] >= dp["rx_packets"]
    )
    rates = packet_rates(build_trace(replay(lines)))
    assert sorted(rates) == [
        f"{rig.backend.socket} conn 1 rx packets/s",
        f"{rig.backend.socket} conn 1 tx packets/s",
    ]
    assert all(max(values) > 0 for values in rates.values()), rates
