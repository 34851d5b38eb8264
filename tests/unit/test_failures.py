"""Mapping failures end to end: a fake front-end sends regions that cannot be mapped; vhostmem acks
failure with the reason, keeps serving, and holds nothing afterwards. Plus fault injection."""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from vhostmem.control import answer
from vhostmem.faults import FaultPlan, FaultSpecError, parse_fault
from vhostmem.regions import human_size
from vhostmem.report import render_diagnose
from vhostmem.server import Backend, ServerConfig
from vhostmem.testing.frontend import FakeFrontend, make_memfd

from ..hugetlbfs import hugetlbfs_mount
from .helpers.leaks import open_fds, shared_maps
from .helpers.waiting import in_thread, wait_until

MiB = 1 << 20
KiB = 1 << 10
NR = "/proc/sys/vm/nr_hugepages"


@contextmanager
def huge_pages(n: int) -> Iterator[None]:
    before = int(Path(NR).read_text())
    Path(NR).write_text(str(before + n))
    if int(Path(NR).read_text()) < before + n:
        Path(NR).write_text(str(before))
        pytest.fail(f"cannot reserve {n} huge pages (echo {before + n} > {NR} as root)")
    try:
        yield
    finally:
        Path(NR).write_text(str(before))


async def session_with(backend: Backend, nursery: trio.Nursery) -> FakeFrontend:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    nursery.start_soon(backend.serve_connection, ours, "test")
    fe = FakeFrontend(theirs)
    await in_thread(fe.handshake)
    return fe


def last_error(backend: Backend) -> dict[str, Any]:
    return [e for e in backend.booking.events if e.get("result") == "error"][-1]


def make_pipe_fd() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def make_sealed_memfd() -> int:
    fd = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4 * MiB)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    return fd


def make_short_file(tmp_path: Path) -> int:
    path = tmp_path / "guest.mem"
    path.write_bytes(b"\0" * MiB)  # 1 MiB file, region claims 4 MiB
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


CASES: list[tuple[str, Callable[[Path], int], int, list[str]]] = [
    ("pipe", lambda p: make_pipe_fd(), 4 * MiB, ["pipe", "share=on"]),
    ("sealed-memfd", lambda p: make_sealed_memfd(), 4 * MiB, ["sealed", "F_SEAL_WRITE"]),
    ("truncated-file", make_short_file, 4 * MiB, ["past", "file"]),
    ("memfd-past-eof", lambda p: make_memfd(MiB), 4 * MiB, ["memfd", "past"]),
    # MFD_HUGETLB memfd of one 2 MiB page, region of 4 MiB: refused up front (touching the
    # tail would SIGBUS), and the message names the huge page backing
    (
        "hugetlb-memfd-past-eof",
        lambda p: make_memfd(2 * MiB, hugetlb=True),
        4 * MiB,
        ["memfd-hugetlb", "2 MiB", "past"],
    ),
]


@pytest.mark.parametrize("name,make_fd,size,words", CASES, ids=[c[0] for c in CASES])
async def test_failure_class(
    tmp_path: Path, name: str, make_fd: Callable[[Path], int], size: int, words: list[str]
) -> None:
    fds_before, maps_before = open_fds(), shared_maps()
    backend = Backend(ServerConfig())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            fe = await session_with(backend, nursery)
            fd = make_fd(tmp_path)
            ack = await in_thread(fe.add_region, 0x100000000, size, 0x7F0000000000, 0, fd)
            os.close(fd)
            assert ack != 0
            err = last_error(backend)
            assert err["request"] == "ADD_MEM_REG"
            # the request, the GPA start and end, the size, the front-end address, the offset
            region = (
                f"ADD_MEM_REG: gpa=0x100000000-0x{0x100000000 + size - 1:x} size=0x{size:x} "
                "(4 MiB) uaddr=0x7f0000000000 mmap_offset=0x0: "
            )
            for word in [region, "Backing: ", "Fix: ", *words]:
                assert word in err["error"], (word, err["error"])
            # the connection stays up and the next region maps
            good = make_memfd(MiB)
            assert await in_thread(fe.add_region, 0x200000000, MiB, 0x7E0000000000, 0, good) == 0
            os.close(good)
            assert backend.mapper.stats.maps == 1
            fe.close()
            await wait_until(lambda: not backend.connections(), "the connection to end")
    backend.cleanup()
    assert open_fds() == fds_before and shared_maps() == maps_before


@pytest.mark.parametrize("offset", [4 * KiB, MiB])
async def test_hugetlb_odd_offsets_map_peek_and_unmap(offset: int) -> None:
    with huge_pages(4):
        fds_before, maps_before = open_fds(), shared_maps()
        backend = Backend(ServerConfig())
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                fe = await session_with(backend, nursery)
                fd = make_memfd(4 * MiB, hugetlb=True)
                # write a pattern at the odd offset through a mapping of our own (hugetlbfs
                # refuses pwrite)
                with mmap.mmap(fd, 4 * MiB) as mm:
                    mm[offset : offset + 16] = b"0123456789abcdef"
                ack = await in_thread(fe.add_region, 0x100000000, MiB, 0x7F0000000000, offset, fd)
                os.close(fd)
                assert ack == 0
                [region] = backend.regions()
                assert region[1].info["page_size"] == 2 * MiB
                reply = answer(
                    backend,
                    json.dumps({"cmd": "peek", "args": {"gpa": 0x100000000, "len": 16}}).encode(),
                )
                assert bytes.fromhex(reply["result"]["hex"]) == b"0123456789abcdef"
                assert await in_thread(fe.rem_region, 0x100000000, MiB, 0x7F0000000000) == 0
                assert not [m for m in shared_maps() if m not in maps_before]
                fe.close()
                await wait_until(lambda: not backend.connections(), "the connection to end")
        backend.cleanup()
        assert open_fds() == fds_before and shared_maps() == maps_before


POOL_2M = "/sys/kernel/mm/hugepages/hugepages-2048kB/"
HPAGE = 2 * MiB


def pool_2m(name: str) -> int:
    return int(Path(POOL_2M, name).read_text())


async def test_hugetlb_shortfall_is_said_in_log_event_log_and_diagnose(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A file on a hugetlbfs mount larger than the free pool: the region is served (ack 0), and
    # the shortfall is said with the numbers from sysfs, in the log, the event log and diagnose.
    caplog.set_level(logging.WARNING, logger="vhostmem")
    events_path = tmp_path / "events.jsonl"
    with hugetlbfs_mount(tmp_path / "huge") as mount, huge_pages(2):
        fds_before, maps_before = open_fds(), shared_maps()
        pages = pool_2m("free_hugepages") + 2
        path = mount / "guest-ram"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, pages * HPAGE)
        gpa, size, uaddr = 0x1_0000_0000, pages * HPAGE, 0x7F00_0000_0000
        backend = Backend(ServerConfig(event_log=str(events_path)))
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                fe = await session_with(backend, nursery)
                assert await in_thread(fe.add_region, gpa, size, uaddr, 0, fd) == 0
                os.close(fd)
                free, resv = pool_2m("free_hugepages"), pool_2m("resv_hugepages")
                total = pool_2m("nr_hugepages")
                head = (
                    f"ADD_MEM_REG gpa=0x{gpa:x}-0x{gpa + size - 1:x} size=0x{size:x} "
                    f"({human_size(size)}) uaddr=0x{uaddr:x} mmap_offset=0x0: huge page "
                    f"shortfall: the region spans {pages} pages of 2 MiB (hugetlbfs "
                    f"'{path}'); the file holds 0 pages (allocated); the 2 MiB pool has "
                    f"{free} free pages, {resv} of them reserved (of {total} in all): "
                    f"{pages} pages still to allocate, {pages - free} pages short if every "
                    "page is touched. Served anyway:"
                )
                # the event line
                backend.booking.book_pending()
                [line] = [e for e in backend.booking.events if e.get("request") == "ADD_MEM_REG"]
                assert line["result"] == "ok" and line.get("notes"), line
                [note] = line["notes"]
                assert note.startswith(head) and "SIGBUS" in note
                # diagnose lists the region, with the socket that mapped it
                doc = answer(backend, json.dumps({"cmd": "diagnose", "args": {}}).encode())
                [short] = doc["result"]["shortfalls"]
                assert (short["socket"], short["gpa"], short["size"], short["uaddr"]) == (
                    "test",
                    gpa,
                    size,
                    uaddr,
                )
                assert (
                    short["region_pages"],
                    short["held"],
                    short["free"],
                    short["resv"],
                    short["short"],
                ) == (pages, 0, free, resv, pages - free)
                assert short["text"] == note
                text = render_diagnose(doc["result"])
                assert "huge page shortfall: 1 region(s) the pool cannot back in full" in text
                assert (
                    f"test 0x{gpa:x}-0x{gpa + size - 1:x} {human_size(size)}: {pages} pages "
                    f"of 2 MiB, file holds 0, pool free {free} (reserved {resv}), "
                    f"{pages - free} short"
                ) in text
                # once the region is gone, nothing is short
                assert await in_thread(fe.rem_region, gpa, size, uaddr) == 0
                doc = answer(backend, json.dumps({"cmd": "diagnose", "args": {}}).encode())
                assert doc["result"]["shortfalls"] == []
                fe.close()
                await wait_until(lambda: not backend.connections(), "the connection to end")
        backend.cleanup()
        os.unlink(path)
        assert open_fds() == fds_before and shared_maps() == maps_before
    # the log and the event log file carry the same words
    assert [r.getMessage() for r in caplog.records if "huge page shortfall" in r.getMessage()] == [
        note
    ]
    logged = [json.loads(x) for x in events_path.read_text().splitlines()]
    assert [x["notes"] for x in logged if "notes" in x] == [[note]]


# -- fault injection ---------------------------------------------------------------------------


def test_fault_grammar() -> None:
    f = parse_fault("ADD_MEM_REG:nth=2:errno=ENOMEM")
    assert (f.request, f.nth, f.errno) == ("ADD_MEM_REG", 2, 12)
    assert parse_fault("REM_MEM_REG:every:delay=500ms").delay == 0.5
    assert parse_fault("*:nth=3:disconnect").disconnect
    assert parse_fault("ADD_MEM_REG:nth=1:ack=7").ack == 7
    for bad in [
        "NOPE:nth=1:ack=1",
        "ADD_MEM_REG:nth=0:ack=1",
        "ADD_MEM_REG:nth=2",
        "ADD_MEM_REG:ack=0",
        "ADD_MEM_REG:errno=EWHAT",
        "ADD_MEM_REG:nth=1:every:ack=1",
        "ADD_MEM_REG:colour=red",
    ]:
        with pytest.raises(FaultSpecError):
            parse_fault(bad)


def test_fault_plan_counts_per_rule() -> None:
    plan = FaultPlan()
    plan.add(parse_fault("ADD_MEM_REG:nth=2:ack=1"))
    plan.add(parse_fault("REM_MEM_REG:every:count=2:delay=1ms"))
    assert [plan.match("ADD_MEM_REG") is not None for _ in range(4)] == [False, True, False, False]
    assert [plan.match("REM_MEM_REG") is not None for _ in range(4)] == [True, True, False, False]
    assert plan.match("GET_FEATURES") is None


async def test_injected_errno_ack_delay_disconnect() -> None:
    fds_before = open_fds()
    backend = Backend(
        ServerConfig(
            inject=(
                "ADD_MEM_REG:nth=2:errno=ENOMEM",
                "ADD_MEM_REG:nth=3:ack=5",
                "REM_MEM_REG:every:delay=300ms",
                "ADD_MEM_REG:nth=5:disconnect",
            )
        )
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            fe = await session_with(backend, nursery)
            memfd = make_memfd(16 * MiB)

            def add(i: int) -> int:
                return fe.add_region(i * 2 * MiB, MiB, 0x10000000 + i * 2 * MiB, 0, memfd)

            assert await in_thread(add, 0) == 0
            assert await in_thread(add, 1) != 0  # errno=ENOMEM: the diagnosis ran
            err = last_error(backend)
            assert err["injected"] == "ADD_MEM_REG:nth=2:errno=ENOMEM"
            assert "ENOMEM" in err["error"] and "max_map_count" in err["error"]
            assert await in_thread(add, 2) == 5  # ack=5 without trying
            assert last_error(backend)["error_kind"] == "injected"
            assert await in_thread(add, 3) == 0
            t0 = time.monotonic()
            assert await in_thread(fe.rem_region, 0, MiB, 0x10000000) == 0
            assert time.monotonic() - t0 >= 0.3
            with pytest.raises(ConnectionError):
                await in_thread(add, 4)  # disconnect
            os.close(memfd)
            fe.close()
            await wait_until(lambda: not backend.connections(), "the connection to end")
    disconnect = next(e for e in backend.booking.events if e.get("event") == "disconnect")
    assert disconnect["reason"].startswith(
        "vhostmem closed the connection (fault injection): ADD_MEM_REG: injected disconnect ("
    )
    assert backend.mapper.stats.maps == 0
    backend.cleanup()
    assert open_fds() == fds_before


async def test_inject_and_diagnose_through_control() -> None:
    backend = Backend(ServerConfig())
    reply = answer(
        backend, json.dumps({"cmd": "inject", "args": {"spec": "ADD_MEM_REG:nth=1:ack=1"}}).encode()
    )
    assert reply["ok"] and reply["result"]["faults"][0]["spec"] == "ADD_MEM_REG:nth=1:ack=1"
    reply = answer(backend, json.dumps({"cmd": "inject", "args": {"spec": "bogus"}}).encode())
    assert not reply["ok"] and "unknown request" in reply["error"]
    reply = answer(backend, json.dumps({"cmd": "diagnose", "args": {}}).encode())
    doc = reply["result"]
    assert doc["version"] == 1 and doc["max_map_count"] > 0 and doc["rlimit_nofile"]["soft"] > 0
    assert doc["faults"][0]["fired"] == 0
    backend.cleanup()
