"""Mapping and unmapping regions: ``Mapper`` and ``Mapping``.

``Mapper.map`` takes one region's fd and numbers, looks at the backing (``probe_backing``,
skipped for a file already proven), refuses what cannot work (``Diagnosis``), lays the region
out the way libvhost-user's ``_vu_add_mem_reg`` does and maps it (see the package docstring).
A ``Mapping`` hands out views, peeks (``read_region``) and unmaps; every unmap is verified,
since stdlib ``mmap.close()`` ignores munmap's result (CPython ``mmapmodule.c``).

The Mapper keeps running totals (bytes mapped, fds held) and the huge page shortfall of its
live hugetlb regions (``Mapper.shortfalls``).
"""

from __future__ import annotations

import mmap
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, final

from vhostmem.errors import MappingError
from vhostmem.mapping.backing import Backing, probe_backing
from vhostmem.mapping.diagnosis import (
    Diagnosis,
    Shortfall,
    munmap_failed,
    pages_in,
    region_text,
    views_in_use,
)
from vhostmem.mapping.linux import (
    MAP_NORESERVE,
    align_down,
    align_up,
    atomic_or_u8,
    buffer_address,
    close_quietly,
    hugetlb_pool,
    munmap,
    page_mapped,
    vma_at,
)
from vhostmem.mapping.peek import PEEK_MAX, Peek, read_region
from vhostmem.regions import end_fits_u64

#: Proven backings a Mapper remembers at most (QEMU uses one memfd or file per backend).
_PROVEN_MAX: Final = 4096
_MAP_FLAGS: Final = mmap.MAP_SHARED | MAP_NORESERVE
_MAP_PROT: Final = mmap.PROT_READ | mmap.PROT_WRITE


@final
@dataclass(frozen=True, slots=True)
class MapperStats:
    """Totals of one Mapper; ``fds_held`` includes the ``/proc/self/mem`` fd when open."""

    maps: int
    mapped_bytes: int
    fds_held: int


@final
class Mapping:
    """One mapped region. Created by ``Mapper.map``; a context manager; ``close()`` is idempotent.

    Attributes:
        gpa, size, mmap_offset: the region as the front-end sent it.
        uaddr: the region's address in the front-end (None when no front-end gave one).
        fd_offset: file offset passed to mmap (``ALIGN_DOWN(mmap_offset, page_size)``).
        remainder: ``mmap_offset - fd_offset``, where the region starts inside the map.
        length: bytes mapped (``ALIGN_UP(remainder + size, page_size)``).
        map_base: address mmap returned; ``address = map_base + remainder`` is the region's data.
        backing: what the fd was.
        fds_held: 1 (stdlib mmap's dup) or 2 (hugetlb: plus the received fd, kept for peek).
        warnings: things that went wrong without failing the mapping (e.g. madvise).
        pool: hugetlb: the huge page pool of its page size when it was mapped
            (``{"total", "free", "resv", "surplus"}``, read for the shortfall check); ``None``
            otherwise, or when sysfs has no such pool.
    """

    __slots__ = (
        "_closed",
        "_kept_fd",
        "_mapper",
        "_mm",
        "_prune_at",
        "_still_mapped",
        "_views",
        "address",
        "backing",
        "fd_offset",
        "gpa",
        "length",
        "map_base",
        "mmap_offset",
        "pool",
        "remainder",
        "request",
        "size",
        "uaddr",
        "warnings",
    )

    def __init__(
        self,
        *,
        mapper: Mapper,
        mm: mmap.mmap,
        map_base: int,
        kept_fd: int | None,
        request: str,
        gpa: int,
        size: int,
        mmap_offset: int,
        fd_offset: int,
        length: int,
        backing: Backing,
        warnings: tuple[str, ...],
        uaddr: int | None = None,
    ) -> None:
        self._mapper = mapper
        self._mm: mmap.mmap | None = mm
        self._kept_fd = kept_fd
        self._views: list[memoryview] = []
        self._prune_at = 64
        self._closed = False
        self._still_mapped = False  # the last close() found munmap refused: close() tries again
        self.request = request
        self.gpa = gpa
        self.size = size
        self.mmap_offset = mmap_offset
        self.uaddr = uaddr
        self.fd_offset = fd_offset
        self.remainder = mmap_offset - fd_offset
        self.length = length
        self.map_base = map_base
        self.address = map_base + self.remainder
        self.backing = backing
        self.warnings = warnings
        self.pool: dict[str, int] | None = None

    # -- introspection --

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def fds_held(self) -> int:
        if self._closed:
            return 0
        return 1 + (self._kept_fd is not None)

    @property
    def text(self) -> str:
        """The request and the region in the words every message uses."""
        return region_text(self.request, self.gpa, self.size, self.mmap_offset, self.uaddr)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at {self.address:#x}"
        return f"<Mapping {self.text} {self.backing.kind} {state}>"

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON: the region, the map, the backing."""
        return {
            "gpa": self.gpa,
            "size": self.size,
            "uaddr": self.uaddr,
            "mmap_offset": self.mmap_offset,
            "fd_offset": self.fd_offset,
            "remainder": self.remainder,
            "length": self.length,
            "map_base": self.map_base,
            "address": self.address,
            "fds_held": self.fds_held,
            "closed": self._closed,
            "backing": self.backing.as_dict(),
            "warnings": list(self.warnings),
        }

    # -- access --

    def _check_range(self, what: str, offset: int, length: int) -> None:
        if self._closed:
            raise ValueError(f"{what} on a closed mapping (gpa={self.gpa:#x})")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"{what}(offset={offset:#x}, length={length:#x}) is outside the region "
                f"gpa={self.gpa:#x} size={self.size:#x}: need 0 <= offset, 0 <= length and "
                f"offset + length = {offset + length:#x} <= size {self.size:#x}"
            )

    def atomic_or(self, offset: int, mask: int) -> int:
        """OR ``mask`` into the byte at ``offset`` atomically (a dirty log shared with the
        front-end, which clears it concurrently); returns the byte as it was.

        Raises:
            ValueError: the byte is outside the region or the mapping is closed.
        """
        self._check_range("atomic_or", offset, 1)
        return atomic_or_u8(self.address + offset, mask)

    def view(self, offset: int, length: int) -> memoryview:
        """A writable memoryview of ``length`` bytes at ``offset`` into the region.

        The view is released by ``close()``: using it afterwards raises ValueError instead of
        touching unmapped memory.

        Raises:
            ValueError: the range is outside the region or the mapping is closed.
        """
        self._check_range("view", offset, length)
        assert self._mm is not None
        if len(self._views) >= self._prune_at:
            self._prune_views()
        start = self.remainder + offset
        with memoryview(self._mm) as whole:
            view = whole[start : start + length]
        self._views.append(view)
        return view

    def _prune_views(self) -> None:
        # Keep the list of handed-out views bounded on a busy data path: a view that only our
        # list still references (refcount 2 = list + getrefcount's argument, CPython) cannot
        # be used by anyone, so release it now.
        keep = []
        for i in range(len(self._views)):
            if sys.getrefcount(self._views[i]) <= 2:
                self._views[i].release()
            else:
                keep.append(self._views[i])
        self._views = keep
        self._prune_at = max(64, 2 * len(keep))

    def peek(self, offset: int, length: int) -> Peek:
        """Read guest memory through our mapping without killing the process or changing it.

        Page by page, as ``vhostmem.mapping.peek.read_region`` describes: resident pages
        through ``/proc/self/mem``, hugetlb pages our mapping has not faulted in through
        ``pread`` on the kept fd, other pages reported ``unpopulated`` and never touched.

        Raises:
            ValueError: the range is outside the region, longer than PEEK_MAX, or closed.
        """
        self._check_range("peek", offset, length)
        if length > PEEK_MAX:
            raise ValueError(f"peek length {length:#x} is above PEEK_MAX {PEEK_MAX:#x}")
        return read_region(
            gpa=self.gpa,
            offset=offset,
            length=length,
            map_base=self.map_base,
            remainder=self.remainder,
            fd_offset=self.fd_offset,
            page_size=self.backing.page_size,
            kept_fd=self._kept_fd,
            mem_fd=self._mapper._proc_mem_fd,
        )

    # -- teardown --

    def close(self) -> None:
        """Release views, munmap, verify the munmap happened, close the kept fd. Idempotent.

        Raises:
            MappingError: ``views-in-use`` when a view derived from one we handed out (a slice
                of it) is still alive, so unmapping would leave it pointing at nothing; the
                mapping stays open and close() can be called again. ``munmap-failed`` when the
                kernel refused to unmap (the region is still mapped and is reported, not hidden);
                calling close() again tries the munmap again.
        """
        if self._closed:
            if self._still_mapped:
                self._verify_unmapped()
            return
        mm = self._mm
        assert mm is not None
        for view in self._views:
            try:
                view.release()
            except BufferError:  # someone took a buffer of it (e.g. numpy); mm.close() tells
                pass
        self._views = []
        try:
            mm.close()
        except BufferError as err:
            raise views_in_use(self.text, self.backing, err, self._details()) from err
        self._mm = None
        self._mapper._forget(self)  # while fds_held still counts what it held
        self._closed = True
        if self._kept_fd is not None:
            close_quietly(self._kept_fd)
            self._kept_fd = None
        self._verify_unmapped()

    def _verify_unmapped(self) -> None:
        # mmap.close() ignores munmap's result (CPython 3.11 mmapmodule.c), and munmap can fail:
        # EINVAL for a hugetlb VMA and a length that is not a multiple of the huge page size (we
        # never pass one), ENOMEM when the unmap splits a VMA and the process is at
        # vm.max_map_count. Splits are common: the kernel merges adjacent mappings of one file
        # with contiguous offsets into one VMA, so one region's unmap may cut a VMA in two. So
        # we verify every unmap instead of trusting it:
        # 1. mincore on the first page fails with ENOMEM once nothing is mapped there: done,
        #    one syscall, no parsing.
        # 2. If something is mapped there, it may be ours (munmap failed) or a new mapping some
        #    other thread got at the freed address. /proc/self/maps tells which: a VMA of our
        #    backing's inode covering our first page is ours (it starts lower when it was merged
        #    with a neighbour). Only then do we munmap our range ourselves through ctypes, with
        #    a page-aligned length. An unconditional ctypes munmap after mmap.close() would be
        #    wrong: it could tear down someone else's new mapping.
        self._still_mapped = False
        if not page_mapped(self.map_base):
            return
        vma = vma_at(self.map_base)
        if vma is None or vma[2] != self.backing.st_ino:
            return
        span = align_up(self.length, self.backing.page_size)
        end = self.map_base + span
        err = munmap(self.map_base, span)
        if err == 0:
            self.warnings += (
                f"mmap.close() left {self.map_base:#x}-{end:#x} mapped "
                f"(munmap failed silently); unmapped {span:#x} bytes with munmap",
            )
            return
        self._still_mapped = True
        raise munmap_failed(self.text, self.backing, self.map_base, span, err, self._details())

    def _details(self) -> dict[str, Any]:
        return {"request": self.request, **self.as_dict()}

    def __enter__(self) -> Mapping:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@final
class Mapper:
    """Maps regions, keeps totals, enforces ``max_mapped``, owns the ``/proc/self/mem`` fd.

    Args:
        max_mapped: cap on the total bytes mapped (sum of ``Mapping.length``); None = no cap.
    """

    def __init__(self, *, max_mapped: int | None = None) -> None:
        self.max_mapped = max_mapped
        self._live: dict[int, Mapping] = {}
        # Running totals: stats does not walk the live mappings.
        self._mapped_bytes = 0
        self._fds_held = 0
        #: (st_dev, st_ino, st_size) -> Backing of a regular file this Mapper has mapped
        #: read-write: the next region of the same file skips the probe (see _map).
        self._proven: dict[tuple[int, int, int], Backing] = {}
        self._mem_fd: int | None = None
        self._closed = False

    @property
    def stats(self) -> MapperStats:
        return MapperStats(
            maps=len(self._live),
            mapped_bytes=self._mapped_bytes,
            fds_held=self._fds_held + (self._mem_fd is not None),
        )

    def mappings(self) -> Iterator[Mapping]:
        """The live mappings, in the order they were made."""
        return iter(list(self._live.values()))

    def map(
        self,
        fd: int,
        *,
        gpa: int,
        size: int,
        mmap_offset: int,
        request: str = "ADD_MEM_REG",
        fail_errno: int | None = None,
        st: os.stat_result | None = None,
        uaddr: int | None = None,
    ) -> Mapping:
        """Map one region. ``fd`` is consumed: closed on success and on failure.

        Args:
            fd: the region's fd as received (ownership passes to this call).
            gpa: guest physical address of the region.
            size: region size in bytes.
            mmap_offset: offset of the region in the fd.
            request: the request name used in messages (``ADD_MEM_REG``, ``SET_MEM_TABLE``...).
            fail_errno: fault injection: the mmap step raises ``OSError(fail_errno)`` as if the
                kernel had refused, so the whole diagnosis path runs.
            st: ``os.fstat(fd)`` if the caller has just made it (saves a syscall).
            uaddr: the region's address in the front-end, for messages (None: not known).

        Returns:
            The live Mapping. For hugetlb, ``Mapping.warnings`` holds the huge page shortfall
            (see ``Mapper.shortfalls``) when the pool cannot back the whole region.

        Raises:
            MappingError: refused up front or refused by the kernel; ``str()`` is the diagnosis.
        """
        try:
            return self._map(fd, gpa, size, mmap_offset, request, fail_errno, st, uaddr)
        except MappingError as err:
            if err.kind != "bad-fd":  # a number that is not open may already be someone else's
                close_quietly(fd)
            raise
        except BaseException:
            close_quietly(fd)
            raise

    def _map(
        self,
        fd: int,
        gpa: int,
        size: int,
        mmap_offset: int,
        request: str,
        fail_errno: int | None,
        st: os.stat_result | None = None,
        uaddr: int | None = None,
    ) -> Mapping:
        diag = Diagnosis(request, gpa, size, mmap_offset, fd, uaddr)
        if self._closed:
            raise diag.closed()
        # The path QEMU waits on: one fstat, and a backing already proven mappable for this
        # file and size (QEMU sends the same memfd with every ADD_MEM_REG). Anything else, and
        # every mmap failure, probes the fd afresh, so the words of a failure never rest on
        # cached facts.
        if st is None:
            try:
                st = os.fstat(fd)
            except OSError as err:
                raise diag.bad_fd(err) from err
        key = (st.st_dev, st.st_ino, st.st_size)
        backing = self._proven.get(key) if stat.S_ISREG(st.st_mode) else None
        if backing is None:
            backing = self._probe_and_refuse(fd, diag, st)
        diag.set_backing(backing)

        # -- numbers (the wire format makes each a u64 already) --
        end = mmap_offset + size
        if not (
            0 < size
            and 0 <= gpa
            and 0 <= mmap_offset
            and end_fits_u64(mmap_offset, size)
            and end_fits_u64(gpa, size)
            and end <= backing.st_size
        ):
            diag.refuse_numbers(backing)

        # -- layout (libvhost-user _vu_add_mem_reg) --
        page = backing.page_size
        fd_offset = align_down(mmap_offset, page)
        remainder = mmap_offset - fd_offset
        length = align_up(remainder + size, page)
        if self.max_mapped is not None and self._mapped_bytes + length > self.max_mapped:
            stats = self.stats
            raise diag.max_mapped(length, self.max_mapped, stats.maps, stats.mapped_bytes)

        # Python's mmap refuses a length past the end of a regular file even though the kernel
        # maps whole pages; the region itself is inside the file (checked above), so map only up
        # to EOF and let the kernel round the last page. Hugetlb sizes are huge-page multiples.
        hugetlb = backing.hugetlb
        map_len = length if hugetlb else min(length, backing.st_size - fd_offset)

        # -- mmap --
        try:
            if fail_errno is not None:
                raise OSError(fail_errno, os.strerror(fail_errno))
            mm = mmap.mmap(fd, map_len, _MAP_FLAGS, _MAP_PROT, offset=fd_offset)
        except OSError as err:
            # Probe afresh: a read-only fd, a write seal or a pipe fails here with EACCES,
            # EPERM or ENODEV, and the words should say which (not rely on the cache).
            self._proven.pop(key, None)
            backing = self._probe_and_refuse(fd, diag, cache=False)
            layout = {
                "fd_offset": fd_offset,
                "remainder": remainder,
                "length": length,
                "page_size": page,
            }
            stats = self.stats
            raise diag.mmap_failed(
                err,
                backing,
                layout,
                injected=fail_errno is not None,
                maps=stats.maps,
                mapped_bytes=stats.mapped_bytes,
            ) from err
        except (ValueError, OverflowError) as err:
            raise diag.mmap_refused(err, fd_offset, length, page) from err

        try:
            map_base = buffer_address(mm)
            warnings: tuple[str, ...] = ()
            try:
                mm.madvise(mmap.MADV_DONTDUMP)  # libvhost-user 52767e1063: no guest RAM in cores
            except OSError as err:
                warnings = (f"madvise(MADV_DONTDUMP) failed: {err.strerror}",)
            # Hugetlb: keep the received fd, so peek can read pages our mapping has not faulted
            # in through it (hugetlb mincore only sees our page tables; see mapping.peek). The
            # dup inside mmap.mmap is not reachable from Python 3.11.
            kept_fd = fd if hugetlb else None
            mapping = Mapping(
                mapper=self,
                mm=mm,
                map_base=map_base,
                kept_fd=kept_fd,
                request=request,
                gpa=gpa,
                size=size,
                mmap_offset=mmap_offset,
                fd_offset=fd_offset,
                length=length,
                backing=backing,
                warnings=warnings,
                uaddr=uaddr,
            )
        except BaseException:
            mm.close()
            raise
        self._live[id(mapping)] = mapping
        self._mapped_bytes += length
        self._fds_held += mapping.fds_held
        if not hugetlb:
            close_quietly(fd)  # libvhost-user closes the fd right after mmap
        else:
            pools: dict[int, dict[str, int] | None] = {}
            short = self._shortfalls(mapping, pools)
            if short:
                mapping.warnings += (short[0].text(),)
            mapping.pool = pools[page] if page in pools else hugetlb_pool(page)
        return mapping

    def _probe_and_refuse(
        self, fd: int, diag: Diagnosis, st: os.stat_result | None = None, *, cache: bool = True
    ) -> Backing:
        """Probe ``fd`` in full and refuse what can never be mapped read-write and shared.

        A regular file that passes is remembered by (device, inode, size): the next region of
        the same file skips the probe. Seals only ever grow and a write seal makes mmap fail
        (EPERM), which probes afresh; seals added later without failing (GROW, SHRINK) show in
        reports only once the file is probed again.
        """
        try:
            backing = probe_backing(fd, st)
        except OSError as err:
            raise diag.bad_fd(err) from err
        diag.set_backing(backing)
        diag.refuse_unmappable(backing)
        if cache:
            if len(self._proven) >= _PROVEN_MAX:
                self._proven.clear()
            self._proven[(backing.st_dev, backing.st_ino, backing.st_size)] = backing
        return backing

    def shortfalls(self) -> list[Shortfall]:
        """The live hugetlb regions the huge page pool cannot back in full now.

        Rule: a file's pages that are not allocated yet come from the pool of its page size
        when first touched (MAP_NORESERVE reserves nothing). Per page size, every live
        hugetlb file counts once: the pages its live regions span (merged), less the pages it
        already holds (``st_blocks``, counted as inside those regions, so the shortfall is
        never overstated), summed over the files: when the sum exceeds ``free_hugepages``, that
        many pages are missing for certain. Reserved pages are counted in free and belong to
        the file whose mapping reserved them (QEMU's own hugetlb backend with the default
        reserve=on reserves its whole file). Which file will lack pages depends on who touches
        first, so every file that needs more than the reserved pages (pages it must take from
        the unreserved part of the pool) is listed; a file whose missing pages may all be
        reserved for it (no more than ``resv_hugepages``) is not.
        """
        return self._shortfalls(None)

    def _shortfalls(
        self, only: Mapping | None, pools: dict[int, dict[str, int] | None] | None = None
    ) -> list[Shortfall]:
        """See :meth:`shortfalls`; ``only``: that mapping's entries only. The pools read are
        left in ``pools`` by page size."""
        if pools is None:
            pools = {}
        # (page size, st_dev, st_ino) -> the file's live mappings
        files: dict[tuple[int, int, int], list[Mapping]] = {}
        for m in self._live.values():
            b = m.backing
            if b.hugetlb and (only is None or b.page_size == only.backing.page_size):
                files.setdefault((b.page_size, b.st_dev, b.st_ino), []).append(m)
        # page size -> [(mappings, pages spanned, pages held)]
        sizes: dict[int, list[tuple[list[Mapping], int, int]]] = {}
        for (page, _, _), maps in files.items():
            fd = next((m._kept_fd for m in maps if m._kept_fd is not None), None)
            if fd is None:
                continue
            try:
                held = os.fstat(fd).st_blocks * 512 // page
            except OSError:
                continue
            spanned = pages_in([(m.fd_offset, m.fd_offset + m.length) for m in maps], page)
            sizes.setdefault(page, []).append((maps, spanned, held))
        found: list[Shortfall] = []
        for page, per_file in sizes.items():
            pool = pools[page] = hugetlb_pool(page)
            if pool is None:
                continue
            lacking = [spanned - min(held, spanned) for _, spanned, held in per_file]
            short = sum(lacking) - pool["free"]
            if short <= 0:
                continue
            for (maps, spanned, held), lack in zip(per_file, lacking, strict=True):
                if lack <= pool["resv"]:  # may all be reserved for it: not counted as short
                    continue
                for m in maps:
                    if only is not None and m is not only:
                        continue
                    found.append(
                        Shortfall(
                            request=m.request,
                            gpa=m.gpa,
                            size=m.size,
                            uaddr=m.uaddr,
                            mmap_offset=m.mmap_offset,
                            kind=m.backing.kind,
                            file=m.backing.target,
                            page_size=page,
                            region_pages=m.length // page,
                            file_regions=len(maps),
                            file_pages=spanned,
                            held=held,
                            free=pool["free"],
                            resv=pool["resv"],
                            total=pool["total"],
                            other_missing=sum(lacking) - lack,
                            short=short,
                            mapping=m,
                        )
                    )
        return found

    def _forget(self, mapping: Mapping) -> None:
        if self._live.pop(id(mapping), None) is not None:
            self._mapped_bytes -= mapping.length
            self._fds_held -= mapping.fds_held

    def _proc_mem_fd(self) -> int:
        # One /proc/self/mem fd per Mapper, opened on first peek. It stays bound to this
        # process's address space (after a fork it would still read the parent's).
        if self._mem_fd is None:
            self._mem_fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
        return self._mem_fd

    def close(self) -> None:
        """Close every live mapping and the /proc/self/mem fd. Idempotent.

        Raises:
            MappingError: the first error of a mapping's close (the others are still closed).
        """
        first: MappingError | None = None
        for mapping in list(self._live.values()):
            try:
                mapping.close()
            except MappingError as err:
                first = first or err
        if self._mem_fd is not None:
            close_quietly(self._mem_fd)
            self._mem_fd = None
        self._closed = True
        if first is not None:
            raise first

    def __enter__(self) -> Mapper:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
