"""Bytes <-> ``vhostmem.protocol.model`` for vhost-user messages.

Decoding is strict about sizes (every fixed-size payload must be exactly its size, the memory
table exactly ``8 + 32 * nregions``), since a size mismatch means the two sides disagree about the
wire format and every later message would be misread. It is lenient about request codes: an
unknown code decodes to a plain ``int`` header and a raw ``bytes`` payload, and the session decides
what to answer (trezorlib's lenient ``EnumAdapter``). Header flags are not judged here either.

Construct Containers stop in this module; callers only ever see ``vhostmem.protocol.model``
objects. Every failure is a ``DecodeError`` (or ``EncodeError``) raised ``from`` the construct
error, if any.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import asdict
from typing import Final, TypeVar

import construct as c

from vhostmem.protocol import structs
from vhostmem.protocol.codes import (
    FDS_ALLOWED,
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_PAYLOAD_SIZE,
    MEMORY_BASELINE_NREGIONS,
    REPLY_FLAGS,
    REPLY_PAYLOAD,
    REQUEST_PAYLOAD,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    HeaderFlags,
    PayloadKind,
    Request,
    request_name,
)
from vhostmem.protocol.errors import DecodeError, EncodeError
from vhostmem.protocol.model import (
    Config,
    DeviceStateParams,
    Header,
    Inflight,
    Log,
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    Payload,
    VringAddress,
    VringFile,
    VringState,
)

__all__ = [
    "decode_header",
    "decode_message",
    "decode_payload",
    "decode_reply_payload",
    "encode_reply",
    "encode_request",
    "encode_u64_reply",
    "fd_bounds",
    "payload_kind",
    "reply_payload_kind",
]

#: What ``decode_*`` accept: anything construct can parse without a copy of our own.
BytesLike = bytes | bytearray | memoryview

# Known codes by value: one dict lookup instead of Request(code) + ValueError.
_REQUESTS: Final[dict[int, Request]] = {int(request): request for request in Request}

_HEADER = structs.HEADER_COMPILED
# One C call per fixed-size decode: struct formats derived from the Construct definitions
# (structs.flat_format), the hot path of every message.
_HEADER_UNPACK = structs.HEADER_FLAT.unpack
_U64_UNPACK = structs.U64_FLAT.unpack
_TABLE_HEAD_UNPACK_FROM = structs.MEMORY_TABLE_HEAD_FLAT.unpack_from
_REGION_UNPACK_FROM = structs.MEMORY_REGION_FLAT.unpack_from
_MEM_REG_UNPACK = structs.MEM_REG_MSG_FLAT.unpack
_VRING_STATE_UNPACK = structs.VRING_STATE_FLAT.unpack
_VRING_ADDR_UNPACK = structs.VRING_ADDR_FLAT.unpack
_REGION_SIZE: Final = structs.MEMORY_REGION_SIZE
_TABLE_HEAD_SIZE: Final = structs.MEMORY_TABLE_HEADER_SIZE
_TABLE_MAX_SIZE: Final = _TABLE_HEAD_SIZE + MEMORY_BASELINE_NREGIONS * _REGION_SIZE
_CONFIG_HEAD_SIZE: Final = structs.CONFIG_HEADER_SIZE
_SIZES: Final = structs.PAYLOAD_SIZES
_STRUCTS: Final = structs.PAYLOAD_STRUCTS
_VRING_FILE_MASK: Final = VRING_IDX_MASK | VRING_NOFD_MASK
_RAW: Final = PayloadKind.RAW
_NO_FDS: Final = (0, 0)

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# decoding


def decode_header(data: BytesLike) -> Header:
    """Decode the 12-byte header.

    Args:
        data: exactly ``HEADER_SIZE`` bytes.

    Returns:
        The header; ``request`` is a ``Request`` when known, else the plain ``int``. Flags and
        size are not judged: the caller checks ``size <= MAX_PAYLOAD_SIZE`` before reading on.

    Raises:
        DecodeError: ``data`` is not 12 bytes long.
    """
    if len(data) != HEADER_SIZE:
        raise DecodeError(f"header must be {HEADER_SIZE} bytes, got {len(data)}", raw=bytes(data))
    code, flags, size = _HEADER_UNPACK(data)
    return Header(_REQUESTS.get(code, code), flags, size)


def fd_bounds(request: Request | int, payload: Payload | None) -> tuple[int, int]:
    """How many fds (SCM_RIGHTS) a decoded request may carry: ``(at least, at most)``.

    ``FDS_ALLOWED`` per request, narrowed by the payload: a vring file with NOFD set carries
    none and one without carries one; SET_MEM_TABLE carries exactly one per region.
    """
    if isinstance(payload, VringFile):
        n = 0 if payload.nofd else 1
        return n, n
    if isinstance(payload, MemoryTable):
        n = len(payload.regions)
        return n, n
    # The Request-keyed tables take an unknown plain-int code as it is (a Request hashes and
    # compares as its value): it misses. Looking a Request up in them is also faster than in an
    # int-keyed copy, where the key is found by value instead of identity.
    return FDS_ALLOWED.get(request, _NO_FDS)  # type: ignore[arg-type]


def payload_kind(request: Request | int) -> PayloadKind:
    """Name the payload a request carries (``PayloadKind`` is a ``str`` enum: "u64", ...).

    Unknown codes and requests vhostmem does not decode (IOTLB, crypto, shared objects) are
    ``PayloadKind.RAW``.
    """
    return REQUEST_PAYLOAD.get(request, _RAW)  # type: ignore[arg-type]


def reply_payload_kind(request: Request | int) -> PayloadKind:
    """Name the payload the back-end's reply to ``request`` carries (mostly the REPLY_ACK u64)."""
    return REPLY_PAYLOAD.get(request, _RAW)  # type: ignore[arg-type]


def decode_payload(request: Request | int, payload: BytesLike) -> Payload:
    """Decode the payload of a front-end request.

    Args:
        request: the header's request code (``Request`` or unknown ``int``).
        payload: exactly the ``header.size`` bytes that followed the header.

    Returns:
        The model object for the request's ``payload_kind``: ``None`` for "none", ``int`` for
        "u64", ``bytes`` for "raw" and unknown codes.

    Raises:
        DecodeError: the size is wrong for the request, or a field has a forbidden value
            (memory table with more than 8 regions or an ``nregions`` that disagrees with the
            size, vring-file bits other than index and NOFD, config ``size`` mismatch).
    """
    return _decode(request, payload, payload_kind(request))


def decode_reply_payload(request: Request | int, payload: BytesLike) -> Payload:
    """Decode the payload of a back-end reply to ``request`` (for fake front-ends and tests).

    Same checks and errors as ``decode_payload``, with the layout of ``reply_payload_kind``.
    """
    return _decode(request, payload, reply_payload_kind(request))


def decode_message(data: BytesLike) -> tuple[Header, Payload]:
    """Decode one complete request: header plus exactly ``header.size`` payload bytes.

    Raises:
        DecodeError: short data, a size field that disagrees with ``len(data)``, or a bad payload.
    """
    if len(data) < HEADER_SIZE:
        raise DecodeError(f"message shorter than its {HEADER_SIZE}-byte header", raw=bytes(data))
    header = decode_header(data[:HEADER_SIZE])
    if len(data) - HEADER_SIZE != header.size:
        raise DecodeError(
            f"{request_name(header.request)}: header says {header.size} payload bytes, "
            f"message has {len(data) - HEADER_SIZE}",
            raw=bytes(data),
        )
    return header, decode_payload(header.request, data[HEADER_SIZE:])


def _decode(request: Request | int, payload: BytesLike, kind: PayloadKind) -> Payload:
    size = len(payload)
    if size > MAX_PAYLOAD_SIZE:
        raise DecodeError(
            f"{request_name(request)}: payload of {size} bytes exceeds {MAX_PAYLOAD_SIZE}",
            raw=bytes(payload),
        )
    expected = _SIZES.get(kind)
    if expected is not None and size != expected:
        raise DecodeError(
            f"{request_name(request)}: {kind} payload must be {expected} bytes, got {size}",
            raw=bytes(payload),
        )
    try:
        return _DECODERS[kind](request, payload)
    except (c.ConstructError, struct.error) as err:
        if isinstance(err, c.ConstructError):
            path = err.path
        else:
            path = _failing_path(structs.PAYLOAD_DEFINITIONS[kind].parse, payload)
        raise DecodeError(
            f"{request_name(request)}: bad {kind} payload: {err}", raw=bytes(payload), path=path
        ) from err


def _failing_path(step: Callable[[_T], object], arg: _T) -> str | None:
    """Where the declarative struct fails on what its compiled twin failed on (slow path only)."""
    try:
        step(arg)
    except c.ConstructError as err:
        return err.path
    return None  # pragma: no cover - the two agree on what fails


def _decode_none(request: Request | int, payload: BytesLike) -> None:
    return None


def _decode_raw(request: Request | int, payload: BytesLike) -> bytes:
    return bytes(payload)


def _decode_u64(request: Request | int, payload: BytesLike) -> int:
    value: int = _U64_UNPACK(payload)[0]
    return value


def _decode_memory_table(request: Request | int, payload: BytesLike) -> MemoryTable:
    # The sent size is 8 + 32 * nregions, not the 264-byte C struct (QEMU
    # vhost_user_set_mem_table); libvhost-user vu_set_mem_table_exec trusts nregions alone, we
    # want both to agree so a misframed stream is caught here.
    size = len(payload)
    body = size - _TABLE_HEAD_SIZE
    if body < 0 or body % _REGION_SIZE or size > _TABLE_MAX_SIZE:
        raise DecodeError(
            f"{request_name(request)}: memory table size must be {_TABLE_HEAD_SIZE} + "
            f"{_REGION_SIZE} * n with n <= {MEMORY_BASELINE_NREGIONS}, got {size}",
            raw=bytes(payload),
        )
    nregions = _TABLE_HEAD_UNPACK_FROM(payload, 0)[0]
    if nregions != body // _REGION_SIZE:
        raise DecodeError(
            f"{request_name(request)}: nregions {nregions} disagrees with the {size}-byte payload "
            f"({body // _REGION_SIZE} regions)",
            raw=bytes(payload),
        )
    return MemoryTable(
        tuple(
            MemoryRegion(*_REGION_UNPACK_FROM(payload, _TABLE_HEAD_SIZE + i * _REGION_SIZE))
            for i in range(nregions)
        )
    )


def _decode_mem_reg(request: Request | int, payload: BytesLike) -> MemRegMsg:
    return MemRegMsg(MemoryRegion(*_MEM_REG_UNPACK(payload)))


def _decode_vring_state(request: Request | int, payload: BytesLike) -> VringState:
    return VringState(*_VRING_STATE_UNPACK(payload))


def _decode_vring_addr(request: Request | int, payload: BytesLike) -> VringAddress:
    return VringAddress(*_VRING_ADDR_UNPACK(payload))


def _decode_vring_file(request: Request | int, payload: BytesLike) -> VringFile:
    # Bits other than index (0-7) and NOFD (8) are an error, as in rust-vmm
    # vhost-user-backend handle_vring_fd_request; libvhost-user just masks them off.
    value: int = _U64_UNPACK(payload)[0]
    if value & ~_VRING_FILE_MASK:
        raise DecodeError(
            f"{request_name(request)}: vring file u64 {value:#x} has bits outside index and NOFD",
            raw=bytes(payload),
        )
    return VringFile(value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK))


def _decode_log(request: Request | int, payload: BytesLike) -> Log:
    p = _STRUCTS[PayloadKind.LOG].parse(payload)
    return Log(p["mmap_size"], p["mmap_offset"])


def _decode_config(request: Request | int, payload: BytesLike) -> Config:
    size = len(payload)
    if size < _CONFIG_HEAD_SIZE:
        raise DecodeError(
            f"{request_name(request)}: config payload must be at least {_CONFIG_HEAD_SIZE} bytes, "
            f"got {size}",
            raw=bytes(payload),
        )
    p = _STRUCTS[PayloadKind.CONFIG].parse(payload)
    region_size = p["size"]
    if region_size > MAX_CONFIG_SIZE or _CONFIG_HEAD_SIZE + region_size != size:
        raise DecodeError(
            f"{request_name(request)}: config size {region_size} must be <= {MAX_CONFIG_SIZE} and "
            f"match the {size}-byte payload",
            raw=bytes(payload),
        )
    return Config(p["offset"], region_size, p["flags"], p["region"])


def _decode_inflight(request: Request | int, payload: BytesLike) -> Inflight:
    p = _STRUCTS[PayloadKind.INFLIGHT].parse(payload)
    return Inflight(p["mmap_size"], p["mmap_offset"], p["num_queues"], p["queue_size"])


def _decode_device_state(request: Request | int, payload: BytesLike) -> DeviceStateParams:
    p = _STRUCTS[PayloadKind.DEVICE_STATE].parse(payload)
    return DeviceStateParams(p["direction"], p["phase"])


_DECODERS: Final[dict[PayloadKind, Callable[[Request | int, BytesLike], Payload]]] = {
    PayloadKind.NONE: _decode_none,
    PayloadKind.U64: _decode_u64,
    PayloadKind.MEMORY_TABLE: _decode_memory_table,
    PayloadKind.MEM_REG: _decode_mem_reg,
    PayloadKind.VRING_STATE: _decode_vring_state,
    PayloadKind.VRING_ADDR: _decode_vring_addr,
    PayloadKind.VRING_FILE: _decode_vring_file,
    PayloadKind.LOG: _decode_log,
    PayloadKind.CONFIG: _decode_config,
    PayloadKind.INFLIGHT: _decode_inflight,
    PayloadKind.DEVICE_STATE: _decode_device_state,
    PayloadKind.RAW: _decode_raw,
}
assert _DECODERS.keys() == set(PayloadKind)


# --------------------------------------------------------------------------------------------
# encoding


def _kind_of(payload: Payload) -> PayloadKind:
    match payload:
        case None:
            return PayloadKind.NONE
        case bytes():
            return PayloadKind.RAW
        case int():
            return PayloadKind.U64
        case MemoryTable():
            return PayloadKind.MEMORY_TABLE
        case MemRegMsg():
            return PayloadKind.MEM_REG
        case VringState():
            return PayloadKind.VRING_STATE
        case VringAddress():
            return PayloadKind.VRING_ADDR
        case VringFile():
            return PayloadKind.VRING_FILE
        case Log():
            return PayloadKind.LOG
        case Config():
            return PayloadKind.CONFIG
        case Inflight():
            return PayloadKind.INFLIGHT
        case DeviceStateParams():
            return PayloadKind.DEVICE_STATE
    raise EncodeError(f"not a payload: {type(payload).__name__}")


def _encode_payload(payload: Payload) -> bytes:
    kind = _kind_of(payload)
    obj: object
    match payload:
        case None:
            return b""
        case bytes():
            return payload
        case int():
            obj = payload
        case VringFile(index=index, nofd=nofd):
            if not 0 <= index <= VRING_IDX_MASK:
                raise EncodeError(f"vring file index {index} outside 0..{VRING_IDX_MASK}")
            obj = index | (VRING_NOFD_MASK if nofd else 0)
        case MemoryTable(regions=regions) if len(regions) > MEMORY_BASELINE_NREGIONS:
            raise EncodeError(
                f"memory table of {len(regions)} regions; at most {MEMORY_BASELINE_NREGIONS}"
            )
        case Config(size=size) if size > MAX_CONFIG_SIZE:
            raise EncodeError(f"config size {size} exceeds {MAX_CONFIG_SIZE}")
        case _:
            obj = asdict(payload)
    try:
        data: bytes = _STRUCTS[kind].build(obj)
    except (c.ConstructError, struct.error) as err:
        if isinstance(err, c.ConstructError):
            path = err.path
        else:
            path = _failing_path(structs.PAYLOAD_DEFINITIONS[kind].build, obj)
        raise EncodeError(f"cannot encode {kind} payload: {err}", path=path) from err
    return data


def _encode(request: Request | int, flags: int, body: bytes) -> bytes:
    fields = {"request": request, "flags": flags, "size": len(body)}
    try:
        head: bytes = _HEADER.build(fields)
    except (c.ConstructError, struct.error) as err:
        path = _failing_path(structs.HEADER.build, fields)
        raise EncodeError(f"cannot encode header: {err}", path=path) from err
    return head + body


def encode_request(
    request: Request | int,
    payload: Payload = None,
    *,
    need_reply: bool = False,
    flags: int | None = None,
) -> bytes:
    """Encode a front-end request (for fake front-ends, tests and benchmarks).

    Args:
        request: the request code; unknown ``int`` codes are allowed.
        payload: the model the request carries (see ``payload_kind``), or ``bytes`` to send any
            body as-is, which is how tests build malformed messages.
        need_reply: set NEED_REPLY (flags 0x9 instead of 0x1).
        flags: the whole flags word, overriding ``need_reply``.

    Returns:
        Header plus payload, ``size`` computed.

    Raises:
        EncodeError: the payload does not fit the request, or a value is out of range.
    """
    kind = payload_kind(request)
    if not isinstance(payload, bytes) and not (kind is PayloadKind.RAW and payload is None):
        got = _kind_of(payload)
        if got is not kind:
            raise EncodeError(f"{request_name(request)} carries a {kind} payload, not {got}")
    if flags is None:
        flags = HeaderFlags.VERSION | (HeaderFlags.NEED_REPLY if need_reply else 0)
    return _encode(request, flags, _encode_payload(payload))


def encode_reply(request: Request | int, payload: Payload) -> bytes:
    """Encode a back-end reply; flags are exactly 0x5, the only value QEMU accepts.

    Args:
        request: the request being answered (QEMU checks that the codes match).
        payload: chosen by type: ``int`` -> 8-byte u64 (REPLY_ACK, features, ...),
            ``VringState`` for GET_VRING_BASE, ``Config``, ``Inflight``, ``bytes`` as-is,
            ``None`` for an empty reply (POSTCOPY_ADVISE).

    Raises:
        EncodeError: a value is out of range.
    """
    return _encode(request, REPLY_FLAGS, _encode_payload(payload))


# The reply header for every known request, built once: u64 replies are the common answer
# (REPLY_ACK after each ADD/REM_MEM_REG, features, slots), so per call only the value is packed.
_U64_REPLY_SIZE: Final = _SIZES[PayloadKind.U64]
_U64_REPLY_HEADERS: Final[dict[int, bytes]] = {
    int(request): _HEADER.build({"request": request, "flags": REPLY_FLAGS, "size": _U64_REPLY_SIZE})
    for request in Request
}


def encode_u64_reply(request: Request | int, value: int) -> bytes:
    """Encode a u64 reply (REPLY_ACK status, features, counts): ``encode_reply`` made fast.

    Raises:
        EncodeError: ``value`` does not fit in a u64 or ``request`` in a u32.
    """
    head = _U64_REPLY_HEADERS.get(request)
    if head is None:
        return _encode(request, REPLY_FLAGS, _encode_payload(value))
    try:
        return head + structs.pack_u64(value)
    except structs.PackError as err:
        raise EncodeError(f"cannot encode u64 reply value {value!r}: {err}") from err
