"""What an fd received from the front-end is: the backing probe."""


from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import asdict, dataclass
from typing import Any, Final, final

from vhostmem.mapping.linux import (
    _PAGESIZE,
    F_SEAL_EXEC,
    F_SEAL_FUTURE_WRITE,
    HUGETLBFS_MAGIC,
    TMPFS_MAGIC,
    _fstatfs_type,
)
from vhostmem.regions import human_size

_SEAL_NAMES: Final = (
    (fcntl.F_SEAL_SEAL, "F_SEAL_SEAL"),
    (fcntl.F_SEAL_SHRINK, "F_SEAL_SHRINK"),
    (fcntl.F_SEAL_GROW, "F_SEAL_GROW"),
    (fcntl.F_SEAL_WRITE, "F_SEAL_WRITE"),
    (F_SEAL_FUTURE_WRITE, "F_SEAL_FUTURE_WRITE"),
    (F_SEAL_EXEC, "F_SEAL_EXEC"),
)


MAPPABLE_KINDS: Final = frozenset({"memfd", "memfd-hugetlb", "hugetlbfs", "tmpfs", "file"})
HUGETLB_KINDS: Final = frozenset({"memfd-hugetlb", "hugetlbfs"})


# --- the backing of an fd ------------------------------------------------------------------------


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
            text += (f" (page {human_size(self.page_size)}, file size {self.st_size:#x}"
                     f" = {human_size(self.st_size)}, {self.access}")
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
    magic = _fstatfs_type(fd)
    try:
        accmode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        accmode = os.O_RDONLY
    access = {os.O_RDWR: "read-write", os.O_WRONLY: "write-only"}.get(accmode, "read-only")
    mode = st.st_mode
    page_size = _PAGESIZE
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
            hugetlb = memfd and st.st_blksize > _PAGESIZE
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
