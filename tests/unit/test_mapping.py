"""vhostmem.mapping on real memfds, files and huge pages (root: the hugetlb tests reserve pages).

Every test checks it leaves no fd and no shared mapping behind (the autouse fixture
``leaves_nothing_behind``). The hugetlb tests fail, never skip, when huge pages cannot be
reserved.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import mmap
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vhostmem import mapping as mapping_mod
from vhostmem.errors import MappingError
from vhostmem.mapping import (
    Mapper,
    Mapping,
    max_map_count,
    probe_backing,
    raise_nofile_limit,
)
from vhostmem.regions import human_size

from .helpers.leaks import map_lines, open_fds, shared_maps

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
HPAGE = 2 * MiB
POOL = "/sys/kernel/mm/hugepages/hugepages-2048kB/"
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
HUGEPAGES_WANTED = 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mmap.restype = ctypes.c_void_p
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PAGE = mmap.PAGESIZE
PROT_NONE = 0
MAP_FAILED = ctypes.c_void_p(-1).value


# --- helpers -------------------------------------------------------------------------------------


def fd_count() -> int:
    return len(open_fds())


def file_map_lines() -> set[str]:
    """Mappings of files (inode != 0): Python's anonymous arenas come and go on their own."""
    return {line for line in map_lines() if line.split()[4] != "0"}


def maps_overlapping(start: int, end: int) -> list[str]:
    out = []
    for line in map_lines():
        lo_s, hi_s = line.split()[0].split("-")
        if int(lo_s, 16) < end and start < int(hi_s, 16):
            out.append(line)
    return out


def resident(address: int, length: int) -> list[int]:
    vec = ctypes.create_string_buffer((length + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
    assert _libc.mincore(address, length, vec) == 0, os.strerror(ctypes.get_errno())
    return [b & 1 for b in vec.raw]


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def pool(name: str = "free_hugepages") -> int:
    return int(Path(POOL, name).read_text())


def punch_hole(fd: int, offset: int, length: int) -> None:
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    assert _libc.fallocate(fd, mode, offset, length) == 0, os.strerror(ctypes.get_errno())


def memfd(size: int, name: str = "t", flags: int = 0) -> int:
    fd = os.memfd_create(name, flags)
    os.ftruncate(fd, size)
    return fd


def pattern(n: int, seed: int = 7) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


@pytest.fixture(autouse=True)
def leaves_nothing_behind() -> Iterator[None]:
    """Every test: the process's fds and shared maps after it are those before it (set up
    before, and checked after, every other fixture of the test, ``mapper`` included)."""
    gc.collect()
    fds_before, maps_before = open_fds(), shared_maps()
    yield
    gc.collect()
    assert open_fds() == fds_before, "fds leaked"
    assert shared_maps() == maps_before, "shared mappings leaked"


@pytest.fixture
def mapper() -> Iterator[Mapper]:
    m = Mapper()
    yield m
    m.close()
    assert m.stats.fds_held == 0


@pytest.fixture(scope="module")
def hugepages() -> Iterator[int]:
    """At least HUGEPAGES_WANTED free 2 MiB pages; restores /proc/sys/vm/nr_hugepages."""
    old = int(Path(NR_HUGEPAGES).read_text())
    missing = max(0, HUGEPAGES_WANTED - pool())
    try:
        if missing:
            Path(NR_HUGEPAGES).write_text(str(old + missing))
    except OSError as err:
        pytest.fail(f"cannot reserve huge pages ({NR_HUGEPAGES}: {err}); these tests need root")
    try:
        if pool() < HUGEPAGES_WANTED:
            pytest.fail(
                f"reserved {missing} more huge pages but only {pool()} are free "
                f"(nr_hugepages {pool('nr_hugepages')}); need {HUGEPAGES_WANTED}"
            )
        yield HUGEPAGES_WANTED
    finally:
        Path(NR_HUGEPAGES).write_text(str(old))
        assert int(Path(NR_HUGEPAGES).read_text()) == old


# --- memfd ---------------------------------------------------------------------------------------


def test_memfd_map_view_read_write_visible_through_memfd(mapper: Mapper) -> None:
    fds_before = fd_count()
    fd = memfd(1 * MiB)
    check = os.dup(fd)
    m = mapper.map(fd, gpa=0x1_0000_0000, size=1 * MiB, mmap_offset=0)
    with pytest.raises(OSError):  # consumed: stdlib mmap holds its own dup
        os.fstat(fd)
    assert (m.fd_offset, m.remainder, m.length, m.fds_held) == (0, 0, 1 * MiB, 1)
    assert m.backing.kind == "memfd" and m.backing.page_size == mmap.PAGESIZE
    assert m.pool is None  # no huge page pool behind it
    assert mapper.stats.maps == 1 and mapper.stats.mapped_bytes == 1 * MiB

    v = m.view(0x100, 5)
    v[:] = b"hello"
    assert os.pread(check, 5, 0x100) == b"hello"
    os.pwrite(check, b"world", 0x2000)
    assert bytes(m.view(0x2000, 5)) == b"world"

    m.close()
    assert v.__repr__().startswith("<released")  # views are released by close()
    with pytest.raises(ValueError):
        bytes(v)
    m.close()  # idempotent
    os.close(check)
    assert fd_count() == fds_before
    assert maps_overlapping(m.map_base, m.map_base + m.length) == []
    assert mapper.stats.maps == 0


def test_unaligned_mmap_offset_serves_the_right_bytes(mapper: Mapper) -> None:
    data = pattern(64 * KiB)
    fd = memfd(64 * KiB)
    os.pwrite(fd, data, 0)
    with mapper.map(fd, gpa=0x8000_0000, size=0x2000, mmap_offset=0x1800) as m:
        assert (m.fd_offset, m.remainder, m.length) == (0x1000, 0x800, 0x3000)
        assert m.address == m.map_base + 0x800
        assert bytes(m.view(0, 0x2000)) == data[0x1800:0x3800]
        assert m.peek(0x10, 0x20).data() == data[0x1810:0x1830]


def test_region_ending_inside_the_last_page_of_the_file(mapper: Mapper) -> None:
    # Python's mmap refuses a length past EOF even though the kernel maps whole pages.
    fd = memfd(0x1800)
    os.pwrite(fd, b"end!", 0x17FC)
    with mapper.map(fd, gpa=0, size=0x800, mmap_offset=0x1000) as m:
        assert m.length == 0x1000
        assert bytes(m.view(0x7FC, 4)) == b"end!"


def test_sparse_1tib_memfd_maps_without_populating(mapper: Mapper) -> None:
    fds_before = fd_count()
    fd = memfd(1 * TiB)
    rss_before = rss_kib()
    m = mapper.map(fd, gpa=0x1_0000_0000, size=1 * TiB, mmap_offset=0)
    assert rss_kib() - rss_before < 1024
    assert m.length == 1 * TiB
    assert len(maps_overlapping(m.map_base, m.map_base + m.length)) == 1
    assert m.peek(TiB - 4096, 4096).chunks[0].state == "unpopulated"
    m.close()
    assert maps_overlapping(m.map_base, m.map_base + m.length) == []
    mapper.close()  # also closes the /proc/self/mem fd peek opened
    assert fd_count() == fds_before


def test_close_leaves_no_map_line_and_no_fd() -> None:
    fds_before = fd_count()
    file_maps_before = file_map_lines()
    mapper = Mapper()
    mappings: list[Mapping] = []
    for i in range(4):
        fd = memfd(4 * MiB, f"r{i}")
        mappings.append(mapper.map(fd, gpa=i * 4 * MiB, size=4 * MiB, mmap_offset=0))
    assert mapper.stats.maps == 4 and mapper.stats.fds_held == 4
    mappings[0].view(0, 4)[:] = b"data"
    assert mappings[0].peek(0, 16).data()[:4] == b"data"
    assert mapper.stats.fds_held == 5  # + /proc/self/mem
    mappings[0].close()
    mapper.close()  # closes the other three
    assert all(m.closed for m in mappings)
    for m in mappings:
        assert maps_overlapping(m.map_base, m.map_base + m.length) == []
    assert fd_count() == fds_before
    assert file_map_lines() == file_maps_before


def test_view_bounds_are_checked(mapper: Mapper) -> None:
    with mapper.map(memfd(8192), gpa=0x4000, size=8192, mmap_offset=0) as m:
        with pytest.raises(ValueError, match=r"offset=0x1ff0, length=0x20.*0x2010 <= size 0x2000"):
            m.view(0x1FF0, 0x20)
        with pytest.raises(ValueError):
            m.view(-1, 1)
        with pytest.raises(ValueError):
            m.peek(0, 0x2001)
    with pytest.raises(ValueError, match="closed"):
        m.view(0, 1)


def test_derived_view_blocks_close_until_released(mapper: Mapper) -> None:
    m = mapper.map(memfd(8192), gpa=0, size=8192, mmap_offset=0)
    derived = m.view(0, 100)[10:20]
    with pytest.raises(MappingError) as info:
        m.close()
    assert info.value.kind == "views-in-use" and "gpa=0x0" in str(info.value)
    assert not m.closed and mapper.stats.maps == 1
    derived.release()
    m.close()
    assert m.closed and mapper.stats.maps == 0


def test_many_views_do_not_accumulate(mapper: Mapper) -> None:
    with mapper.map(memfd(8192), gpa=0, size=8192, mmap_offset=0) as m:
        for i in range(10_000):
            m.view(i % 4096, 8)[0] = 1
        assert len(m._views) < 200


def test_close_catches_a_munmap_that_mmap_close_ignored(mapper: Mapper) -> None:
    # stdlib mmap.close() ignores munmap errors: a hugetlb map closed with a length that is not
    # a multiple of the huge page size stays mapped. Build such a Mapping by hand (map() never
    # does) and check close() notices and unmaps it.
    fd = memfd(HPAGE, "huge", os.MFD_HUGETLB)
    mm = mmap.mmap(fd, 1 * MiB, flags=mmap.MAP_SHARED | mapping_mod.MAP_NORESERVE)
    anchor = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(anchor)
    del anchor
    m = Mapping(
        mapper=mapper,
        mm=mm,
        map_base=base,
        kept_fd=None,
        request="ADD_MEM_REG",
        gpa=0,
        size=1 * MiB,
        mmap_offset=0,
        fd_offset=0,
        length=HPAGE,
        backing=probe_backing(fd),
        warnings=(),
    )
    os.close(fd)
    m.close()
    assert maps_overlapping(base, base + HPAGE) == []
    assert any("munmap failed silently" in w for w in m.warnings)


def test_close_catches_a_munmap_left_inside_a_merged_mapping(mapper: Mapper) -> None:
    # The kernel merges adjacent mappings of one file with contiguous offsets into one VMA, so
    # a regular memfd region's unmap can split a VMA, and a split can fail (ENOMEM at
    # vm.max_map_count) while mmap.close() says nothing. Build such a leftover by hand: the
    # region is the upper half of one 16 KiB VMA, and its own mm is a decoy that close()
    # unmaps instead. close() must notice the region still mapped and unmap just that half.
    fd = memfd(16384)
    whole = mmap.mmap(fd, 16384, flags=mmap.MAP_SHARED)
    anchor = ctypes.c_char.from_buffer(whole)
    low = ctypes.addressof(anchor)
    del anchor
    decoy_fd = memfd(4096)
    decoy = mmap.mmap(decoy_fd, 4096, flags=mmap.MAP_SHARED)
    os.close(decoy_fd)
    base = low + 8192
    m = Mapping(
        mapper=mapper,
        mm=decoy,
        map_base=base,
        kept_fd=None,
        request="REM_MEM_REG",
        gpa=0x8000,
        size=8192,
        mmap_offset=8192,
        fd_offset=8192,
        length=8192,
        backing=probe_backing(fd),
        warnings=(),
    )
    assert len(maps_overlapping(low, low + 16384)) == 1  # one VMA covers both halves
    m.close()
    assert maps_overlapping(base, base + 8192) == []
    assert any("munmap failed silently" in w for w in m.warnings)
    assert len(maps_overlapping(low, base)) == 1  # the neighbour half is left alone
    whole.close()
    os.close(fd)


def _reserve(length: int) -> int:
    """A private anonymous PROT_NONE reservation of ``length`` bytes (nothing is committed)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mapping_mod.MAP_NORESERVE
    got = _libc.mmap(None, length, PROT_NONE, flags, -1, 0)
    assert got not in (None, MAP_FAILED), os.strerror(ctypes.get_errno())
    return int(got)


def _mm_whose_close_fails() -> tuple[mmap.mmap, int]:
    """A stdlib mmap whose close() leaves it mapped and the mapping count unchanged: a hugetlb
    map of 1 MiB, whose munmap the kernel refuses (EINVAL: not a whole huge page) and
    mmap.close() ignores. Returns it and its address (munmap a whole huge page there after)."""
    fd = memfd(HPAGE, "huge", os.MFD_HUGETLB)
    mm = mmap.mmap(fd, 1 * MiB, flags=mmap.MAP_SHARED | mapping_mod.MAP_NORESERVE)
    os.close(fd)
    anchor = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(anchor)
    del anchor
    return mm, base


def _fill_to_max_map_count() -> tuple[int, int]:
    """Split a PROT_NONE reservation page by page (mprotect) until the kernel says ENOMEM: the
    process then has exactly vm.max_map_count mappings (mm/vma.c __split_vma refuses at the
    limit), and any munmap that would split a VMA in three fails with ENOMEM. Returns the
    reservation (address, length) for munmap."""
    limit = max_map_count()
    assert limit is not None
    length = (limit + 64) * PAGE
    filler = _reserve(length)
    for page in range(0, limit + 64, 2):
        if _libc.mprotect(filler + page * PAGE, PAGE, mmap.PROT_READ) != 0:
            assert ctypes.get_errno() == errno.ENOMEM, os.strerror(ctypes.get_errno())
            return filler, length
    _libc.munmap(filler, length)
    pytest.fail(f"{limit + 64} pages split without reaching vm.max_map_count {limit}")


def test_close_that_the_kernel_refused_unmaps_on_the_next_close(mapper: Mapper) -> None:
    # A region inside one VMA (the kernel merges adjacent mappings of one file) at
    # vm.max_map_count: its munmap would split the VMA in three, and the kernel refuses (ENOMEM).
    # close() must say so and keep the region mapped, and a later close() must try again, which
    # works once the process has fewer mappings.
    fd = memfd(3 * PAGE)
    whole = mmap.mmap(fd, 3 * PAGE, flags=mmap.MAP_SHARED)  # one VMA; the region is its middle
    anchor = ctypes.c_char.from_buffer(whole)
    base = ctypes.addressof(anchor) + PAGE
    del anchor
    decoy, decoy_base = _mm_whose_close_fails()  # so m.close() leaves the count at the limit
    m = Mapping(
        mapper=mapper,
        mm=decoy,
        map_base=base,
        kept_fd=None,
        request="ADD_MEM_REG",
        gpa=0x8000,
        size=PAGE,
        mmap_offset=PAGE,
        fd_offset=PAGE,
        length=PAGE,
        backing=probe_backing(fd),
        warnings=(),
    )
    gc.disable()  # no arena freed while the count sits at the limit
    filler, length = _fill_to_max_map_count()
    try:
        with pytest.raises(MappingError) as info:
            m.close()
    finally:
        _libc.munmap(filler, length)
        gc.enable()
    try:
        err = info.value
        assert err.kind == "munmap-failed" and err.errno == errno.ENOMEM, str(err)
        assert "ENOMEM" in str(err) and "vm.max_map_count" in str(err) and "gpa=0x8000" in str(err)
        assert maps_overlapping(base, base + PAGE) != [], "the refused region must stay mapped"
        m.close()  # the process is below the limit again: this close unmaps the region
        assert maps_overlapping(base, base + PAGE) == []
        assert len(maps_overlapping(base - PAGE, base)) == 1  # the neighbours are left alone
        assert len(maps_overlapping(base + PAGE, base + 2 * PAGE)) == 1
        m.close()  # idempotent once unmapped
    finally:
        whole.close()
        os.close(fd)
        assert _libc.munmap(decoy_base, HPAGE) == 0


# --- refusals ------------------------------------------------------------------------------------

Case = Callable[[Path, list[int]], tuple[int, dict[str, Any], str]]


def _pipe(tmp: Path, extra: list[int]) -> tuple[int, dict[str, Any], str]:
    r, w = os.pipe()
    extra.append(w)
    return r, {"gpa": 0x1_0000_0000, "size": 1 * GiB, "mmap_offset": 0}, "pipe"


def _socket(tmp: Path, extra: list[int]) -> tuple[int, dict[str, Any], str]:
    a, b = socket.socketpair()
    extra.append(b.detach())
    return a.detach(), {"gpa": 0x1000, "size": 0x1000, "mmap_offset": 0}, "socket"


def _eventfd(tmp: Path, extra: list[int]) -> tuple[int, dict[str, Any], str]:
    return os.eventfd(0), {"gpa": 0x2000, "size": 0x1000, "mmap_offset": 0}, "eventfd"


def _sealed(tmp: Path, extra: list[int]) -> tuple[int, dict[str, Any], str]:
    fd = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 * MiB)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    return fd, {"gpa": 0x10_0000, "size": 1 * MiB, "mmap_offset": 0}, "memfd"


def _read_only(tmp: Path, extra: list[int]) -> tuple[int, dict[str, Any], str]:
    path = tmp / "ro.bin"
    path.write_bytes(bytes(64 * KiB))
    fd = os.open(path, os.O_RDONLY)
    return fd, {"gpa": 0x20_0000, "size": 64 * KiB, "mmap_offset": 0}, "file"


def _past_eof(tmp: Path, extra: list[int]) -> tuple[int, dict[str, Any], str]:
    return memfd(1 * MiB), {"gpa": 0x40_0000, "size": 1 * MiB, "mmap_offset": 4096}, "memfd"


def _size_zero(tmp: Path, extra: list[int]) -> tuple[int, dict[str, Any], str]:
    return memfd(1 * MiB), {"gpa": 0x50_0000, "size": 0, "mmap_offset": 0}, "memfd"


def _overflow(tmp: Path, extra: list[int]) -> tuple[int, dict[str, Any], str]:
    kwargs = {"gpa": 0x60_0000, "size": 0x1000, "mmap_offset": (1 << 64) - 0x800}
    return memfd(1 * MiB), kwargs, "memfd"


def _max_mapped(tmp: Path, extra: list[int]) -> tuple[int, dict[str, Any], str]:
    return memfd(4 * MiB), {"gpa": 0x70_0000, "size": 4 * MiB, "mmap_offset": 0}, "memfd"


REFUSALS: list[tuple[str, Case, str, str]] = [
    # (id, case, MappingError.kind, words of the reason or the fix)
    ("pipe", _pipe, "not-mappable", "share=on"),
    ("socket", _socket, "not-mappable", "share=on"),
    ("eventfd", _eventfd, "not-mappable", "share=on"),
    ("sealed", _sealed, "sealed", "F_SEAL_WRITE"),
    ("read-only", _read_only, "read-only", "O_RDWR"),
    (
        "past-eof",
        _past_eof,
        "past-eof",
        "file size 0x100000 (1 MiB) < mmap_offset + size = 0x101000",
    ),
    ("size-0", _size_zero, "empty", "size 0"),
    ("overflow", _overflow, "overflow", "overflows 2^64"),
    ("max-mapped", _max_mapped, "max-mapped", "max_mapped 0x100000"),
]


@pytest.mark.parametrize(
    ("case", "kind", "words"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_refusals_explain_and_leak_nothing(
    tmp_path: Path, case: Case, kind: str, words: str
) -> None:
    fds_before = open_fds()
    maps_before = file_map_lines()
    mapper = Mapper(max_mapped=1 * MiB)
    extra: list[int] = []
    fd, kwargs, backing_kind = case(tmp_path, extra)
    with pytest.raises(MappingError) as info:
        mapper.map(fd, **kwargs)
    err = info.value
    text = str(err)
    assert err.kind == kind
    assert f"gpa={kwargs['gpa']:#x}" in text
    assert f"size={kwargs['size']:#x}" in text
    assert f"mmap_offset={kwargs['mmap_offset']:#x}" in text
    assert f"Backing: {backing_kind} " in text
    assert "Fix: " in text
    assert words in text
    assert err.details["gpa"] == kwargs["gpa"]
    for other in extra:
        os.close(other)
    mapper.close()
    assert open_fds() == fds_before  # the fd was consumed even though mapping failed
    assert file_map_lines() == maps_before
    assert mapper.stats.maps == 0


def test_closed_fd_is_reported_not_crashed(mapper: Mapper) -> None:
    fd = memfd(4096)
    os.close(fd)
    with pytest.raises(MappingError) as info:
        mapper.map(fd, gpa=0x1000, size=0x1000, mmap_offset=0)
    assert info.value.kind == "bad-fd" and info.value.errno == errno.EBADF


def test_injected_enomem_shows_max_map_count(mapper: Mapper) -> None:
    fds_before = open_fds()
    with pytest.raises(MappingError) as info:
        mapper.map(
            memfd(2 * MiB), gpa=0x1_0000_0000, size=2 * MiB, mmap_offset=0, fail_errno=errno.ENOMEM
        )
    err = info.value
    text = str(err)
    assert err.kind == "enomem" and err.errno == errno.ENOMEM
    assert f"/proc/sys/vm/max_map_count {max_map_count()}" in text
    assert "mappings (/proc/self/maps lines)" in text
    assert "this Mapper maps 0 regions" in text
    assert "[injected fault]" in text and "mmap was not called" in text
    assert "this ENOMEM was injected; remove the rule (vhostmem-ctl inject --clear)" in text
    assert "gpa=0x100000000-0x1001fffff size=0x200000 (2 MiB)" in text
    assert "Backing: memfd" in text
    assert err.details["max_map_count"] == max_map_count()
    assert open_fds() == fds_before


def test_kernel_mmap_failure_names_region_uaddr_errno_backing_and_fix(mapper: Mapper) -> None:
    # A real refusal by the kernel: sysfs attributes have no mmap (kernfs_fop_mmap: ENODEV).
    # The file is only opened, never written.
    fd = os.open(POOL + "nr_hugepages", os.O_RDWR | os.O_CLOEXEC)
    with pytest.raises(MappingError) as info:
        mapper.map(
            fd,
            gpa=0x1_4000_0000,
            size=0x1000,
            mmap_offset=0,
            request="SET_MEM_TABLE",
            uaddr=0x7F12_3400_0000,
        )
    err = info.value
    text = str(err)
    assert (err.kind, err.errno) == ("enodev", errno.ENODEV)
    assert text.startswith(
        "SET_MEM_TABLE gpa=0x140000000-0x140000fff size=0x1000 (4 KiB) "
        "uaddr=0x7f1234000000 mmap_offset=0x0: "
    )
    assert "mmap failed: the kernel returned ENODEV (No such device)" in text
    assert "fd_offset 0x0, remainder 0x0, length 0x1000 (4 KiB), page 0x1000" in text
    assert f"Backing: file '{POOL}nr_hugepages' (page 4 KiB" in text
    assert "Fix: the filesystem does not support mmap" in text
    assert "injected" not in text
    assert err.details["uaddr"] == 0x7F12_3400_0000


def test_injected_other_errno_names_it(mapper: Mapper) -> None:
    with pytest.raises(MappingError) as info:
        mapper.map(memfd(4096), gpa=0, size=4096, mmap_offset=0, fail_errno=errno.EACCES)
    assert info.value.kind == "eacces" and "EACCES (Permission denied)" in str(info.value)


# --- probe ---------------------------------------------------------------------------------------


def test_probe_backing_kinds(tmp_path: Path) -> None:
    fds: list[int] = []
    try:
        fd = memfd(4096, "probe", os.MFD_ALLOW_SEALING)
        fds.append(fd)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
        b = probe_backing(fd)
        assert (b.kind, b.page_size, b.st_size, b.writable) == ("memfd", 4096, 4096, True)
        assert b.target == "/memfd:probe (deleted)" and b.seals == ("F_SEAL_GROW",)
        assert b.st_ino == os.fstat(fd).st_ino

        fds.append(memfd(0, "h", os.MFD_HUGETLB))
        b = probe_backing(fds[-1])
        assert (b.kind, b.page_size, b.fs_magic) == ("memfd-hugetlb", HPAGE, 0x958458F6)

        shm = Path("/dev/shm") / f"vhostmem-test-{os.getpid()}"
        fds.append(os.open(shm, os.O_RDWR | os.O_CREAT, 0o600))
        shm.unlink()
        assert probe_backing(fds[-1]).kind == "tmpfs"

        (tmp_path / "f").write_bytes(b"x")
        fds.append(os.open(tmp_path / "f", os.O_RDONLY))
        b = probe_backing(fds[-1])
        assert (b.kind, b.writable, b.access) == ("file", False, "read-only")

        fds.append(os.open(tmp_path, os.O_RDONLY))
        assert probe_backing(fds[-1]).kind == "directory"
        fds.append(os.open("/dev/null", os.O_RDWR))
        assert probe_backing(fds[-1]).kind == "char-device"
        fds.append(os.eventfd(0))
        assert probe_backing(fds[-1]).kind == "eventfd"
        r, w = os.pipe()
        fds += [r, w]
        assert probe_backing(r).kind == "pipe"
        a, c = socket.socketpair()
        fds += [a.detach(), c.detach()]
        assert probe_backing(fds[-1]).kind == "socket"
    finally:
        for fd in fds:
            os.close(fd)


def test_limits_helpers() -> None:
    old, new = raise_nofile_limit()
    assert new >= old
    limit = max_map_count()
    assert limit is not None and limit > 1000


# --- peek on shmem -------------------------------------------------------------------------------


def test_peek_populated_shmem_page_returns_the_bytes(mapper: Mapper) -> None:
    fd = memfd(64 * KiB)
    data = pattern(4096, seed=3)
    os.pwrite(fd, data, 0x3000)
    with mapper.map(fd, gpa=0x10_0000, size=32 * KiB, mmap_offset=0x1000) as m:
        p = m.peek(0x2000, 4096)  # region offset 0x2000 = file offset 0x3000
        assert p.complete and p.data() == data and p.gpa == 0x10_2000
        assert [(c.state, c.source) for c in p.chunks] == [("data", "mapping")]
        assert p.hex() == data.hex()


def test_peek_untouched_shmem_page_is_unpopulated_and_stays_so(mapper: Mapper) -> None:
    fd = memfd(64 * KiB)
    check = os.dup(fd)
    os.pwrite(fd, b"A" * 4096, 0)  # page 0 populated, page 1 not
    blocks = os.fstat(check).st_blocks
    with mapper.map(fd, gpa=0, size=64 * KiB, mmap_offset=0) as m:
        p = m.peek(0, 8192)
        assert [(c.offset, c.length, c.state) for c in p.chunks] == [
            (0, 4096, "data"),
            (4096, 4096, "unpopulated"),
        ]
        assert p.chunks[1].data is None
        assert p.data(fill=0xEE)[4096:] == b"\xee" * 4096
        assert p.hex()[8192:8200] == "________"
        assert not p.complete
        assert resident(m.map_base + 4096, 4096) == [0]
        assert os.fstat(check).st_blocks == blocks
    os.close(check)


def test_peek_punched_page_is_unpopulated(mapper: Mapper) -> None:
    fd = memfd(64 * KiB)
    check = os.dup(fd)
    with mapper.map(fd, gpa=0, size=64 * KiB, mmap_offset=0) as m:
        m.view(0x4000, 4096)[:] = b"B" * 4096
        assert m.peek(0x4000, 16).data() == b"B" * 16
        punch_hole(check, 0x4000, 4096)
        p = m.peek(0x4000, 4096)
        assert [c.state for c in p.chunks] == ["unpopulated"]
        assert resident(m.map_base + 0x4000, 4096) == [0]
    os.close(check)


def test_peek_turns_sigbus_into_fault(mapper: Mapper, monkeypatch: pytest.MonkeyPatch) -> None:
    # A page past EOF would SIGBUS if touched. Pretend mincore says resident so peek reads it
    # through /proc/self/mem: the kernel answers EIO and the process lives.
    fd = memfd(8192)
    check = os.dup(fd)
    with mapper.map(fd, gpa=0, size=8192, mmap_offset=0) as m:
        os.ftruncate(check, 4096)
        monkeypatch.setattr("vhostmem.mapping.peek.mincore", lambda address, length: b"\x01" * 2)
        p = m.peek(0, 8192)
        assert [(c.state, c.errno) for c in p.chunks] == [("data", None), ("fault", errno.EIO)]
        assert p.hex().endswith("!!")
        assert p.chunks[1].error is not None and "EIO" in p.chunks[1].error
    os.close(check)


# --- hugetlb -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mmap_offset", [4 * KiB, 1 * MiB, HPAGE + 4 * KiB])
def test_hugetlb_odd_mmap_offset(hugepages: int, mmap_offset: int) -> None:
    fds_before = open_fds()
    free_before = pool()
    mapper = Mapper()
    fd = memfd(4 * HPAGE, "huge", os.MFD_HUGETLB)
    check = os.dup(fd)
    size = 1 * MiB
    m = mapper.map(fd, gpa=0x1_0000_0000, size=size, mmap_offset=mmap_offset)
    assert m.backing.kind == "memfd-hugetlb" and m.backing.page_size == HPAGE
    assert m.fd_offset == mmap_offset // HPAGE * HPAGE
    assert m.remainder == mmap_offset % HPAGE
    assert m.length == HPAGE and m.map_base % HPAGE == 0
    assert m.fds_held == 2 and mapper.stats.fds_held == 2
    # the pool as the shortfall check read it when mapping (MAP_NORESERVE took no page)
    assert m.pool is not None and m.pool["free"] == free_before == pool()
    base, end = m.map_base, m.map_base + m.length

    head, tail = pattern(64, seed=1), pattern(64, seed=2)
    m.view(0, 64)[:] = head
    m.view(size - 64, 64)[:] = tail
    assert os.pread(check, 64, mmap_offset) == head
    assert os.pread(check, 64, mmap_offset + size - 64) == tail
    other = mmap.mmap(check, 4 * HPAGE, flags=mmap.MAP_SHARED | mapping_mod.MAP_NORESERVE)
    assert other[mmap_offset : mmap_offset + 64] == head
    other[mmap_offset + 100 : mmap_offset + 104] = b"QEMU"
    assert bytes(m.view(100, 4)) == b"QEMU"
    assert m.peek(100, 4).data() == b"QEMU"
    other.close()

    m.close()
    assert maps_overlapping(base, end) == []
    mapper.close()
    os.close(check)
    assert pool() == free_before
    assert open_fds() == fds_before


def test_hugetlb_peek_reads_pages_our_mapping_never_touched(hugepages: int) -> None:
    fd = memfd(4 * HPAGE, "huge", os.MFD_HUGETLB)
    check = os.dup(fd)
    try:
        other = mmap.mmap(check, 4 * HPAGE, flags=mmap.MAP_SHARED | mapping_mod.MAP_NORESERVE)
        other[HPAGE + 10 : HPAGE + 20] = b"0123456789"  # QEMU populates page 1
        with Mapper() as mapper:
            m = mapper.map(fd, gpa=0x2_0000_0000, size=3 * HPAGE, mmap_offset=HPAGE)
            free = pool()
            assert resident(m.map_base, HPAGE)[0] == 0  # mincore sees only our page tables
            p = m.peek(10, 10)
            assert p.data() == b"0123456789"
            assert [(c.state, c.source) for c in p.chunks] == [("data", "file")]
            # page 2 is a hole: zeros (or unpopulated), and nothing allocated
            hole = m.peek(HPAGE, 4096)
            assert hole.chunks[0].state in ("data", "unpopulated")
            assert hole.data() == bytes(4096)
            assert pool() == free
            assert resident(m.map_base, 3 * HPAGE)[:: HPAGE // 4096] == [0, 0, 0]
            # a page populated through our own mapping is read through it
            m.view(2 * HPAGE + 5, 3)[:] = b"abc"
            p = m.peek(2 * HPAGE, 8)
            assert p.data() == b"\0" * 5 + b"abc" and p.chunks[0].source == "mapping"
        other.close()
    finally:
        os.close(check)


def test_hugetlb_page_past_eof_is_a_fault_not_a_crash(hugepages: int) -> None:
    fd = memfd(2 * HPAGE, "huge", os.MFD_HUGETLB)
    check = os.dup(fd)
    with Mapper() as mapper:
        m = mapper.map(fd, gpa=0, size=2 * HPAGE, mmap_offset=0)
        os.ftruncate(check, HPAGE)
        p = m.peek(HPAGE - 4, 8)
        assert [c.state for c in p.chunks] == ["data", "fault"]
        assert "past end of file" in p.chunks[1].detail
    os.close(check)


def test_hugetlb_injected_einval_says_injected_and_does_not_blame_aligned_numbers(
    hugepages: int,
) -> None:
    # The layout is aligned (vhostmem aligns it), so alignment cannot be the cause: the words
    # must say the errno was injected and that the numbers are multiples of the page.
    with Mapper() as mapper, pytest.raises(MappingError) as info:
        mapper.map(
            memfd(2 * HPAGE, "huge", os.MFD_HUGETLB),
            gpa=0x1000_0000,
            size=HPAGE,
            mmap_offset=0x1000,
            fail_errno=errno.EINVAL,
            uaddr=0x7F00_0000_1000,
        )
    text = str(info.value)
    assert info.value.kind == "einval" and info.value.details["injected"] is True
    assert text.startswith(
        "ADD_MEM_REG gpa=0x10000000-0x101fffff size=0x200000 (2 MiB) "
        "uaddr=0x7f0000001000 mmap_offset=0x1000: mmap was not called: a "
        "fault rule (errno=EINVAL) made it fail as if the kernel had returned "
        "EINVAL (Invalid argument) [injected fault]; "
    )
    assert (
        "fd_offset 0x0 and length 0x400000 are both multiples of the huge page size "
        "0x200000 (2 MiB), so alignment is not the cause"
    ) in text
    assert "mod page" not in text and "misalign" not in text and "is not a multiple" not in text
    assert "Backing: memfd-hugetlb" in text and "(page 2 MiB" in text
    assert "Fix: nothing to change in the set-up: this EINVAL was injected" in text


def test_hugetlb_injected_enomem_shows_the_pool(hugepages: int) -> None:
    with Mapper() as mapper, pytest.raises(MappingError) as info:
        mapper.map(
            memfd(HPAGE, "huge", os.MFD_HUGETLB),
            gpa=0,
            size=HPAGE,
            mmap_offset=0,
            fail_errno=errno.ENOMEM,
        )
    assert f"hugetlb pool 2048kB: free {pool()}" in str(info.value)
    assert info.value.details["hugetlb_pool"]["free"] == pool()


def _touch_first_page(fd: int) -> None:
    """Allocate the file's first huge page by writing through a mapping of our own."""
    with mmap.mmap(fd, HPAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
        mm[0] = 1


def test_hugetlb_region_beyond_free_pool_warns_with_the_numbers(hugepages: int) -> None:
    # Rule (Mapper.shortfalls): pages a file's live regions span, counted once, less the pages
    # the file holds, against free_hugepages. Nothing fails at map time (MAP_NORESERVE); the
    # words must say so, with the numbers read from sysfs.
    with Mapper() as mapper:
        small = memfd(2 * HPAGE, "small", os.MFD_HUGETLB)
        fits = mapper.map(small, gpa=0, size=2 * HPAGE, mmap_offset=0, uaddr=0x7F00_0000_0000)
        assert fits.warnings == () and mapper.shortfalls() == []
        fits.close()

        pages = pool() + 3  # one page allocated below, so the pool lacks 3 for the rest
        fd = memfd(pages * HPAGE, "big", os.MFD_HUGETLB)
        _touch_first_page(fd)
        second = os.dup(fd)
        gpa, uaddr = 0x1_0000_0000, 0x7F10_0000_0000
        m = mapper.map(fd, gpa=gpa, size=pages * HPAGE, mmap_offset=0, uaddr=uaddr)
        free, resv, total = pool(), pool("resv_hugepages"), pool("nr_hugepages")
        short = pages - 1 - free
        assert short == 3
        [warning] = m.warnings
        end = gpa + pages * HPAGE - 1
        assert warning.startswith(
            f"ADD_MEM_REG gpa=0x{gpa:x}-0x{end:x} size=0x{pages * HPAGE:x} "
            f"({human_size(pages * HPAGE)}) uaddr=0x{uaddr:x} mmap_offset=0x0: "
            "huge page shortfall: the "
            f"region spans {pages} pages of 2 MiB (memfd-hugetlb '/memfd:big (deleted)'); the "
            f"file holds 1 pages (allocated); the 2 MiB pool has {free} free pages, {resv} of "
            f"them reserved (of {total} in all): {pages - 1} pages still to allocate, {short} "
            f"pages short if every page is touched. Served anyway:"
        )
        assert "SIGBUS: QEMU (the guest's accesses run in QEMU's vCPU threads" in warning
        assert "vhostmem when --tap writes a guest buffer there" in warning
        assert "vhostmem's peek does not touch such pages" in warning
        assert (
            f"Fix: reserve {short} more pages of 2 MiB: echo {total + short} > {POOL}nr_hugepages"
        ) in warning
        [found] = mapper.shortfalls()
        assert (found.mapping, found.region_pages, found.held, found.free, found.short) == (
            m,
            pages,
            1,
            free,
            short,
        )

        # A second region of the same file (its last two pages): the file counts once, so
        # the shortfall stays 3, and both regions are listed.
        tail = mapper.map(
            second,
            gpa=0x2_0000_0000,
            size=2 * HPAGE,
            mmap_offset=(pages - 2) * HPAGE,
            request="SET_MEM_TABLE",
        )
        [tail_warning] = tail.warnings
        assert (
            f"its file has 2 regions mapped here, {pages} pages counted once; the file "
            f"holds 1 pages"
        ) in tail_warning
        assert f"{short} pages short if every page is touched" in tail_warning
        assert [(s.gpa, s.file_regions, s.short) for s in mapper.shortfalls()] == [
            (gpa, 2, short),
            (0x2_0000_0000, 2, short),
        ]
        m.close()
        assert [(s.gpa, s.region_pages, s.short) for s in mapper.shortfalls()] == []
        tail.close()


def test_hugetlb_file_covered_by_its_reservation_is_not_short(hugepages: int) -> None:
    # A mapping without MAP_NORESERVE (QEMU's hugetlb backend with reserve=on) reserves the
    # file's pages; they stay counted in free_hugepages. That file is covered; a second file
    # (reserve=off) that needs more than the rest of the pool is the one listed.
    with Mapper() as mapper:
        reserved_pages = 4
        boot = memfd(reserved_pages * HPAGE, "boot", os.MFD_HUGETLB)
        with mmap.mmap(
            boot, reserved_pages * HPAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        ):
            assert pool("resv_hugepages") >= reserved_pages
            covered = mapper.map(os.dup(boot), gpa=0, size=reserved_pages * HPAGE, mmap_offset=0)
            assert covered.warnings == ()
            pages = pool() - reserved_pages + 2  # 2 more than the unreserved free pages
            vmem = memfd(pages * HPAGE, "vmem", os.MFD_HUGETLB)
            m = mapper.map(vmem, gpa=0x1_0000_0000, size=pages * HPAGE, mmap_offset=0)
            free, resv = pool(), pool("resv_hugepages")
            [found] = mapper.shortfalls()
            assert found.mapping is m and found.other_missing == reserved_pages
            assert (found.region_pages, found.held, found.free, found.resv) == (
                pages,
                0,
                free,
                resv,
            )
            assert found.short == pages + reserved_pages - free == 2
            [warning] = m.warnings
            assert (
                "other hugetlb files of 2 MiB pages mapped here still lack 4 pages: "
                f"{pages + 4} pages still to allocate, 2 pages short"
            ) in warning
            m.close()
            covered.close()
        os.close(boot)
