"""Mapping guest memory regions: the only package of vhostmem that calls mmap, munmap, mincore.

Theory of operation
-------------------

QEMU hands us one fd per region (SET_MEM_TABLE / ADD_MEM_REG) plus ``(gpa, size, mmap_offset)``.
``Mapper.map()`` probes what the fd is (``probe_backing``), refuses up front what cannot work
(with one message that names the request, the region, the backing, the numbers and the fix), and
maps the region the way libvhost-user does (``qemu/qemu:subprojects/libvhost-user/libvhost-user.c``,
``_vu_add_mem_reg``, commit b2b63008b3 "Use most of mmap_offset as fd_offset")::

    fd_offset = ALIGN_DOWN(mmap_offset, page_size)      # page size of the fd (2 MiB on hugetlbfs)
    remainder = mmap_offset - fd_offset                 # where the region starts inside the map
    length    = ALIGN_UP(remainder + size, page_size)   # hugetlb munmap needs whole huge pages
    mmap(NULL, length, PROT_READ|PROT_WRITE, MAP_SHARED|MAP_NORESERVE, fd, fd_offset)
    madvise(MADV_DONTDUMP)                              # libvhost-user commit 52767e1063

Nothing is ever populated: a virtio-mem memslot of 1 GiB may hold a single plugged 2 MiB block,
and touching an unplugged block would allocate memory QEMU discarded.

The received fd is consumed: closed on success and on failure (stdlib ``mmap`` keeps its own dup,
Python 3.11 has no ``trackfd=False``). Hugetlb regions keep the received fd as well, for ``peek``
(see ``Mapping.peek``), so they hold two fds.

Every unmap is verified (``Mapping.close``): stdlib ``mmap.close()`` ignores munmap's result,
and munmap can fail (ENOMEM when it splits a mapping at ``vm.max_map_count``).

No trio and no logging here: everything is returned as data (``Mapping.warnings``,
``MappingError.details``) and the shell logs it.

Modules
-------

One concern a module; imports point down the list (``tests/unit/test_layering.py``)::

    linux      libc through ctypes (mincore, munmap, fstatfs), /proc and sysfs readers, limits
    backing    what an fd is: kind, page size, size, access, seals (``probe_backing``)
    diagnosis  every failure and huge page shortfall in words (``Diagnosis``, ``Shortfall``)
    peek       guest memory read page by page without side effects (``read_region``, ``Peek``)
    mapper     ``Mapper`` and ``Mapping``: layout, mmap, views, verified munmap

``diagnosis`` and ``peek`` sit side by side and do not import each other. This module
re-exports the public face; the rest of vhostmem imports from ``vhostmem.mapping`` only.
"""

from __future__ import annotations

from vhostmem.mapping.backing import Backing, probe_backing
from vhostmem.mapping.diagnosis import Shortfall
from vhostmem.mapping.linux import (
    MAP_NORESERVE,
    hugetlb_pool,
    max_map_count,
    process_map_count,
    raise_nofile_limit,
)
from vhostmem.mapping.mapper import Mapper, MapperStats, Mapping
from vhostmem.mapping.peek import PEEK_MAX, Peek, PeekChunk, PeekResult

__all__ = [
    "MAP_NORESERVE",
    "PEEK_MAX",
    "Backing",
    "Mapper",
    "MapperStats",
    "Mapping",
    "Peek",
    "PeekChunk",
    "PeekResult",
    "Shortfall",
    "hugetlb_pool",
    "max_map_count",
    "probe_backing",
    "process_map_count",
    "raise_nofile_limit",
]
