"""Reading guest memory through vhostmem's own mapping, without side effects.

``read_region`` walks a mapped range page by page (the backing's page size) and never touches
guest memory through a pointer: a pointer read of a page past the end of the file is a SIGBUS
that kills the process, and a read fault on a page QEMU discarded (an unplugged virtio-mem
block) allocates it again. Instead:

* ``mincore`` on our mapping says which pages are resident;
* resident pages are read through ``/proc/self/mem``, where a read that would SIGBUS fails
  with EIO instead and becomes a ``fault`` chunk (test_peek_turns_sigbus_into_fault);
* pages of a hugetlb file our mapping has not faulted in are read with ``pread`` on the file,
  which copies present pages and zero-fills holes without allocating (fs/hugetlbfs/inode.c
  ``hugetlbfs_read_iter``; see ``read_region``);
* other pages are reported ``unpopulated`` and not read.

The result is a ``Peek``: runs of pages of one state (``PeekChunk``), with the bytes.
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, final

from vhostmem.mapping.linux import PAGESIZE, align_down, align_up, mincore, pread_all

#: Largest ``peek`` in bytes; the bytes are returned in memory.
PEEK_MAX: Final = 64 << 20

PeekState = Literal["data", "unpopulated", "fault"]


@final
@dataclass(frozen=True, slots=True)
class PeekChunk:
    """A run of pages of one state. ``offset`` is relative to the region start.

    ``source`` says how ``data`` was read: ``mapping`` (our own mapping, through
    ``/proc/self/mem``) or ``file`` (``pread`` of a hugetlb fd, for pages our mapping has not
    faulted in). ``errno``/``detail`` explain a ``fault``.
    """

    offset: int
    length: int
    state: PeekState
    data: bytes | None
    errno: int | None = None
    source: str | None = None
    detail: str = ""

    @property
    def error(self) -> str | None:
        """Why a ``fault`` chunk could not be read, in words; None for other states."""
        if self.state != "fault":
            return None
        if self.detail:
            return self.detail
        return errno_mod.errorcode.get(self.errno or 0, "fault")


@final
@dataclass(frozen=True, slots=True)
class Peek:
    """Guest memory read through vhostmem's mapping, page by page, without side effects."""

    gpa: int  #: guest physical address of the first byte
    offset: int  #: offset of the first byte in the region
    length: int
    chunks: tuple[PeekChunk, ...]

    @property
    def complete(self) -> bool:
        """True when every byte was read."""
        return all(c.state == "data" for c in self.chunks)

    def data(self, fill: int = 0) -> bytes:
        """The bytes, with ``fill`` standing in for unpopulated or faulting pages."""
        out = bytearray()
        for c in self.chunks:
            out += c.data if c.data is not None else bytes([fill]) * c.length
        return bytes(out)

    def hex(self) -> str:
        """Hex of the bytes; ``__`` marks unpopulated bytes and ``!!`` faulting ones."""
        parts = []
        for c in self.chunks:
            if c.data is not None:
                parts.append(c.data.hex())
            else:
                parts.append(("__" if c.state == "unpopulated" else "!!") * c.length)
        return "".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON (bytes as hex)."""
        return {
            "gpa": self.gpa,
            "offset": self.offset,
            "length": self.length,
            "chunks": [
                {
                    "offset": c.offset,
                    "length": c.length,
                    "state": c.state,
                    "data": None if c.data is None else c.data.hex(),
                    "errno": c.errno,
                    "source": c.source,
                    "detail": c.detail,
                }
                for c in self.chunks
            ],
        }


#: The name HACKING.md uses for the same thing.
PeekResult = Peek


def _append_chunk(chunks: list[PeekChunk], chunk: PeekChunk) -> None:
    """Append, merging with the previous chunk when state, source and errno agree."""
    if chunks:
        prev = chunks[-1]
        if (prev.state, prev.source, prev.errno, prev.detail) == (
            chunk.state,
            chunk.source,
            chunk.errno,
            chunk.detail,
        ) and prev.offset + prev.length == chunk.offset:
            data = None if prev.data is None or chunk.data is None else prev.data + chunk.data
            chunks[-1] = PeekChunk(
                prev.offset,
                prev.length + chunk.length,
                prev.state,
                data,
                prev.errno,
                prev.source,
                prev.detail,
            )
            return
    chunks.append(chunk)


def read_region(
    *,
    gpa: int,
    offset: int,
    length: int,
    map_base: int,
    remainder: int,
    fd_offset: int,
    page_size: int,
    kept_fd: int | None,
    mem_fd: Callable[[], int],
) -> Peek:
    """Read guest memory through our mapping without killing the process or changing it.

    Page by page (the backing's page size): ``mincore`` on our mapping first.

    * resident: read through ``/proc/self/mem`` at the page's address. A read that would
      SIGBUS through a pointer fails with EIO there; the page becomes a ``fault`` chunk.
    * not resident, shmem or file: ``unpopulated``, not touched: a read fault would
      allocate a page QEMU discarded (an unplugged virtio-mem block). For shmem, mincore
      consults the page cache, so a page QEMU populated shows as resident here.
    * not resident, hugetlb: mincore on hugetlb looks only at OUR page tables, so pages
      QEMU populated look absent. Read them with ``pread`` on the kept fd instead:
      ``hugetlbfs_read_iter`` copies present pages and zero-fills holes without allocating
      (checked on Linux 6.18: pread of holes returns zeros and free_hugepages does not
      move, whereas a /proc/self/mem read of the same hole through our mapping allocates a
      huge page). Holes therefore come back as zero ``data`` with ``source="file"``.

    A page QEMU discards between our mincore and our read would be faulted back in; the
    window is one syscall wide.

    The caller has checked the range (``Mapping.peek``: inside the region, at most PEEK_MAX).

    Args:
        gpa: guest physical address of the region.
        offset, length: the range to read, relative to the region start.
        map_base, remainder, fd_offset, page_size: the mapping's layout (see ``Mapping``).
        kept_fd: the hugetlb fd kept for reading pages our mapping has not faulted in, or None.
        mem_fd: returns the ``/proc/self/mem`` fd; called only when a resident page is read.
    """
    chunks: list[PeekChunk] = []
    if length == 0:
        return Peek(gpa + offset, offset, 0, ())
    page = page_size
    start = remainder + offset  # offsets into the map from here on
    end = start + length
    first = align_down(start, page)
    last = align_up(end, page)
    try:
        resident = mincore(map_base + first, last - first)
    except OSError as err:  # cannot happen while we own the map; report, never guess
        return Peek(
            gpa + offset,
            offset,
            length,
            (PeekChunk(offset, length, "fault", None, err.errno, None, f"mincore: {err}"),),
        )
    per_page = page // PAGESIZE
    for page_start in range(first, last, page):
        lo = max(page_start, start)
        hi = min(page_start + page, end)
        idx = (page_start - first) // PAGESIZE
        if any(b & 1 for b in resident[idx : idx + per_page]):
            chunk = _read_mem(mem_fd(), map_base, remainder, lo, hi)
        elif kept_fd is not None:
            chunk = _read_file(kept_fd, fd_offset, remainder, lo, hi)
        else:
            chunk = PeekChunk(lo - remainder, hi - lo, "unpopulated", None)
        _append_chunk(chunks, chunk)
    return Peek(gpa + offset, offset, length, tuple(chunks))


def _read_mem(mem_fd: int, map_base: int, remainder: int, lo: int, hi: int) -> PeekChunk:
    """Map offsets ``[lo, hi)`` read through ``/proc/self/mem``; EIO there is a fault chunk."""
    return _read(
        mem_fd,
        map_base + lo,
        remainder,
        lo,
        hi,
        "mapping",
        lambda got: (errno_mod.EIO, f"short read of /proc/self/mem: {got} bytes"),
    )


def _read_file(kept_fd: int, fd_offset: int, remainder: int, lo: int, hi: int) -> PeekChunk:
    """Map offsets ``[lo, hi)`` read with ``pread`` on the kept hugetlb fd."""
    return _read(
        kept_fd,
        fd_offset + lo,
        remainder,
        lo,
        hi,
        "file",
        lambda got: (
            None,
            f"past end of file: file offset {fd_offset + lo:#x}, "
            f"read {got} of {hi - lo} bytes (touching it would SIGBUS)",
        ),
    )


def _read(
    fd: int,
    position: int,
    remainder: int,
    lo: int,
    hi: int,
    source: str,
    short: Callable[[int], tuple[int | None, str]],
) -> PeekChunk:
    """Map offsets ``[lo, hi)`` read with ``pread`` at ``position`` of ``fd``: a data chunk, or a
    fault chunk for an error or a short read (``short(bytes_read)`` gives its errno and words)."""
    try:
        data = pread_all(fd, hi - lo, position)
    except OSError as err:
        why = f"{errno_mod.errorcode.get(err.errno or 0, '?')}: {err.strerror}"
        return PeekChunk(lo - remainder, hi - lo, "fault", None, err.errno, source, why)
    if len(data) != hi - lo:
        code, why = short(len(data))
        return PeekChunk(lo - remainder, hi - lo, "fault", None, code, source, why)
    return PeekChunk(lo - remainder, hi - lo, "data", data, None, source)
