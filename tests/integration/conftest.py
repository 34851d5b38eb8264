"""Fixtures for tests against a real QEMU 10 with a Linux guest.

Every test here is marked ``qemu``. A missing prerequisite FAILS (never skips) with the command
that installs it; a person without QEMU deselects these tests explicitly with ``-m "not qemu"``.
Each guest is started and stopped by pid by the fixture that made it; vhostmem processes too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vhostmem.testing.backend import RunningBackend
from vhostmem.testing.qemu import Guest, GuestConfig, PrerequisiteError, find_qemu

GiB = 1 << 30
MiB = 1 << 20
BOOT_RAM = 512 * MiB
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.qemu)


@pytest.fixture(scope="session")
def qemu_ready() -> None:
    """QEMU >= 8.2 and the guest image exist, or the test fails saying how to get them."""
    try:
        _, version = find_qemu()
    except PrerequisiteError as err:
        pytest.fail(f"{err}\nrun tools/setup-host (the README's test command does)")
    if version < (8, 2, 0):
        pytest.fail(f"QEMU {version} is older than 8.2 (no dynamic-memslots): run tools/setup-host")


@contextlib.contextmanager
def hugepages(pages: int) -> Iterator[None]:
    """Make sure ``pages`` free 2 MiB huge pages exist; give back what we added afterwards."""
    with open(NR_HUGEPAGES) as f:
        before = int(f.read())
    with open("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages") as f:
        free = int(f.read())
    wanted = before + max(0, pages - free)
    if wanted != before:
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(wanted))
        with open(NR_HUGEPAGES) as f:
            got = int(f.read())
        if got < wanted:
            with open(NR_HUGEPAGES, "w") as f:
                f.write(str(before))
            pytest.fail(
                f"could reserve only {got - before} of {wanted - before} more 2 MiB huge pages "
                f"(echo {wanted} > {NR_HUGEPAGES} as root; see hugepages/README.md)"
            )
    try:
        yield
    finally:
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(before))


def started_by_factory(factory: Callable[..., RunningBackend]) -> list[RunningBackend]:
    return list(getattr(factory, "started", []))


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


class Rig:
    """A vhostmem process and a guest on its socket, started and stopped together."""

    def __init__(self, backend: RunningBackend, guest: Guest) -> None:
        self.backend = backend
        self.guest = guest

    def memslot_regions(self) -> list[tuple[int, int, int]]:
        """(gpa, size, mmap_offset) of every region but boot RAM, by GPA."""
        return sorted(
            (r["gpa"], r["size"], r["mmap_offset"]) for r in self.backend.regions() if r["gpa"] != 0
        )

    def qemu_memslots(self) -> list[tuple[int, int, int]]:
        return [(s.gpa_start, s.size, s.offset) for s in self.guest.memslots()]

    def wait_table_matches_qemu(self, timeout: float = 15.0) -> list[tuple[int, int, int]]:
        want = self.qemu_memslots()
        wait_until(lambda: self.memslot_regions() == want, timeout,
                   f"vhostmem's table to equal QEMU's memslots {want}")
        return want


@pytest.fixture
def make_rig(
    qemu_ready: None, vhostmem_factory: Callable[..., RunningBackend]
) -> Iterator[Callable[..., Rig]]:
    """``make_rig(vhostmem_args=(), **guest_config) -> Rig`` with the guest booted and its boot
    RAM region in vhostmem's table; everything stopped at teardown (QEMU first). vhostmem is
    started through the pytest plugin's ``vhostmem_factory``, the fixture users get."""
    rigs: list[Rig] = []

    def make(vhostmem_args: tuple[str, ...] = (), backend: RunningBackend | None = None,
             wait_boot_ram: bool = True, **config: Any) -> Rig:
        if backend is None:
            backend = vhostmem_factory(vhostmem_args, name=f"vu{len(rigs)}.sock")
        guest = Guest(GuestConfig(vhost_socket=backend.socket, **config))
        rig = Rig(backend, guest)
        rigs.append(rig)
        guest.start()
        guest.wait_ready(60)
        if wait_boot_ram:
            backend.wait_for(
                lambda: any(r["gpa"] == 0 and r["size"] == BOOT_RAM for r in backend.regions()),
                30, "the boot RAM region")
        return rig

    yield make
    # QEMU first; vhostmem_factory then stops every vhostmem and fails on a non-zero exit.
    for rig in reversed(rigs):
        rig.guest.close()
        if rig.backend not in started_by_factory(vhostmem_factory):
            assert rig.backend.stop() == 0, rig.backend.stderr()[-2000:]
