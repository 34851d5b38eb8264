"""The vhost-user wire format as Construct definitions: the single source of truth for layouts.

One Struct per table of ``qemu/qemu:docs/interop/vhost-user.rst`` (10.0.2), *Message
Specification*, with the rst's field names. All numbers are "in the machine native byte order";
vhostmem runs on little-endian hosts (x86-64, aarch64), hence ``Int32ul``/``Int64ul``.

Padding is named and never validated (``c.Padding`` parses any bytes, builds zeros), as QEMU and
libvhost-user ignore it too.

The hot definitions also exist compiled (``*_COMPILED``, construct's ``.compile()``: generated
Python source instead of a walk over the Struct tree per parse, construct's "Compilation
feature" documentation), which fails with a bare ``struct.error`` and no path. The flat twins
(``*_FLAT``, ``flat_format``) go further: one ``struct`` call per fixed-size message.
``tools/bench`` measures the decode path.
``PAYLOAD_STRUCTS`` maps each ``PayloadKind`` to the struct ``codec`` uses. Containers built here
never leave ``protocol``: ``codec`` turns them into ``model`` dataclasses.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

import construct as c

from vhostmem.protocol.codes import HEADER_SIZE, REQUEST_PAYLOAD, PayloadKind

__all__ = [
    "CONFIG",
    "CONFIG_HEADER_SIZE",
    "DEVICE_STATE_PARAMS",
    "HEADER",
    "HEADER_COMPILED",
    "HEADER_FLAT",
    "INFLIGHT",
    "LOG",
    "MEMORY_REGION",
    "MEMORY_REGION_FLAT",
    "MEMORY_REGION_SIZE",
    "MEMORY_TABLE",
    "MEMORY_TABLE_COMPILED",
    "MEMORY_TABLE_HEADER_SIZE",
    "MEMORY_TABLE_HEAD_FLAT",
    "MEM_REG_MSG",
    "MEM_REG_MSG_COMPILED",
    "MEM_REG_MSG_FLAT",
    "MESSAGE",
    "PAYLOAD_DEFINITIONS",
    "PAYLOAD_SIZES",
    "PAYLOAD_STRUCTS",
    "U64",
    "U64_COMPILED",
    "U64_FLAT",
    "VRING_ADDR",
    "VRING_ADDR_COMPILED",
    "VRING_ADDR_FLAT",
    "VRING_STATE",
    "VRING_STATE_COMPILED",
    "VRING_STATE_FLAT",
    "PackError",
    "flat_format",
    "pack_u64",
]

# fmt: off

# rst *Message Specification > Header*: request, flags, size (three u32).
HEADER: Final[c.Struct] = c.Struct(
    "request" / c.Int32ul,
    "flags"   / c.Int32ul,
    "size"    / c.Int32ul,
)

# rst *Payload > A single 64-bit integer*.
U64: Final[c.Construct[Any, Any]] = c.Int64ul

# rst *Payload > Memory region description* (32 bytes; 40 with XEN_MMAP, which QEMU does not
# implement and vhostmem never offers).
MEMORY_REGION: Final[c.Struct] = c.Struct(
    "guest_phys_addr" / c.Int64ul,
    "memory_size"     / c.Int64ul,
    "userspace_addr"  / c.Int64ul,
    "mmap_offset"     / c.Int64ul,
)

# rst *Payload > Multiple Memory regions description* (SET_MEM_TABLE). The C struct has room for
# VHOST_MEMORY_BASELINE_NREGIONS regions (264 bytes) but QEMU sends only 8 + 32 * nregions
# (``vhost_user_set_mem_table``: ``msg.hdr.size = sizeof(msg.payload.memory.nregions) +
# sizeof(msg.payload.memory.padding) + fd_num * sizeof(VhostUserMemoryRegion)``).
MEMORY_TABLE: Final[c.Struct] = c.Struct(
    "nregions" / c.Rebuild(c.Int32ul, c.len_(c.this.regions)),
    "_padding" / c.Padding(4),
    "regions"  / c.Array(c.this.nregions, MEMORY_REGION),
)

# rst *Payload > Single memory region description* (ADD_MEM_REG / REM_MEM_REG, 40 bytes).
MEM_REG_MSG: Final[c.Struct] = c.Struct(
    "_padding" / c.Padding(8),
    "region"   / MEMORY_REGION,
)

# rst *Payload > A vring state description* (struct vhost_vring_state).
VRING_STATE: Final[c.Struct] = c.Struct(
    "index" / c.Int32ul,
    "num"   / c.Int32ul,
)

# rst *Payload > A vring address description* (struct vhost_vring_addr). Note the order:
# desc, USED, avail, log.
VRING_ADDR: Final[c.Struct] = c.Struct(
    "index"           / c.Int32ul,
    "flags"           / c.Int32ul,
    "desc_user_addr"  / c.Int64ul,
    "used_user_addr"  / c.Int64ul,
    "avail_user_addr" / c.Int64ul,
    "log_guest_addr"  / c.Int64ul,
)

# rst *Payload > Log description* (SET_LOG_BASE; the rst's "u64" there is wrong, QEMU sends this).
LOG: Final[c.Struct] = c.Struct(
    "mmap_size"   / c.Int64ul,
    "mmap_offset" / c.Int64ul,
)

# rst *Payload > Virtio device config space* (GET_CONFIG / SET_CONFIG): 12-byte head, then
# ``size`` bytes of config space (QEMU ``vhost_user_get_config``: hdr.size = 12 + config_len).
CONFIG: Final[c.Struct] = c.Struct(
    "offset" / c.Int32ul,
    "size"   / c.Int32ul,
    "flags"  / c.Int32ul,
    "region" / c.Bytes(c.this.size),
)

# rst *Payload > Inflight description* (GET_INFLIGHT_FD / SET_INFLIGHT_FD). 20 bytes of fields,
# but the C struct has 4 bytes of tail padding and QEMU sends sizeof() = 24
# (``vhost_user_get_inflight_fd``: ``.hdr.size = sizeof(msg.payload.inflight)``); libvhost-user
# ``vu_set_inflight_fd`` and rust-vmm (repr(C)) insist on 24 too, so 24 is the wire size.
INFLIGHT: Final[c.Struct] = c.Struct(
    "mmap_size"   / c.Int64ul,
    "mmap_offset" / c.Int64ul,
    "num_queues"  / c.Int16ul,
    "queue_size"  / c.Int16ul,
    "_padding"    / c.Padding(4),
)

# rst *Payload > Device state transfer parameters* (SET_DEVICE_STATE_FD).
DEVICE_STATE_PARAMS: Final[c.Struct] = c.Struct(
    "direction" / c.Int32ul,
    "phase"     / c.Int32ul,
)

# fmt: on

HEADER_COMPILED: Final[c.Construct[Any, Any]] = HEADER.compile()
U64_COMPILED: Final[c.Construct[Any, Any]] = U64.compile()
MEMORY_TABLE_COMPILED: Final[c.Construct[Any, Any]] = MEMORY_TABLE.compile()
MEM_REG_MSG_COMPILED: Final[c.Construct[Any, Any]] = MEM_REG_MSG.compile()
VRING_STATE_COMPILED: Final[c.Construct[Any, Any]] = VRING_STATE.compile()
VRING_ADDR_COMPILED: Final[c.Construct[Any, Any]] = VRING_ADDR.compile()

#: What ``pack_u64`` raises for a value that is not a u64.
PackError: Final = struct.error


def flat_format(definition: c.Construct[Any, Any]) -> struct.Struct:
    """The ``struct.Struct`` that a fixed-layout definition amounts to, derived from it.

    Walks the Construct definition (integer fields, named padding, nested fixed structs) and
    joins their format strings, so the hot path can ``unpack_from`` in one C call while the
    Construct definition stays the single source of the layout. Padding becomes ``x`` (skipped
    on parse, zero on build), exactly as ``c.Padding`` behaves.

    Raises:
        TypeError: the definition has a part with no fixed format (arrays, computed sizes).
    """
    return struct.Struct("<" + _flat(definition))


def _flat(node: c.Construct[Any, Any]) -> str:
    if isinstance(node, (c.Renamed, c.Rebuild)):
        return _flat(node.subcon)
    if isinstance(node, c.FormatField):
        fmt: str = node.fmtstr
        if fmt[0] != "<":
            raise TypeError(f"{fmt!r} is not little endian")
        return fmt[1:]
    if isinstance(node, c.Padded) and isinstance(node.subcon, type(c.Pass)):
        return f"{node.length}x"
    if isinstance(node, c.Struct):
        return "".join(_flat(sub) for sub in node.subcons)
    raise TypeError(f"no fixed format for {node!r}")


#: Flat twins of the fixed-size hot definitions (see ``flat_format``).
HEADER_FLAT: Final = flat_format(HEADER)
U64_FLAT: Final = flat_format(U64)
#: ``U64`` without construct's per-call machinery, for the u64-reply fast path.
pack_u64: Final[Callable[[int], bytes]] = U64_FLAT.pack
MEMORY_REGION_FLAT: Final = flat_format(MEMORY_REGION)
MEM_REG_MSG_FLAT: Final = flat_format(MEM_REG_MSG)
VRING_STATE_FLAT: Final = flat_format(VRING_STATE)
VRING_ADDR_FLAT: Final = flat_format(VRING_ADDR)
#: nregions + padding, the fixed head of MEMORY_TABLE before its array of regions.
MEMORY_TABLE_HEAD_FLAT: Final = struct.Struct(
    "<" + "".join(_flat(sub) for sub in MEMORY_TABLE.subcons if sub.name != "regions")
)

MEMORY_REGION_SIZE: Final = MEMORY_REGION.sizeof()
#: Bytes before the first region of a memory table (nregions + padding): 8.
MEMORY_TABLE_HEADER_SIZE: Final = len(MEMORY_TABLE.build({"regions": []}))
#: Bytes before the config space in a VhostUserConfig (``VHOST_USER_CONFIG_HDR_SIZE``): 12.
CONFIG_HEADER_SIZE: Final = len(CONFIG.build({"offset": 0, "size": 0, "flags": 0, "region": b""}))
assert HEADER.sizeof() == HEADER_SIZE

#: The struct behind each payload kind (compiled where per-message cost matters). NONE has no
#: struct; RAW is the bytes as they came; VRING_FILE is a u64 that ``codec`` splits.
PAYLOAD_STRUCTS: Final[dict[PayloadKind, c.Construct[Any, Any]]] = {
    PayloadKind.NONE: c.Pass,
    PayloadKind.U64: U64_COMPILED,
    PayloadKind.MEMORY_TABLE: MEMORY_TABLE_COMPILED,
    PayloadKind.MEM_REG: MEM_REG_MSG_COMPILED,
    PayloadKind.VRING_STATE: VRING_STATE_COMPILED,
    PayloadKind.VRING_ADDR: VRING_ADDR_COMPILED,
    PayloadKind.VRING_FILE: U64_COMPILED,
    PayloadKind.LOG: LOG,
    PayloadKind.CONFIG: CONFIG,
    PayloadKind.INFLIGHT: INFLIGHT,
    PayloadKind.DEVICE_STATE: DEVICE_STATE_PARAMS,
    PayloadKind.RAW: c.GreedyBytes,
}

#: The declarative struct behind each kind, for error paths: compiled parsers raise a bare
#: ``struct.error`` without construct's path, so ``codec`` re-runs the failing input through these.
PAYLOAD_DEFINITIONS: Final[dict[PayloadKind, c.Construct[Any, Any]]] = {
    **PAYLOAD_STRUCTS,
    PayloadKind.U64: U64,
    PayloadKind.MEMORY_TABLE: MEMORY_TABLE,
    PayloadKind.MEM_REG: MEM_REG_MSG,
    PayloadKind.VRING_STATE: VRING_STATE,
    PayloadKind.VRING_ADDR: VRING_ADDR,
    PayloadKind.VRING_FILE: U64,
}

#: Exact payload size of each fixed-size kind (MEMORY_TABLE and CONFIG are variable, RAW any).
PAYLOAD_SIZES: Final[dict[PayloadKind, int]] = {
    PayloadKind.NONE: 0,
    PayloadKind.U64: U64.sizeof(),
    PayloadKind.MEM_REG: MEM_REG_MSG.sizeof(),
    PayloadKind.VRING_STATE: VRING_STATE.sizeof(),
    PayloadKind.VRING_ADDR: VRING_ADDR.sizeof(),
    PayloadKind.VRING_FILE: U64.sizeof(),
    PayloadKind.LOG: LOG.sizeof(),
    PayloadKind.INFLIGHT: INFLIGHT.sizeof(),
    PayloadKind.DEVICE_STATE: DEVICE_STATE_PARAMS.sizeof(),
}

# fmt: off

# rst *Message Specification*: a whole message, header then ``size`` bytes of the payload its
# request carries (the dispatch pymobiledevice3 ``usbmux.py`` does with Switch). Declarative
# reference only - it does not check exact sizes; ``codec.decode_message`` is the checked path.
MESSAGE: Final[c.Struct] = c.Struct(
    "header"  / HEADER,
    "payload" / c.FixedSized(
        c.this.header.size,
        c.Switch(
            c.this.header.request,
            {int(request): PAYLOAD_STRUCTS[kind] for request, kind in REQUEST_PAYLOAD.items()},
            default=c.GreedyBytes,
        ),
    ),
)

# fmt: on
