"""Every message real QEMU 10.0.2 sent (tests/vectors/, copied from shared/vectors/) decodes and
re-encodes byte for byte; spot checks pin what the virtio-mem scenario must look like.

One JSON object per line: ``dir`` (``in`` = QEMU to back-end, ``out`` = the probe's reply),
``name``, ``hex`` (header + payload), ``nfds``. The probe's replies are not a reference, but they
are well-formed, so they go through the reply decoder too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict

import pytest

from vhostmem.protocol import (
    FDS_ALLOWED,
    HEADER_SIZE,
    REPLY_FLAGS,
    Header,
    MemoryTable,
    MemRegMsg,
    Request,
    VringState,
    decode_header,
    decode_message,
    decode_reply_payload,
    encode_reply,
    encode_request,
    structs,
)

VECTORS = Path(__file__).parent.parent / "vectors"
MEMSLOTS = "qemu-10.0.2-virtio-mem-memslots.jsonl"
LEGACY = "qemu-10.0.2-virtio-mem-legacy.jsonl"
GiB = 1 << 30


class Line(TypedDict):
    dir: str
    name: str
    hex: str
    nfds: int


def load(name: str) -> list[Line]:
    # json.loads only: fixture data is never evaluated
    lines: list[Line] = [
        json.loads(text) for text in (VECTORS / name).read_text().splitlines() if text.strip()
    ]
    return lines


ALL = [
    pytest.param(line, id=f"{name.split('-')[-1].split('.')[0]}:{n}:{line['dir']}:{line['name']}")
    for name in (LEGACY, MEMSLOTS)
    for n, line in enumerate(load(name), 1)
]


def test_vector_files_are_there() -> None:
    assert len(load(LEGACY)) == 50
    assert len(load(MEMSLOTS)) == 60


@pytest.mark.parametrize("line", ALL)
def test_vector_decodes_and_re_encodes(line: Line) -> None:
    raw = bytes.fromhex(line["hex"])
    if line["dir"] == "in":
        header, payload = decode_message(raw)
        assert isinstance(header.request, Request)
        assert header.request.name == line["name"]
        assert not header.is_reply
        assert header.version == 1
        assert encode_request(header.request, payload, flags=header.flags) == raw
        assert encode_request(header.request, payload, need_reply=header.need_reply) == raw
        low, high = FDS_ALLOWED[header.request]
        assert low <= line["nfds"] <= high
        if isinstance(payload, MemoryTable):
            assert line["nfds"] == len(payload.regions)
        # the declarative Switch over the whole message sees the same thing
        whole = structs.MESSAGE.parse(raw)
        assert whole["header"] == {
            "request": header.request,
            "flags": header.flags,
            "size": header.size,
        }
    else:
        header = decode_header(raw[:HEADER_SIZE])
        assert isinstance(header.request, Request)
        assert header.request.name == line["name"]
        assert header.flags == REPLY_FLAGS
        assert header.size == len(raw) - HEADER_SIZE
        payload = decode_reply_payload(header.request, raw[HEADER_SIZE:])
        assert encode_reply(header.request, payload) == raw


def messages(name: str, request: Request) -> list[tuple[Header, object, int]]:
    out: list[tuple[Header, object, int]] = []
    for line in load(name):
        if line["dir"] == "in" and line["name"] == request.name:
            header, payload = decode_message(bytes.fromhex(line["hex"]))
            out.append((header, payload, line["nfds"]))
    return out


def test_memslots_add_mem_reg() -> None:
    adds = messages(MEMSLOTS, Request.ADD_MEM_REG)
    assert len(adds) == 4  # boot RAM + memslots 0, 1, 2
    by_gpa = {}
    for header, payload, nfds in adds:
        assert isinstance(payload, MemRegMsg)
        assert header.flags == 0x9
        assert header.size == 40
        assert nfds == 1
        by_gpa[payload.region.guest_phys_addr] = payload.region
    assert by_gpa[0].memory_size == 512 << 20  # boot RAM as ADD_MEM_REG, no SET_MEM_TABLE
    for i, gpa in enumerate((0x1_0000_0000, 0x1_4000_0000, 0x1_8000_0000)):
        region = by_gpa[gpa]
        assert region.mmap_offset == i * GiB
        assert region.memory_size == GiB
    # memslot i of one memfd sits at the device's QEMU address + i GiB
    assert by_gpa[0x1_4000_0000].userspace_addr - by_gpa[0x1_0000_0000].userspace_addr == GiB
    assert messages(MEMSLOTS, Request.SET_MEM_TABLE) == []


def test_memslots_rem_mem_reg() -> None:
    rems = messages(MEMSLOTS, Request.REM_MEM_REG)
    gpas = []
    for header, payload, nfds in rems:
        assert isinstance(payload, MemRegMsg)
        assert header.flags == 0x9
        assert nfds == 0
        assert payload.region.mmap_offset == 0  # QEMU sends 0; the key is (gpa, uaddr, size)
        assert payload.region.memory_size == GiB
        gpas.append(payload.region.guest_phys_addr)
    assert gpas == [0x1_8000_0000, 0x1_4000_0000, 0x1_0000_0000]  # memslot 2, then 1, then 0


def test_legacy_set_mem_table() -> None:
    tables = messages(LEGACY, Request.SET_MEM_TABLE)
    assert [h.size for h, _, _ in tables] == [40, 72, 40]
    assert [nfds for _, _, nfds in tables] == [1, 2, 1]
    (_, first, _), (_, both, _), (_, last, _) = tables
    assert isinstance(both, MemoryTable)
    assert first == last  # boot RAM alone again after unplug
    device = both.regions[1]
    assert (device.guest_phys_addr, device.memory_size) == (0x1_0000_0000, 4 * GiB)  # one memslot
    assert messages(LEGACY, Request.ADD_MEM_REG) == []


@pytest.mark.parametrize("name", [LEGACY, MEMSLOTS])
def test_get_vring_base_carries_a_vring_state(name: str) -> None:
    ((header, payload, _),) = messages(name, Request.GET_VRING_BASE)
    assert header.size == 8
    assert payload == VringState(0, 0)


@pytest.mark.parametrize("name", [LEGACY, MEMSLOTS])
def test_get_requests_carry_nothing(name: str) -> None:
    for request in (Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.SET_OWNER):
        found = messages(name, request)
        assert found, f"{name} has no {request.name} from QEMU"
        for header, payload, _ in found:
            assert header.size == 0
            assert payload is None
