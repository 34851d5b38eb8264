"""Linux calls: libc through ctypes, /proc and sysfs readers, resource limits.

The bottom of the package: everything here is a thin wrapper over one kernel interface, and
knows nothing of regions, backings or messages.

* libc through ctypes for what Python 3.11 lacks: ``mincore`` (mincore(2): one byte per base
  page, bit 0 = resident; ENOMEM where nothing is mapped), ``munmap`` (munmap(2), whose result
  stdlib ``mmap.close()`` ignores), ``fstatfs`` (statfs(2), for ``f_type``).
* /proc readers: ``/proc/self/maps`` (proc(5): one line per mapping, the inode in the fifth
  field), ``/proc/sys/vm/max_map_count``.
* sysfs: the huge page pools under ``/sys/kernel/mm/hugepages/`` (kernel
  Documentation/admin-guide/mm/hugetlbpage.rst).
* ``RLIMIT_NOFILE`` (getrlimit(2)).

Constants the Python modules do not export are given with the kernel header they come from.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
from typing import Final

#: ``MAP_NORESERVE`` (linux/mman.h); Python 3.11's mmap module does not export it.
MAP_NORESERVE: Final = 0x4000

HUGETLBFS_MAGIC: Final = 0x958458F6  #: ``statfs.f_type`` of hugetlbfs (linux/magic.h)
TMPFS_MAGIC: Final = 0x01021994  #: ``statfs.f_type`` of tmpfs / shmem (memfd without MFD_HUGETLB)

F_SEAL_FUTURE_WRITE: Final = 0x0010  #: linux/fcntl.h, not in Python's fcntl module
F_SEAL_EXEC: Final = 0x0020  #: linux/fcntl.h, not in Python's fcntl module

#: The base page size: the unit of mincore's answer.
PAGESIZE: Final = mmap.PAGESIZE


# --- libc through ctypes -------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.mincore.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fstatfs.restype = ctypes.c_int

# libatomic (GCC's runtime for the __atomic builtins): ``__atomic_fetch_or_1`` is the same
# locked OR that libvhost-user's ``vu_log_page`` gets from ``__sync_fetch_and_or``. Loaded on
# first use, so a system without it fails only when a dirty log is written.
_libatomic: ctypes.CDLL | None = None
#: ``__ATOMIC_SEQ_CST`` (GCC builtins documentation, "__atomic Builtins").
_ATOMIC_SEQ_CST: Final = 5


def fstatfs_type(fd: int) -> int | None:
    """``fstatfs(fd).f_type``, or None if the call fails (Python 3.11 has no os.fstatfs).

    ``struct statfs`` on 64-bit Linux (x86_64, arm64) starts with ``long f_type``; 256 bytes is
    more than the 120 the kernel writes.
    """
    buf = ctypes.create_string_buffer(256)
    if _libc.fstatfs(fd, buf) != 0:
        return None
    return int(ctypes.c_ulong.from_buffer(buf, 0).value) & 0xFFFFFFFF


# mincore's one-byte answer for a single page; only the trio thread unmaps, so one buffer does.
_ONE_PAGE_VEC: Final = ctypes.create_string_buffer(1)


def page_mapped(address: int) -> bool:
    """Whether the page at ``address`` is mapped: mincore fails with ENOMEM where nothing is.

    One ctypes call and no exception: every unmap asks it (see ``Mapping._verify_unmapped``).
    """
    return bool(_libc.mincore(address, PAGESIZE, _ONE_PAGE_VEC) == 0)


def mincore(address: int, length: int) -> bytes:
    """One byte per base page of ``[address, address + length)``; bit 0 set = resident.

    Raises:
        OSError: ENOMEM when part of the range is not mapped.
    """
    vec = ctypes.create_string_buffer((length + PAGESIZE - 1) // PAGESIZE)
    if _libc.mincore(address, length, vec) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return vec.raw


def atomic_or_u8(address: int, mask: int) -> int:
    """OR ``mask`` into the byte at ``address`` atomically; returns the byte as it was.

    Raises:
        OSError: libatomic.so.1 cannot be loaded (the fix is to install it: libatomic1).
    """
    global _libatomic
    lib = _libatomic
    if lib is None:
        lib = ctypes.CDLL("libatomic.so.1")
        lib.__atomic_fetch_or_1.argtypes = [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int]
        lib.__atomic_fetch_or_1.restype = ctypes.c_uint8
        _libatomic = lib
    return int(lib.__atomic_fetch_or_1(address, mask, _ATOMIC_SEQ_CST))


def munmap(address: int, length: int) -> int:
    """``munmap(address, length)`` through libc; 0 on success, else the errno."""
    if _libc.munmap(address, length) == 0:
        return 0
    return ctypes.get_errno()


def buffer_address(mm: mmap.mmap) -> int:
    """The address of an ``mmap.mmap``'s first byte (Python 3.11's mmap does not expose it).

    A ctypes object over the buffer exports it, so it is dropped at once: ``mmap.close()``
    raises BufferError while an export lives.
    """
    anchor = ctypes.c_char.from_buffer(mm)
    address = ctypes.addressof(anchor)
    del anchor
    return address


# --- arithmetic, /proc, sysfs, limits -----------------------------------------------------------


def align_down(value: int, align: int) -> int:
    return value - value % align


def align_up(value: int, align: int) -> int:
    return align_down(value + align - 1, align)


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def max_map_count() -> int | None:
    """``/proc/sys/vm/max_map_count``: how many mappings (VMAs) one process may have."""
    return _read_int("/proc/sys/vm/max_map_count")


def process_map_count() -> int:
    """Number of mappings (lines of ``/proc/self/maps``) this process has now."""
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


def hugetlb_pool(page_size: int) -> dict[str, int] | None:
    """The huge page pool of one page size, from ``/sys/kernel/mm/hugepages/hugepages-NkB/``.

    Returns:
        ``{"total", "free", "resv", "surplus"}`` in pages, or None if that size does not exist.
    """
    base = f"/sys/kernel/mm/hugepages/hugepages-{page_size // 1024}kB/"
    names = {
        "total": "nr_hugepages",
        "free": "free_hugepages",
        "resv": "resv_hugepages",
        "surplus": "surplus_hugepages",
    }
    pool: dict[str, int] = {}
    for key, name in names.items():
        value = _read_int(base + name)
        if value is None:
            return None
        pool[key] = value
    return pool


def raise_nofile_limit(wanted: int | None = None) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards the hard limit (never lowers it).

    Each mapped region holds at least one fd (stdlib mmap keeps a dup), so a full table
    (``--max-slots``, QEMU's vhost-user memslot limit) per connection needs more than the
    usual soft limit of 1024.

    Args:
        wanted: the soft limit wanted; None means the hard limit.

    Returns:
        ``(old_soft, new_soft)``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else wanted
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if soft != resource.RLIM_INFINITY and target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return soft, target
    return soft, soft


def pread_all(fd: int, length: int, offset: int) -> bytes:
    """``pread`` until ``length`` bytes or end of file; shorter only at end of file."""
    parts = []
    while length > 0:
        data = os.pread(fd, length, offset)
        if not data:
            break
        parts.append(data)
        length -= len(data)
        offset += len(data)
    return b"".join(parts)


def vma_at(address: int) -> tuple[int, int, int] | None:
    """``(start, end, inode)`` of the mapping containing ``address``, from /proc/self/maps."""
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start_s, _, end_s = fields[0].partition(b"-")
            start, end = int(start_s, 16), int(end_s, 16)
            if start <= address < end:
                return start, end, int(fields[4])
    return None
