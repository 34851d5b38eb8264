"""protocol.structs: every Construct definition parses, builds and sizes as vhost-user.rst says."""

from __future__ import annotations

from typing import Any

import construct as c
import pytest

from vhostmem.protocol import PayloadKind, structs


def assert_codec(struct: c.Construct[Any, Any], data: bytes, obj: object, size: int | None) -> None:
    """Parse ``data`` to ``obj``, build ``obj`` back to ``data``, check sizeof.

    construct ``tests/declarativeunittest.py::common``. ``size`` is the static size, or ``None``
    for a variable-size struct, whose sizeof must refuse rather than guess.
    """
    assert struct.parse(data) == obj
    assert struct.build(obj) == data
    if size is None:
        with pytest.raises(c.SizeofError):
            struct.sizeof()
    else:
        assert struct.sizeof() == size
        assert len(data) == size


def u32(v: int) -> bytes:
    return v.to_bytes(4, "little")


def u64(v: int) -> bytes:
    return v.to_bytes(8, "little")


REGION = {
    "guest_phys_addr": 0x1_0000_0000,
    "memory_size": 0x4000_0000,
    "userspace_addr": 0x7F21_13FF_E000,
    "mmap_offset": 0x8000_0000,
}
REGION_BYTES = u64(0x1_0000_0000) + u64(0x4000_0000) + u64(0x7F21_13FF_E000) + u64(0x8000_0000)
REGION2 = {**REGION, "guest_phys_addr": 0, "mmap_offset": 0}
REGION2_BYTES = u64(0) + u64(0x4000_0000) + u64(0x7F21_13FF_E000) + u64(0)

# (struct, bytes, object, static size or None)
CASES: list[tuple[str, c.Construct[Any, Any], bytes, object, int | None]] = [
    (
        "header",
        structs.HEADER,
        u32(37) + u32(9) + u32(40),
        {"request": 37, "flags": 9, "size": 40},
        12,
    ),
    ("u64", structs.U64, u64(0x1_4000_0000), 0x1_4000_0000, 8),
    ("memory_region", structs.MEMORY_REGION, REGION_BYTES, REGION, 32),
    ("memory_table_0", structs.MEMORY_TABLE, u32(0) + u32(0), {"nregions": 0, "regions": []}, None),
    (
        "memory_table_1",
        structs.MEMORY_TABLE,
        u32(1) + u32(0) + REGION_BYTES,
        {"nregions": 1, "regions": [REGION]},
        None,
    ),
    (
        "memory_table_2",
        structs.MEMORY_TABLE,
        u32(2) + u32(0) + REGION2_BYTES + REGION_BYTES,
        {"nregions": 2, "regions": [REGION2, REGION]},
        None,
    ),
    ("mem_reg_msg", structs.MEM_REG_MSG, u64(0) + REGION_BYTES, {"region": REGION}, 40),
    ("vring_state", structs.VRING_STATE, u32(1) + u32(256), {"index": 1, "num": 256}, 8),
    (
        "vring_addr",
        structs.VRING_ADDR,
        u32(1) + u32(1) + u64(0xD000) + u64(0xE000) + u64(0xF000) + u64(0x1234),
        {
            "index": 1,
            "flags": 1,
            "desc_user_addr": 0xD000,
            "used_user_addr": 0xE000,
            "avail_user_addr": 0xF000,
            "log_guest_addr": 0x1234,
        },
        40,
    ),
    (
        "log",
        structs.LOG,
        u64(0x1000) + u64(0x2000),
        {"mmap_size": 0x1000, "mmap_offset": 0x2000},
        16,
    ),
    (
        "config",
        structs.CONFIG,
        u32(4) + u32(6) + u32(0) + b"\x52\x54\x00\x12\x34\x56",
        {"offset": 4, "size": 6, "flags": 0, "region": b"\x52\x54\x00\x12\x34\x56"},
        None,
    ),
    (
        "inflight",
        structs.INFLIGHT,
        u64(0x3000)
        + u64(0x10)
        + (2).to_bytes(2, "little")
        + (256).to_bytes(2, "little")
        + bytes(4),
        {"mmap_size": 0x3000, "mmap_offset": 0x10, "num_queues": 2, "queue_size": 256},
        24,
    ),
    ("device_state", structs.DEVICE_STATE_PARAMS, u32(1) + u32(0), {"direction": 1, "phase": 0}, 8),
]


@pytest.mark.parametrize(
    ("struct", "data", "obj", "size"), [x[1:] for x in CASES], ids=[x[0] for x in CASES]
)
def test_struct_round_trip(
    struct: c.Construct[Any, Any], data: bytes, obj: object, size: int | None
) -> None:
    assert_codec(struct, data, obj, size)


COMPILED = [
    (structs.HEADER, structs.HEADER_COMPILED),
    (structs.U64, structs.U64_COMPILED),
    (structs.MEMORY_TABLE, structs.MEMORY_TABLE_COMPILED),
    (structs.MEM_REG_MSG, structs.MEM_REG_MSG_COMPILED),
    (structs.VRING_STATE, structs.VRING_STATE_COMPILED),
    (structs.VRING_ADDR, structs.VRING_ADDR_COMPILED),
]


COMPILED_CASES = [
    (name, compiled, data, obj)
    for name, struct, data, obj, _ in CASES
    for plain, compiled in COMPILED
    if plain is struct
]


@pytest.mark.parametrize(
    ("struct", "data", "obj"), [x[1:] for x in COMPILED_CASES], ids=[x[0] for x in COMPILED_CASES]
)
def test_compiled_agrees(struct: c.Construct[Any, Any], data: bytes, obj: object) -> None:
    assert struct.parse(data) == obj
    assert struct.build(obj) == data


def test_padding_is_ignored_on_parse_and_zero_on_build() -> None:
    dirty = b"\xff" * 8 + REGION_BYTES
    assert structs.MEM_REG_MSG_COMPILED.parse(dirty) == {"region": REGION}
    assert structs.MEM_REG_MSG.build({"region": REGION})[:8] == bytes(8)
    table = u32(1) + b"\xaa" * 4 + REGION_BYTES
    assert structs.MEMORY_TABLE_COMPILED.parse(table)["nregions"] == 1


def test_memory_table_sent_size_is_not_the_c_struct() -> None:
    # QEMU sends 8 + 32 * n, never the 264-byte VhostUserMemory.
    assert structs.MEMORY_TABLE_HEADER_SIZE == 8
    assert structs.MEMORY_REGION_SIZE == 32
    built = structs.MEMORY_TABLE.build({"regions": [REGION] * 8})
    assert len(built) == 264
    assert len(structs.MEMORY_TABLE.build({"regions": [REGION] * 3})) == 8 + 3 * 32


def test_nregions_is_rebuilt_from_the_regions() -> None:
    assert structs.MEMORY_TABLE.build({"nregions": 7, "regions": [REGION]})[:4] == u32(1)


def test_vring_addr_order_is_desc_used_avail() -> None:
    built = structs.VRING_ADDR.build(
        {
            "index": 0,
            "flags": 0,
            "desc_user_addr": 1,
            "used_user_addr": 2,
            "avail_user_addr": 3,
            "log_guest_addr": 4,
        }
    )
    assert built[8:] == u64(1) + u64(2) + u64(3) + u64(4)


def test_inflight_is_24_bytes_on_the_wire() -> None:
    assert structs.INFLIGHT.sizeof() == 24
    assert structs.PAYLOAD_SIZES[PayloadKind.INFLIGHT] == 24


def test_pack_u64_uses_the_u64_format() -> None:
    for value in (0, 1, 0x1_4000_0020, 2**64 - 1):
        assert structs.pack_u64(value) == structs.U64.build(value)
    with pytest.raises(structs.PackError):
        structs.pack_u64(-1)


def test_message_switch_dispatches_on_the_request() -> None:
    data = u32(37) + u32(9) + u32(40) + u64(0) + REGION_BYTES
    parsed = structs.MESSAGE.parse(data)
    assert parsed["header"] == {"request": 37, "flags": 9, "size": 40}
    assert parsed["payload"] == {"region": REGION}
    unknown = structs.MESSAGE.parse(u32(99) + u32(1) + u32(3) + b"abc")
    assert unknown["payload"] == b"abc"
