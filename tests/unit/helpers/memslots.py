"""virtio-mem memslots as the history sees them: regions with numbers and a backing file,
never mapped (the atomicity and QEMU-trace tests build their requests from these)."""

from __future__ import annotations

from vhostmem.regions import Region

GiB = 1 << 30
#: The device's first memslot, its front-end address and its memfd (st_dev, st_ino).
BASE = 0x240000000
HOST = 0x7F0000000000
FILE = (0x2D, 4242)


def never_mapped(
    gpa: int, size: int, uaddr: int, mmap_offset: int, file_id: tuple[int, int] | None
) -> Region[None]:
    """A region as the history sees it: its numbers and backing file, never mapped."""
    return Region(gpa, size, uaddr, mmap_offset, handle=None, file_id=file_id)


def slot(i: int, *, slots: int = 1) -> Region[None]:
    """Memslot ``i`` (or ``slots`` memslots from ``i`` merged into one region)."""
    return never_mapped(
        gpa=BASE + i * GiB,
        size=slots * GiB,
        uaddr=HOST + i * GiB,
        mmap_offset=i * GiB,
        file_id=FILE,
    )
