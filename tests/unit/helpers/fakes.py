"""The sans-IO session's shell, faked: fds are numbers, mappings are records."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vhostmem.errors import MappingError
from vhostmem.protocol import MemoryRegion


@dataclass
class FakeHost:
    """Records what the session asks of its shell; maps nothing.

    fds are plain numbers handed out by ``new_fd``; the host tracks which are open.
    """

    open: set[int] = field(default_factory=set)
    mapped: dict[int, MemoryRegion] = field(default_factory=dict)
    file_ids: dict[int, tuple[int, int]] = field(default_factory=dict)
    fail_map: set[int] = field(default_factory=set)  # fail the n-th map call (1-based)
    # unmaps of the mapping at this gpa fail with this reason (munmap refused) until removed
    fail_unmap: dict[int, str] = field(default_factory=dict)
    unmaps_tried: list[int] = field(default_factory=list)  # gpa of every unmap attempted
    maps_done: int = 0
    _numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1000))
    _handles: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def new_fd(self, file_id: tuple[int, int] | None = None) -> int:
        fd = next(self._numbers)
        self.open.add(fd)
        if file_id is not None:
            self.file_ids[fd] = file_id
        return fd

    def map_region(
        self, request: str, region: MemoryRegion, fd: int, fail_errno: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        assert fd in self.open, f"map of fd {fd} that is not open"
        self.open.discard(fd)  # consumed on success and failure
        self.maps_done += 1
        if fail_errno is not None:
            raise MappingError(
                f"{request}: mmap failed errno {fail_errno}",
                errno=fail_errno,
                kind="injected-errno",
            )
        if self.maps_done in self.fail_map:
            raise MappingError(
                f"{request}: injected failure gpa=0x{region.guest_phys_addr:x}", kind="test"
            )
        handle = next(self._handles)
        self.mapped[handle] = region
        return handle, {"backing": "fake"}

    def unmap_region(self, handle: int) -> None:
        gpa = self.mapped[handle].guest_phys_addr
        self.unmaps_tried.append(gpa)
        if gpa in self.fail_unmap:
            raise MappingError(
                f"munmap failed for gpa=0x{gpa:x}: {self.fail_unmap[gpa]}", kind="munmap-failed"
            )
        del self.mapped[handle]

    def close_fd(self, fd: int) -> None:
        assert fd in self.open, f"close of fd {fd} that is not open"
        self.open.discard(fd)

    def file_id(self, fd: int) -> tuple[int, int] | None:
        return self.file_ids.get(fd, (0, fd))
