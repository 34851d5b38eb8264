"""Fixtures for tests against a real QEMU 10 with a Linux guest.

Every test here is marked ``qemu``. A missing prerequisite FAILS (never skips) with the command
that installs it; a person without QEMU deselects these tests explicitly with ``-m "not qemu"``.
Each guest is started and stopped by pid by the fixture that made it; vhostmem processes too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostmem.testing.backend import RunningBackend
from vhostmem.testing.guest import GuestImageError, find_image
from vhostmem.testing.qemu import Guest, GuestConfig, PrerequisiteError, find_qemu

HERE = Path(__file__).resolve().parent

GiB = 1 << 30
MiB = 1 << 20
BOOT_RAM = 512 * MiB
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The hook sees every item of the session, not only ours: mark the tests under this
    # directory (whatever the checkout's own path contains).
    for item in items:
        if item.path.resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.qemu)


def require_root(doing: str, how: str) -> None:
    """Fail (never skip) with what needs root and how to do it by hand."""
    if os.geteuid() != 0:
        pytest.fail(
            f"{doing} needs root (euid {os.geteuid()}): run the integration tests as root, or {how}"
        )


@pytest.fixture(scope="session")
def qemu_ready() -> None:
    """QEMU >= 8.2 and the guest image exist, or the test fails saying how to get them."""
    try:
        find_qemu()  # raises for a QEMU older than 8.2 or without dynamic-memslots too
    except PrerequisiteError as err:
        pytest.fail(f"{err}\nrun tools/setup-host (the README's test command does)")
    try:
        find_image()
    except GuestImageError as err:
        pytest.fail(str(err))  # names the command that builds or rebuilds the image


@contextlib.contextmanager
def hugepages(pages: int) -> Iterator[None]:
    """Make sure ``pages`` free 2 MiB huge pages exist; give back what we added afterwards."""
    with open(NR_HUGEPAGES) as f:
        before = int(f.read())
    with open("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages") as f:
        free = int(f.read())
    wanted = before + max(0, pages - free)
    if wanted != before:
        require_root(
            f"reserving {wanted - before} more 2 MiB huge pages",
            f"echo {wanted} > {NR_HUGEPAGES} first (see hugepages/README.md)",
        )
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
        if wanted != before:  # nothing to give back otherwise (and no root needed)
            with open(NR_HUGEPAGES, "w") as f:
                f.write(str(before))


def started_by_factory(factory: Callable[..., RunningBackend]) -> list[RunningBackend]:
    return list(getattr(factory, "started", []))


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
        self.backend.wait_for(
            lambda: self.memslot_regions() == want,
            timeout,
            f"vhostmem's table to equal QEMU's memslots {want}",
        )
        return want


#: What the ``make_rig`` fixture gives a test: ``make_rig(vhostmem_args=(), **guest_config)``.
MakeRig = Callable[..., Rig]


@pytest.fixture
def make_rig(
    qemu_ready: None, vhostmem_factory: Callable[..., RunningBackend]
) -> Iterator[MakeRig]:
    """``make_rig(vhostmem_args=(), **guest_config) -> Rig`` with the guest booted and its boot
    RAM region in vhostmem's table; everything stopped at teardown (QEMU first). vhostmem is
    started through the pytest plugin's ``vhostmem_factory``, the fixture users get."""
    rigs: list[Rig] = []

    def make(
        vhostmem_args: tuple[str, ...] = (),
        backend: RunningBackend | None = None,
        wait_boot_ram: bool = True,
        qemu_trace: bool = True,
        **config: Any,
    ) -> Rig:
        if backend is None:
            backend = vhostmem_factory(
                vhostmem_args, name=f"vu{len(rigs)}.sock", qemu_trace=qemu_trace
            )
        # QEMU writes the trace the back-end follows (exact batches), unless turned off.
        config.setdefault("qemu_trace", backend.qemu_trace or False)
        guest = Guest(GuestConfig(vhost_socket=backend.socket, **config))
        rig = Rig(backend, guest)
        rigs.append(rig)
        guest.start()
        guest.wait_ready(60)
        if wait_boot_ram:
            backend.wait_for(
                lambda: any(r["gpa"] == 0 and r["size"] == BOOT_RAM for r in backend.regions()),
                30,
                "the boot RAM region",
            )
        return rig

    yield make
    # QEMU first; vhostmem_factory then stops every vhostmem and fails on a non-zero exit.
    for rig in reversed(rigs):
        rig.guest.close()
        if rig.backend not in started_by_factory(vhostmem_factory):
            assert rig.backend.stop() == 0, rig.backend.stderr()[-2000:]
