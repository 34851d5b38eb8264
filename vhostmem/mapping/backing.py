"""What an fd received from the front-end is: the backing probe.

``probe_backing`` answers, for one fd, the questions mapping it raises: can it be mapped at
all (a pipe, a socket or an eventfd cannot), with which page size (hugetlbfs maps and unmaps
whole huge pages only), is it opened read-write, is it sealed against writes, how long is the
file. Hugetlbfs is recognised the way QEMU's ``qemu_fd_getpagesize`` and libvhost-user's
``get_fd_hugepagesize`` do: ``fstatfs`` ``f_type == HUGETLBFS_MAGIC``, page size ``f_bsize``.

The probe refuses nothing: ``Diagnosis.refuse_unmappable`` decides, and ``Mapper`` remembers
proven backings.
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import asdict, dataclass
from typing import Any, Final, final

from vhostmem.mapping.linux import (
    F_SEAL_EXEC,
    F_SEAL_FUTURE_WRITE,
    HUGETLBFS_MAGIC,
    PAGESIZE,
    TMPFS_MAGIC,
    fstatfs_type,
)
from vhostmem.regions import human_size

#: memfd seals by name (memfd_create(2), fcntl(2) F_GET_SEALS).
_SEAL_NAMES: Final = (
    (fcntl.F_SEAL_SEAL, "F_SEAL_SEAL"),
    (fcntl.F_SEAL_SHRINK, "F_SEAL_SHRINK"),
    (fcntl.F_SEAL_GROW, "F_SEAL_GROW"),
    (fcntl.F_SEAL_WRITE, "F_SEAL_WRITE"),
    (F_SEAL_FUTURE_WRITE, "F_SEAL_FUTURE_WRITE"),
    (F_SEAL_EXEC, "F_SEAL_EXEC"),
)

#: Kinds ``mmap(MAP_SHARED)`` accepts; any other kind has no mmap or no file behind it.
MAPPABLE_KINDS: Final = frozenset({"memfd", "memfd-hugetlb", "hugetlbfs", "tmpfs", "file"})
HUGETLB_KINDS: Final = frozenset({"memfd-hugetlb", "hugetlbfs"})


@final
@dataclass(frozen=True, slots=True)
class Backing:
    """What an fd received from the front-end is, as far as mapping it is concerned.

    ``kind`` is one of ``memfd``, ``memfd-hugetlb``, ``hugetlbfs``, ``tmpfs``, ``file`` (mappable)
    or ``pipe``, ``socket``, ``eventfd``, ``directory``, ``char-device``, ``other`` (not mappable).
    """

    kind: str
    page_size: int
    st_dev: int
    st_ino: int
    st_size: int
    target: str
    seals: tuple[str, ...]
    writable: bool
    access: str  #: ``read-write``, ``read-only`` or ``write-only`` (fcntl F_GETFL & O_ACCMODE)
    fs_magic: int | None

    @property
    def mappable(self) -> bool:
        return self.kind in MAPPABLE_KINDS

    @property
    def hugetlb(self) -> bool:
        return self.kind in HUGETLB_KINDS

    def describe(self) -> str:
        """One line for messages: kind, target, page size, file size, access, seals."""
        text = f"{self.kind} {self.target!r}"
        if self.mappable:
            text += (
                f" (page {human_size(self.page_size)}, file size {self.st_size:#x}"
                f" = {human_size(self.st_size)}, {self.access}"
            )
            if self.seals:
                text += ", seals " + "|".join(self.seals)
            text += ")"
        return text

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        data = asdict(self)
        data["seals"] = list(self.seals)
        return data


def probe_backing(fd: int, st: os.stat_result | None = None) -> Backing:
    """Find out what ``fd`` is: kind, page size, identity, size, seals, access mode.

    Hugetlbfs is detected like QEMU's ``qemu_fd_getpagesize`` and libvhost-user's
    ``get_fd_hugepagesize``: ``fstatfs`` ``f_type == HUGETLBFS_MAGIC``, page size ``f_bsize``.
    Every call looks afresh (the Mapper remembers proven backings itself).

    Args:
        st: ``os.fstat(fd)`` if the caller has just made it.

    Raises:
        OSError: the fd is not open (EBADF).
    """
    if st is None:
        st = os.fstat(fd)
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = "?"
    magic = fstatfs_type(fd)
    try:
        accmode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        accmode = os.O_RDONLY
    access = {os.O_RDWR: "read-write", os.O_WRONLY: "write-only"}.get(accmode, "read-only")
    mode = st.st_mode
    page_size = PAGESIZE
    seals: tuple[str, ...] = ()

    if target == "anon_inode:[eventfd]":
        kind = "eventfd"
    elif target.startswith("anon_inode:"):
        kind = "other"
    elif stat.S_ISFIFO(mode):
        kind = "pipe"
    elif stat.S_ISSOCK(mode):
        kind = "socket"
    elif stat.S_ISDIR(mode):
        kind = "directory"
    elif stat.S_ISCHR(mode):
        kind = "char-device"
    elif stat.S_ISREG(mode):
        memfd = target.startswith("/memfd:")
        if magic is not None:
            hugetlb = magic == HUGETLBFS_MAGIC
        else:  # fstatfs failed: a memfd with huge blocks can only be MFD_HUGETLB
            hugetlb = memfd and st.st_blksize > PAGESIZE
        if hugetlb:
            kind = "memfd-hugetlb" if memfd else "hugetlbfs"
            page_size = os.fstatvfs(fd).f_bsize or st.st_blksize
        elif memfd:
            kind = "memfd"
        elif magic == TMPFS_MAGIC:
            kind = "tmpfs"
        else:
            kind = "file"
        if memfd:
            try:
                bits = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                bits = 0
            seals = tuple(name for bit, name in _SEAL_NAMES if bits & bit)
    else:
        kind = "other"

    return Backing(
        kind=kind,
        page_size=page_size,
        st_dev=st.st_dev,
        st_ino=st.st_ino,
        st_size=st.st_size,
        target=target,
        seals=seals,
        writable=access == "read-write",
        access=access,
        fs_magic=magic,
    )
