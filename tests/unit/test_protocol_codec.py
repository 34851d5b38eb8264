"""protocol.codes and protocol.codec: tables, byte cases per payload kind, every error path."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostmem import protocol
from vhostmem.protocol import (
    FDS_ALLOWED,
    HAS_OWN_REPLY,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    REPLY_FLAGS,
    REQUEST_PAYLOAD,
    BackendRequest,
    Config,
    DecodeError,
    DeviceStateParams,
    EncodeError,
    Header,
    HeaderFlags,
    Inflight,
    Log,
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    Payload,
    PayloadKind,
    ProtocolError,
    ProtocolFeature,
    Request,
    VirtioFeature,
    VringAddress,
    VringFile,
    VringState,
    decode_header,
    decode_message,
    decode_payload,
    decode_reply_payload,
    encode_reply,
    encode_request,
    encode_u64_reply,
    payload_kind,
    reply_payload_kind,
)

GiB = 1 << 30


def u16(v: int) -> bytes:
    return v.to_bytes(2, "little")


def u32(v: int) -> bytes:
    return v.to_bytes(4, "little")


def u64(v: int) -> bytes:
    return v.to_bytes(8, "little")


def header(request: int, flags: int, size: int) -> bytes:
    return u32(request) + u32(flags) + u32(size)


REGION = MemoryRegion(0x1_4000_0000, GiB, 0x7F21_53FF_E000, GiB)
REGION_BYTES = u64(0x1_4000_0000) + u64(GiB) + u64(0x7F21_53FF_E000) + u64(GiB)
BOOT = MemoryRegion(0, 512 << 20, 0x7FD5_B3FF_F000, 0)
BOOT_BYTES = u64(0) + u64(512 << 20) + u64(0x7FD5_B3FF_F000) + u64(0)


# ------------------------------------------------------------------------------------------
# codes


def test_request_codes_are_1_to_43() -> None:
    assert [int(r) for r in Request] == list(range(1, 44))
    assert int(Request.GET_FEATURES) == 1
    assert int(Request.SET_MEM_TABLE) == 5
    assert int(Request.SET_BACKEND_REQ_FD) == 21
    assert int(Request.GET_MAX_MEM_SLOTS) == 36
    assert int(Request.ADD_MEM_REG) == 37
    assert int(Request.REM_MEM_REG) == 38
    assert int(Request.SET_STATUS) == 39
    assert int(Request.GET_STATUS) == 40
    assert int(Request.CHECK_DEVICE_STATE) == 43
    assert [int(r) for r in BackendRequest] == list(range(1, 9))


def test_flags_and_constants() -> None:
    assert int(HeaderFlags.VERSION) == 0x1
    assert int(HeaderFlags.VERSION_MASK) == 0x3
    assert int(HeaderFlags.REPLY) == 0x4
    assert int(HeaderFlags.NEED_REPLY) == 0x8
    assert REPLY_FLAGS == 0x5
    assert HEADER_SIZE == 12
    assert MAX_PAYLOAD_SIZE == 4096
    assert protocol.MEMORY_BASELINE_NREGIONS == 8
    assert protocol.VRING_IDX_MASK == 0xFF
    assert protocol.VRING_NOFD_MASK == 0x100


def test_feature_masks() -> None:
    assert [f.value for f in ProtocolFeature] == [1 << bit for bit in range(20)]
    assert ProtocolFeature.REPLY_ACK == 1 << 3
    assert ProtocolFeature.CONFIGURE_MEM_SLOTS == 1 << 15
    assert ProtocolFeature.DEVICE_STATE == 1 << 19
    # What QEMU 10.0.2 acked in §1.13: MQ | REPLY_ACK | CONFIGURE_MEM_SLOTS.
    acked = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS
    assert acked == 0x8009
    assert VirtioFeature.LOG_ALL == 1 << 26
    assert VirtioFeature.PROTOCOL_FEATURES == 1 << 30
    assert VirtioFeature.VERSION_1 == 1 << 32
    assert VirtioFeature.F_RING_PACKED == 1 << 34
    # The probe's GET_FEATURES answer in shared/vectors: MAC | PROTOCOL_FEATURES | VERSION_1.
    assert (
        VirtioFeature.NET_F_MAC | VirtioFeature.PROTOCOL_FEATURES | VirtioFeature.VERSION_1
    ) == 0x1_4000_0020


def test_tables_cover_every_request() -> None:
    assert set(FDS_ALLOWED) == set(Request)
    assert set(REQUEST_PAYLOAD) == set(Request)
    assert set(protocol.REPLY_PAYLOAD) == set(Request)
    for low, high in FDS_ALLOWED.values():
        assert 0 <= low <= high <= 8


def test_fds_allowed() -> None:
    assert FDS_ALLOWED[Request.ADD_MEM_REG] == (1, 1)
    assert FDS_ALLOWED[Request.SET_MEM_TABLE] == (0, 8)
    assert FDS_ALLOWED[Request.REM_MEM_REG] == (0, 1)
    for r in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        assert FDS_ALLOWED[r] == (0, 1)
    assert FDS_ALLOWED[Request.SET_LOG_BASE] == (0, 1)
    for r in (
        Request.SET_LOG_FD,
        Request.SET_BACKEND_REQ_FD,
        Request.SET_INFLIGHT_FD,
        Request.GPU_SET_SOCKET,
        Request.SET_DEVICE_STATE_FD,
    ):
        assert FDS_ALLOWED[r] == (1, 1)
    assert FDS_ALLOWED[Request.GET_FEATURES] == (0, 0)
    assert FDS_ALLOWED[Request.SET_VRING_ENABLE] == (0, 0)


def test_fd_bounds_take_plain_codes() -> None:
    """The Request-keyed tables answer a plain int code as its Request, and unknown ones miss."""
    assert protocol.fd_bounds(37, None) == FDS_ALLOWED[Request.ADD_MEM_REG] == (1, 1)
    assert protocol.fd_bounds(38, None) == (0, 1)
    assert protocol.fd_bounds(99, None) == (0, 0)


def test_plain_header_flags() -> None:
    """The plain-int flag bits the per-message tests use agree with HeaderFlags."""
    pairs = [
        (protocol.FLAG_VERSION, HeaderFlags.VERSION),
        (protocol.FLAG_VERSION_MASK, HeaderFlags.VERSION_MASK),
        (protocol.FLAG_REPLY, HeaderFlags.REPLY),
        (protocol.FLAG_NEED_REPLY, HeaderFlags.NEED_REPLY),
    ]
    for plain, flag in pairs:
        assert type(plain) is int and plain == flag.value


def test_has_own_reply() -> None:
    assert Request.GET_FEATURES in HAS_OWN_REPLY
    assert Request.GET_VRING_BASE in HAS_OWN_REPLY
    assert Request.GET_MAX_MEM_SLOTS in HAS_OWN_REPLY
    assert Request.SET_DEVICE_STATE_FD in HAS_OWN_REPLY
    assert Request.SET_LOG_BASE not in HAS_OWN_REPLY  # only with LOG_SHMFD: the session decides
    assert Request.ADD_MEM_REG not in HAS_OWN_REPLY
    assert len(HAS_OWN_REPLY) == 15


def test_payload_kind() -> None:
    assert payload_kind(Request.GET_FEATURES) == "none"
    assert payload_kind(Request.GET_VRING_BASE) == "vring_state"
    assert payload_kind(Request.SET_MEM_TABLE) == "memory_table"
    assert payload_kind(Request.ADD_MEM_REG) == "mem_reg"
    assert payload_kind(Request.SET_VRING_CALL) == "vring_file"
    assert payload_kind(Request.IOTLB_MSG) == "raw"
    assert payload_kind(37) is PayloadKind.MEM_REG
    assert payload_kind(99) is PayloadKind.RAW
    assert reply_payload_kind(Request.GET_FEATURES) is PayloadKind.U64
    assert reply_payload_kind(Request.ADD_MEM_REG) is PayloadKind.U64
    assert reply_payload_kind(Request.GET_VRING_BASE) is PayloadKind.VRING_STATE
    assert reply_payload_kind(99) is PayloadKind.RAW


# ------------------------------------------------------------------------------------------
# (request, model, payload bytes): every payload kind, encode and decode (h11 SIMPLE_CASES)

CASES: list[tuple[Request, Payload, bytes]] = [
    (Request.GET_FEATURES, None, b""),
    (Request.SET_OWNER, None, b""),
    (Request.GET_MAX_MEM_SLOTS, None, b""),
    (Request.SET_FEATURES, 0x1_4000_0000, u64(0x1_4000_0000)),
    (Request.SET_PROTOCOL_FEATURES, 0x8009, u64(0x8009)),
    (Request.SET_STATUS, 0x0F, u64(0x0F)),
    (Request.SET_MEM_TABLE, MemoryTable(()), u32(0) + u32(0)),
    (Request.SET_MEM_TABLE, MemoryTable((BOOT,)), u32(1) + u32(0) + BOOT_BYTES),
    (
        Request.SET_MEM_TABLE,
        MemoryTable((BOOT, REGION)),
        u32(2) + u32(0) + BOOT_BYTES + REGION_BYTES,
    ),
    (Request.SET_MEM_TABLE, MemoryTable((REGION,) * 8), u32(8) + u32(0) + REGION_BYTES * 8),
    (Request.ADD_MEM_REG, MemRegMsg(REGION), u64(0) + REGION_BYTES),
    (Request.REM_MEM_REG, MemRegMsg(REGION), u64(0) + REGION_BYTES),
    (Request.SET_VRING_NUM, VringState(0, 256), u32(0) + u32(256)),
    (Request.SET_VRING_BASE, VringState(1, 0), u32(1) + u32(0)),
    (Request.GET_VRING_BASE, VringState(1, 0), u32(1) + u32(0)),
    (Request.SET_VRING_ENABLE, VringState(1, 1), u32(1) + u32(1)),
    (
        Request.SET_VRING_ADDR,
        VringAddress(1, 0, 0x7F00_D000, 0x7F00_E040, 0x7F00_E000, 0),
        u32(1) + u32(0) + u64(0x7F00_D000) + u64(0x7F00_E040) + u64(0x7F00_E000) + u64(0),
    ),
    (Request.SET_VRING_KICK, VringFile(0, nofd=False), u64(0)),
    (Request.SET_VRING_CALL, VringFile(1, nofd=False), u64(1)),
    (Request.SET_VRING_ERR, VringFile(255, nofd=True), u64(0x1FF)),
    (Request.SET_LOG_BASE, Log(0x10_0000, 0x2000), u64(0x10_0000) + u64(0x2000)),
    (Request.GET_CONFIG, Config(0, 6, 0, bytes(6)), u32(0) + u32(6) + u32(0) + bytes(6)),
    (Request.SET_CONFIG, Config(4, 2, 1, b"\x01\x02"), u32(4) + u32(2) + u32(1) + b"\x01\x02"),
    (Request.SET_CONFIG, Config(0, 0, 0, b""), u32(0) + u32(0) + u32(0)),
    (
        Request.SET_INFLIGHT_FD,
        Inflight(0x4000, 0, 2, 256),
        u64(0x4000) + u64(0) + u16(2) + u16(256) + bytes(4),
    ),
    (Request.GET_INFLIGHT_FD, Inflight(0, 0, 2, 256), bytes(16) + u16(2) + u16(256) + bytes(4)),
    (Request.SET_DEVICE_STATE_FD, DeviceStateParams(0, 0), u32(0) + u32(0)),
    (Request.IOTLB_MSG, b"\x01" * 26, b"\x01" * 26),
    (Request.GET_SHARED_OBJECT, bytes(range(16)), bytes(range(16))),
]
CASE_IDS = [f"{r.name}-{i}" for i, (r, _, _) in enumerate(CASES)]


def test_cases_cover_every_payload_kind() -> None:
    assert {payload_kind(r) for r, _, _ in CASES} == set(PayloadKind)


@pytest.mark.parametrize(("request_", "model", "data"), CASES, ids=CASE_IDS)
def test_decode_payload(request_: Request, model: Payload, data: bytes) -> None:
    assert decode_payload(request_, data) == model


@pytest.mark.parametrize(("request_", "model", "data"), CASES, ids=CASE_IDS)
def test_encode_request(request_: Request, model: Payload, data: bytes) -> None:
    assert encode_request(request_, model) == header(request_, 0x1, len(data)) + data
    assert (
        encode_request(request_, model, need_reply=True) == header(request_, 0x9, len(data)) + data
    )


@pytest.mark.parametrize(("request_", "model", "data"), CASES, ids=CASE_IDS)
def test_decode_message(request_: Request, model: Payload, data: bytes) -> None:
    hdr, payload = decode_message(header(request_, 0x9, len(data)) + data)
    assert hdr == Header(request_, 0x9, len(data))
    assert type(hdr.request) is Request
    assert payload == model


@pytest.mark.parametrize(("request_", "model", "data"), CASES, ids=CASE_IDS)
def test_decoded_payloads_are_models_not_containers(
    request_: Request, model: Payload, data: bytes
) -> None:
    payload = decode_payload(request_, data)
    if dataclasses.is_dataclass(payload):
        # frozen + slotted: no Container can hide in an attribute dict
        assert not hasattr(payload, "__dict__")
        with pytest.raises(dataclasses.FrozenInstanceError):
            payload.__setattr__(dataclasses.fields(payload)[0].name, 0)
        for f in dataclasses.fields(payload):
            value = getattr(payload, f.name)
            assert type(value) in {int, bool, bytes, tuple, MemoryRegion}
    else:
        assert type(payload) in {type(None), int, bytes}


def test_memory_table_regions_are_a_tuple_of_models() -> None:
    table = decode_payload(Request.SET_MEM_TABLE, u32(2) + u32(0) + BOOT_BYTES + REGION_BYTES)
    assert isinstance(table, MemoryTable)
    assert type(table.regions) is tuple
    assert all(type(r) is MemoryRegion for r in table.regions)


def test_padding_is_ignored() -> None:
    assert decode_payload(Request.ADD_MEM_REG, b"\xff" * 8 + REGION_BYTES) == MemRegMsg(REGION)
    table = decode_payload(Request.SET_MEM_TABLE, u32(1) + b"\xee" * 4 + REGION_BYTES)
    assert table == MemoryTable((REGION,))
    inflight = decode_payload(Request.SET_INFLIGHT_FD, bytes(16) + u16(1) + u16(2) + b"\xff" * 4)
    assert inflight == Inflight(0, 0, 1, 2)


# ------------------------------------------------------------------------------------------
# header


def test_decode_header() -> None:
    hdr = decode_header(header(37, 0x9, 40))
    assert hdr == Header(Request.ADD_MEM_REG, 9, 40)
    assert hdr.need_reply
    assert not hdr.is_reply
    assert hdr.version == 1
    reply = decode_header(header(1, 0x5, 8))
    assert reply.is_reply
    assert not reply.need_reply
    assert reply.version == 1
    assert decode_header(header(1, 0x2, 0)).version == 2


def test_decode_header_accepts_bytearray_and_memoryview() -> None:
    raw = header(5, 1, 40)
    assert decode_header(bytearray(raw)) == decode_header(memoryview(raw)) == decode_header(raw)


def test_unknown_request_is_a_plain_int() -> None:
    hdr = decode_header(header(99, 0x1, 3))
    assert hdr.request == 99
    assert type(hdr.request) is int
    assert decode_payload(99, b"abc") == b"abc"
    assert decode_message(header(44, 1, 0)) == (Header(44, 1, 0), b"")
    assert encode_request(99, b"abc") == header(99, 1, 3) + b"abc"
    assert encode_request(99) == header(99, 1, 0)


def test_header_is_not_judged() -> None:
    # flags, version and size are the session's business; only the length is checked here
    assert decode_header(header(1, 0xFFFF_FFFF, 0xFFFF_FFFF)).size == 0xFFFF_FFFF


# ------------------------------------------------------------------------------------------
# decode errors

BAD_PAYLOADS: list[tuple[str, int, bytes]] = [
    ("none-with-bytes", Request.GET_FEATURES, b"\x00"),
    ("get-max-slots-u64", Request.GET_MAX_MEM_SLOTS, bytes(8)),
    ("u64-short", Request.SET_FEATURES, bytes(7)),
    ("u64-long", Request.SET_PROTOCOL_FEATURES, bytes(9)),
    ("u64-empty", Request.SET_STATUS, b""),
    ("mem-reg-32", Request.ADD_MEM_REG, REGION_BYTES),
    ("mem-reg-41", Request.ADD_MEM_REG, bytes(41)),
    ("rem-reg-postcopy-ack", Request.REM_MEM_REG, bytes(8)),
    ("table-short", Request.SET_MEM_TABLE, bytes(4)),
    ("table-empty", Request.SET_MEM_TABLE, b""),
    ("table-264-c-struct-nregions-1", Request.SET_MEM_TABLE, u32(1) + u32(0) + bytes(256)),
    ("table-not-multiple-of-32", Request.SET_MEM_TABLE, u32(1) + u32(0) + bytes(33)),
    ("table-9-regions", Request.SET_MEM_TABLE, u32(9) + u32(0) + REGION_BYTES * 9),
    ("table-nregions-too-small", Request.SET_MEM_TABLE, u32(1) + u32(0) + REGION_BYTES * 2),
    ("table-nregions-too-big", Request.SET_MEM_TABLE, u32(3) + u32(0) + REGION_BYTES * 2),
    ("table-nregions-huge", Request.SET_MEM_TABLE, u32(0xFFFF_FFFF) + u32(0) + REGION_BYTES),
    ("vring-state-4", Request.SET_VRING_NUM, bytes(4)),
    ("get-vring-base-empty", Request.GET_VRING_BASE, b""),
    ("vring-addr-32", Request.SET_VRING_ADDR, bytes(32)),
    ("vring-file-7", Request.SET_VRING_CALL, bytes(7)),
    ("vring-file-bit9", Request.SET_VRING_KICK, u64(0x200)),
    ("vring-file-high-bit", Request.SET_VRING_ERR, u64(1 << 63)),
    ("log-8-as-rst-says", Request.SET_LOG_BASE, bytes(8)),
    ("config-short", Request.GET_CONFIG, bytes(11)),
    ("config-size-too-big", Request.SET_CONFIG, u32(0) + u32(10) + u32(0) + bytes(4)),
    ("config-size-too-small", Request.SET_CONFIG, u32(0) + u32(1) + u32(0) + bytes(4)),
    ("config-over-256", Request.SET_CONFIG, u32(0) + u32(257) + u32(0) + bytes(257)),
    ("inflight-20-packed", Request.SET_INFLIGHT_FD, bytes(20)),
    ("device-state-4", Request.SET_DEVICE_STATE_FD, bytes(4)),
    ("raw-over-max", Request.IOTLB_MSG, bytes(MAX_PAYLOAD_SIZE + 1)),
    ("unknown-over-max", 99, bytes(MAX_PAYLOAD_SIZE + 1)),
]


@pytest.mark.parametrize(
    ("request_", "data"), [x[1:] for x in BAD_PAYLOADS], ids=[x[0] for x in BAD_PAYLOADS]
)
def test_bad_payload_raises_decode_error(request_: int, data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode_payload(request_, data)
    assert info.value.raw == data
    assert isinstance(info.value, ProtocolError)
    assert str(info.value)


def test_nregions_beyond_the_regions_present() -> None:
    # nregions (3) > regions present (1): caught before any region is read
    data = u32(3) + u32(0) + REGION_BYTES
    with pytest.raises(DecodeError) as info:
        decode_payload(Request.SET_MEM_TABLE, data)
    assert "nregions 3" in str(info.value)
    assert info.value.raw == data


def test_own_check_has_no_path() -> None:
    with pytest.raises(DecodeError) as info:
        decode_payload(Request.ADD_MEM_REG, bytes(39))
    assert info.value.path is None
    assert "40" in str(info.value)


@pytest.mark.parametrize("length", [0, 11, 13, 24])
def test_header_must_be_12_bytes(length: int) -> None:
    with pytest.raises(DecodeError) as info:
        decode_header(bytes(length))
    assert info.value.raw == bytes(length)


def test_message_size_must_match() -> None:
    short = header(Request.SET_FEATURES, 1, 8) + bytes(4)
    with pytest.raises(DecodeError) as info:
        decode_message(short)
    assert info.value.raw == short
    with pytest.raises(DecodeError):
        decode_message(header(Request.SET_FEATURES, 1, 8) + bytes(9))
    with pytest.raises(DecodeError):
        decode_message(bytes(5))


def test_reply_payloads() -> None:
    assert decode_reply_payload(Request.GET_FEATURES, u64(0x1_4000_0020)) == 0x1_4000_0020
    assert decode_reply_payload(Request.ADD_MEM_REG, u64(0)) == 0
    assert decode_reply_payload(Request.GET_VRING_BASE, u32(1) + u32(7)) == VringState(1, 7)
    assert decode_reply_payload(Request.POSTCOPY_ADVISE, b"") is None
    with pytest.raises(DecodeError):
        decode_reply_payload(Request.GET_FEATURES, b"")


# ------------------------------------------------------------------------------------------
# encoding


@pytest.mark.parametrize("request_", list(Request))
def test_encode_u64_reply_matches_encode_reply(request_: Request) -> None:
    for value in (0, 1, 509, 0x1_4000_0020, 2**64 - 1):
        data = encode_u64_reply(request_, value)
        assert data == encode_reply(request_, value)
        assert data == header(request_, 0x5, 8) + u64(value)


def test_reply_flags_are_exactly_0x5() -> None:
    for payload in (0, VringState(0, 5), None, b"xyz", Inflight(1, 2, 3, 4)):
        assert decode_header(encode_reply(Request.GET_VRING_BASE, payload)[:12]).flags == 0x5
    assert encode_u64_reply(99, 1) == header(99, 0x5, 8) + u64(1)
    assert encode_reply(Request.GET_VRING_BASE, VringState(1, 42)) == header(11, 5, 8) + u32(
        1
    ) + u32(42)


def test_encode_request_flags_override() -> None:
    assert encode_request(Request.GET_FEATURES, flags=0x2) == header(1, 0x2, 0)
    assert encode_request(Request.SET_MEM_TABLE, b"\x00" * 3) == header(5, 1, 3) + bytes(3)


BAD_ENCODES: list[tuple[str, int, Payload]] = [
    ("u64-negative", Request.SET_FEATURES, -1),
    ("u64-too-big", Request.SET_FEATURES, 2**64),
    ("missing-payload", Request.SET_FEATURES, None),
    ("wrong-model", Request.ADD_MEM_REG, VringState(0, 0)),
    ("none-kind-with-int", Request.GET_FEATURES, 0),
    ("file-as-int", Request.SET_VRING_CALL, 1),
    ("nine-regions", Request.SET_MEM_TABLE, MemoryTable((REGION,) * 9)),
    ("region-negative", Request.ADD_MEM_REG, MemRegMsg(MemoryRegion(-1, 0, 0, 0))),
    ("vring-file-index-256", Request.SET_VRING_KICK, VringFile(256, nofd=False)),
    ("config-size-mismatch", Request.SET_CONFIG, Config(0, 3, 0, b"\x00")),
    ("config-over-256", Request.SET_CONFIG, Config(0, 257, 0, bytes(257))),
    ("inflight-u16", Request.SET_INFLIGHT_FD, Inflight(0, 0, 1 << 16, 0)),
]


@pytest.mark.parametrize(
    ("request_", "payload"), [x[1:] for x in BAD_ENCODES], ids=[x[0] for x in BAD_ENCODES]
)
def test_bad_encode_raises_encode_error(request_: int, payload: Payload) -> None:
    with pytest.raises(EncodeError):
        encode_request(request_, payload)


def test_bad_reply_values() -> None:
    with pytest.raises(EncodeError):
        encode_u64_reply(Request.GET_FEATURES, -1)
    with pytest.raises(EncodeError):
        encode_u64_reply(Request.GET_FEATURES, 2**64)
    with pytest.raises(EncodeError):
        encode_u64_reply(2**32, 0)
    with pytest.raises(EncodeError):
        encode_reply(Request.GET_FEATURES, object())  # type: ignore[arg-type]  # on purpose


# ------------------------------------------------------------------------------------------
# properties

u64s = st.integers(0, 2**64 - 1)
u32s = st.integers(0, 2**32 - 1)
regions = st.builds(MemoryRegion, u64s, u64s, u64s, u64s)


@given(regions)
def test_mem_reg_round_trip(region: MemoryRegion) -> None:
    for request in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        data = encode_request(request, MemRegMsg(region), need_reply=True)
        assert len(data) == HEADER_SIZE + 40
        assert decode_message(data) == (Header(request, 0x9, 40), MemRegMsg(region))


@given(st.lists(regions, max_size=8).map(tuple))
def test_memory_table_round_trip(table_regions: tuple[MemoryRegion, ...]) -> None:
    data = encode_request(Request.SET_MEM_TABLE, MemoryTable(table_regions))
    assert len(data) == HEADER_SIZE + 8 + 32 * len(table_regions)
    hdr, payload = decode_message(data)
    assert payload == MemoryTable(table_regions)
    assert hdr.size == 8 + 32 * len(table_regions)


@given(st.builds(VringAddress, u32s, u32s, u64s, u64s, u64s, u64s))
def test_vring_address_round_trip(addr: VringAddress) -> None:
    data = encode_request(Request.SET_VRING_ADDR, addr)
    assert decode_message(data) == (Header(Request.SET_VRING_ADDR, 1, 40), addr)


@given(st.builds(VringFile, st.integers(0, 255), st.booleans()))
def test_vring_file_round_trip(vfile: VringFile) -> None:
    data = encode_request(Request.SET_VRING_CALL, vfile)
    assert decode_payload(Request.SET_VRING_CALL, data[HEADER_SIZE:]) == vfile


@given(st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_any_request_code_frames(code: int, body: bytes) -> None:
    data = encode_request(code, body)
    hdr = decode_header(data[:HEADER_SIZE])
    assert int(hdr.request) == code
    assert hdr.size == len(body)
    try:
        decode_payload(hdr.request, data[HEADER_SIZE:])
    except DecodeError as err:  # a body of the wrong size for a known code: must say so
        assert err.raw == body
