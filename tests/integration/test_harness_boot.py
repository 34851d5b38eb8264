"""Self-test of the real-QEMU harness (vhostmem.testing.qemu), without any vhost-user device.

If this fails, every other real-QEMU test would too, for reasons that have nothing to do with
vhostmem: run it first when the integration suite goes red. It needs QEMU >= 8.2 and the guest
image; a missing prerequisite fails (never skips) with a message naming tools/setup-host.

Driven the way trio tests use the harness: every blocking call through trio.to_thread.run_sync,
so the QMP connection is also exercised from changing worker threads.
"""

from __future__ import annotations

import pytest
import trio

from vhostmem.testing.qemu import Guest, GuestConfig, MemslotAlias, memslot_aliases

pytestmark = pytest.mark.qemu

GiB = 1 << 30


async def test_guest_boots_plugs_unplugs_and_dies() -> None:
    with trio.fail_after(60):  # the whole scenario; each step below has its own bound too
        guest = Guest(GuestConfig(vhost_socket=None))
        await trio.to_thread.run_sync(guest.start)
        pid = guest.pid
        try:
            await trio.to_thread.run_sync(guest.wait_ready, 30.0)

            # The guest's /init set this before virtio_mem probed; without it plugged memory
            # stays offline and cannot be unplugged again.
            online = await trio.to_thread.run_sync(
                guest.run_in_guest, "cat /sys/devices/system/memory/auto_online_blocks", 10.0
            )
            assert online == "online_movable"

            base = (await trio.to_thread.run_sync(guest.virtio_mem))["memaddr"]

            await trio.to_thread.run_sync(guest.plug, GiB, 20.0)
            assert (await trio.to_thread.run_sync(guest.virtio_mem))["size"] == GiB
            # dynamic-memslots=on: 1 GiB plugged = exactly one memslot alias at the device base.
            mtree = await trio.to_thread.run_sync(guest.mtree)
            assert memslot_aliases(mtree) == [
                MemslotAlias(base, base + GiB, "memslot-0", "vmem0", 0)
            ]

            await trio.to_thread.run_sync(guest.plug, 3 * GiB, 20.0)
            slots = memslot_aliases(await trio.to_thread.run_sync(guest.mtree))
            assert [(s.name, s.gpa_start, s.size, s.offset) for s in slots] == [
                (f"memslot-{i}", base + i * GiB, GiB, i * GiB) for i in range(3)
            ]

            await trio.to_thread.run_sync(guest.plug, 0, 20.0)
            assert await trio.to_thread.run_sync(guest.memslots) == []

            # xp reads guest-physical memory. 0x100000 is where -kernel loaded the bzImage,
            # but the decompressed kernel runs elsewhere and that RAM is reused (it reads as
            # zeros here), so only the length is checked there; the BIOS at the top of the
            # first MiB is always there and never zero.
            assert len(await trio.to_thread.run_sync(guest.xp, 0x100000, 16)) == 16
            bios = await trio.to_thread.run_sync(guest.xp, 0xFFFF0, 16)
            assert len(bios) == 16 and any(bios)
        finally:
            status = await trio.to_thread.run_sync(guest.kill_hard)
            await trio.to_thread.run_sync(guest.close)
        assert status == -9
        assert not await trio.Path(f"/proc/{pid}").exists(), f"QEMU pid {pid} still exists"
