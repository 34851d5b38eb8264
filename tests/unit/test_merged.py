"""The merged view through the control socket: contiguous memslots of one memfd coalesce unless
an unmergeable marker (from --unmergeable or from QEMU over QMP) keeps them apart."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import trio

from vhostmem.control import answer
from vhostmem.qmp import QemuMemory, memslot_aliases, unmergeable_markers
from vhostmem.server import Backend, ServerConfig
from vhostmem.testing.frontend import FakeFrontend, make_memfd

GiB = 1 << 30
BASE = 0x240000000  # the seed commit's layout: memslot-0..2 of mem2
MTREE = """address-space: device-memory
  0000000000000000-ffffffffffffffff (prio 0, i/o): device-memory
    0000000240000000-000000043fffffff (prio 0, i/o): virtio-mem
      0000000240000000-000000027fffffff (prio 0, ram): alias memslot-0 @mem2 0000000000000000-000000003fffffff
      0000000280000000-00000002bfffffff (prio 0, ram): alias memslot-1 @mem2 0000000040000000-000000007fffffff
      00000002c0000000-00000002ffffffff (prio 0, ram): alias memslot-2 @mem2 0000000080000000-00000000bfffffff
"""  # noqa: E501  QEMU's `info mtree` lines as it prints them: the parser reads them whole


async def with_three_memslots(config: ServerConfig, query: dict[str, Any]) -> dict[str, Any]:
    backend = Backend(config)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ours, theirs = socket.socketpair()
            nursery.start_soon(backend.serve_connection, ours, "s")
            fe = FakeFrontend(theirs)
            await trio.to_thread.run_sync(fe.handshake)
            memfd = make_memfd(8 * GiB)
            for i in range(3):
                ack = await trio.to_thread.run_sync(
                    fe.add_region, BASE + i * GiB, GiB, 0x7F0000000000 + i * GiB, i * GiB, memfd
                )
                assert ack == 0
            os.close(memfd)
            reply = answer(backend, json.dumps({"cmd": "regions", "args": query}).encode())
            fe.close()
            nursery.cancel_scope.cancel()
    backend.cleanup()
    assert reply["ok"], reply
    result: dict[str, Any] = reply["result"]
    return result


async def test_without_markers_one_merged_region() -> None:
    doc = await with_three_memslots(ServerConfig(), {"merged": True})
    [merged] = doc["merged"]
    assert (merged["gpa"], merged["size"], len(merged["parts"])) == (BASE, 3 * GiB, 3)
    assert len(doc["regions"]) == 3  # each received region stays as received


async def test_markers_from_qmp_keep_memslots_apart() -> None:
    view = QemuMemory((), tuple(memslot_aliases(MTREE)), MTREE)
    markers = [[m.start, m.end, m.source] for m in unmergeable_markers(view)]
    doc = await with_three_memslots(ServerConfig(), {"merged": True, "markers": markers})
    assert [(m["gpa"], m["size"]) for m in doc["merged"]] == [
        (BASE + i * GiB, GiB) for i in range(3)
    ]
    assert doc["merged"][0]["boundary_after"] == "unmergeable: qmp:memslot-0@mem2"
    assert doc["merged"][2]["boundary_after"] is None


async def test_command_line_markers_and_no_merge() -> None:
    config = ServerConfig(unmergeable=((BASE + GiB, BASE + 2 * GiB),))
    doc = await with_three_memslots(config, {"merged": True})
    assert [m["size"] for m in doc["merged"]] == [GiB, GiB, GiB]
    assert "--unmergeable 0x280000000-0x2c0000000" in doc["merged"][0]["boundary_after"]
    doc = await with_three_memslots(ServerConfig(merge=False), {"merged": True})
    assert [m["boundary_after"] for m in doc["merged"]] == [
        "merging disabled",
        "merging disabled",
        None,
    ]
