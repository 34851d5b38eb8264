"""Typed, immutable views of vhost-user messages: what ``codec`` returns and accepts.

Field names are the vhost-user.rst names. Nothing here knows about bytes;
``vhostmem.protocol.codec`` converts to and from the Construct definitions in
``vhostmem.protocol.structs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias, final

from vhostmem.protocol.codes import FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION_MASK, Request

__all__ = [
    "Config",
    "DeviceStateParams",
    "Header",
    "Inflight",
    "Log",
    "MemRegMsg",
    "MemoryRegion",
    "MemoryTable",
    "Payload",
    "VringAddress",
    "VringFile",
    "VringState",
]


@final
@dataclass(frozen=True, slots=True)
class Header:
    """The 12-byte message header.

    ``request`` is a ``Request`` when the code is known and the plain ``int`` otherwise, so an
    unknown request can still be framed and answered.
    """

    request: Request | int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        """The sender asked for a REPLY_ACK."""
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        """The REPLY bit is set."""
        return bool(self.flags & FLAG_REPLY)

    @property
    def version(self) -> int:
        """Bits 0-1 of ``flags``; 1 is the only version."""
        return self.flags & FLAG_VERSION_MASK


@final
@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One guest memory region (rst *Memory region description*)."""

    guest_phys_addr: int
    memory_size: int
    #: The front-end's (QEMU's) virtual address of the region.
    userspace_addr: int
    #: Offset of the region in the fd that comes with the message.
    mmap_offset: int


@final
@dataclass(frozen=True, slots=True)
class MemoryTable:
    """The whole table of SET_MEM_TABLE; fds arrive in the same order as ``regions``."""

    regions: tuple[MemoryRegion, ...]


@final
@dataclass(frozen=True, slots=True)
class MemRegMsg:
    """ADD_MEM_REG / REM_MEM_REG payload (rst *Single memory region description*)."""

    region: MemoryRegion


@final
@dataclass(frozen=True, slots=True)
class VringState:
    """struct vhost_vring_state."""

    index: int
    num: int


@final
@dataclass(frozen=True, slots=True)
class VringAddress:
    """struct vhost_vring_addr (wire order: desc, used, avail, log)."""

    index: int
    #: Bit 0 is VHOST_VRING_F_LOG.
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@final
@dataclass(frozen=True, slots=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: ring index (bits 0-7) and NOFD (bit 8)."""

    index: int
    #: No fd comes with the message (the ring is polled / not signalled).
    nofd: bool


@final
@dataclass(frozen=True, slots=True)
class Log:
    """VhostUserLog of SET_LOG_BASE."""

    mmap_size: int
    mmap_offset: int


@final
@dataclass(frozen=True, slots=True)
class Config:
    """VhostUserConfig of GET_CONFIG / SET_CONFIG; ``size == len(region)`` on the wire."""

    offset: int
    size: int
    #: 0 = written by the front-end, 1 = during live migration.
    flags: int
    region: bytes


@final
@dataclass(frozen=True, slots=True)
class Inflight:
    """VhostUserInflight of GET_INFLIGHT_FD / SET_INFLIGHT_FD (24 bytes on the wire)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@final
@dataclass(frozen=True, slots=True)
class DeviceStateParams:
    """SET_DEVICE_STATE_FD parameters."""

    #: 0 = save (back-end writes), 1 = load (back-end reads).
    direction: int
    #: 0 = stopped, the only phase defined.
    phase: int


#: Every decoded payload: ``None`` for "none", ``int`` for a u64, ``bytes`` for raw/unknown.
Payload: TypeAlias = (
    int
    | bytes
    | MemoryTable
    | MemRegMsg
    | VringState
    | VringAddress
    | VringFile
    | Log
    | Config
    | Inflight
    | DeviceStateParams
    | None
)
