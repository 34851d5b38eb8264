"""Robustness: hostile and broken front-ends, stalls, faults, and the socket protections.

Explicit cases run through the real shell (``Backend.serve_connection`` over a socketpair, real
memfds) after QEMU's handshake with REPLY_ACK negotiated, where the socket or a real mapping
matters: the largest payload and 200 fds on the wire, an unmap the mapping refuses, broken
framing (which closes that connection only, with a reason in the disconnect event, while the
other keeps working), stalls, killed front-ends, signals and the socket files. Which requests
are refused, and how, is the pure session's: tables in test_session_table.py. Every test ends
with the process's fds and shared maps as they were.

Rules (test_server.py's): every I/O test runs under ``trio.fail_after``; the blocking fake
front-end runs through ``trio.to_thread.run_sync``; processes we start are stopped by their pid.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from vhostmem.control import ControlClient, ControlError, answer
from vhostmem.protocol import (
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    MemoryRegion,
    MemRegMsg,
    Request,
    VirtioFeature,
    decode_header,
    encode_request,
)
from vhostmem.report import render_regions
from vhostmem.server import Backend, ServerConfig, run
from vhostmem.sockets import SocketError, bind_unix_socket
from vhostmem.testing.backend import start_backend
from vhostmem.testing.frontend import FakeFrontend, make_memfd

from .helpers.leaks import baseline, live_fds, map_lines, no_leaks, shared_maps
from .helpers.waiting import in_thread, wait_until
from .helpers.wire import Wire, wired

MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parents[2]
UADDR = 0x7F00_0000_0000


def maps_at(address: int) -> bool:
    """Whether anything is mapped at ``address`` (/proc/self/maps)."""
    for line in map_lines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= address < hi:
            return True
    return False


def memfds(n: int, size: int = 16 * MiB) -> list[int]:
    return [make_memfd(size) for _ in range(n)]


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


async def refused(
    w: Wire,
    request: Request | int,
    data: bytes,
    fds: Sequence[int] = (),
    *,
    expect_reply: bool = True,
) -> int | None:
    """Send a raw message from "a" with ``fds`` (closed here after sending), return its u64 ack.

    Checks that every fd that came with it is closed by the time the reply is read.
    """
    before = live_fds() - set(fds)
    await in_thread(w.a.send_raw, data, fds)
    close_all(fds)
    ack = None
    if expect_reply:
        reply = await in_thread(w.a.recv_reply, request)
        assert reply.header.size == 8, reply
        ack = reply.u64
    else:
        # no reply is due: the next request's reply must be the next thing on the wire
        assert await in_thread(w.a.call, Request.GET_FEATURES) is not None
    assert live_fds() == before, "fds that came with the refused request are still open"
    return ack


def error_event(w: Wire, name: str, socket_name: str = "a") -> dict[str, Any]:
    events = [
        e
        for e in w.backend.booking.events
        if (e.get("request") or e.get("name")) == name
        and e.get("result") == "error"
        and e.get("socket") == socket_name
    ]
    assert events, (
        f"no error event for {name} on {socket_name}: {list(w.backend.booking.events)[-5:]}"
    )
    event = events[-1]
    assert event["error"].startswith(name), event
    assert event["error_kind"], event
    return event


async def still_up(w: Wire) -> None:
    """Connection "a" answers (and so does "b")."""
    for fe, name in ((w.a, "a"), (w.b, "b")):
        reply = await in_thread(fe.call, Request.GET_FEATURES)
        assert reply is not None and reply.u64 & VirtioFeature.PROTOCOL_FEATURES
        assert w.backend.sockets.get(name) is not None


def disconnect_reason(backend: Backend, socket_name: str) -> str:
    events = [
        e
        for e in backend.booking.events
        if e.get("event") == "disconnect" and e.get("socket") == socket_name
    ]
    assert events, f"no disconnect event on {socket_name}"
    reason = events[-1]["reason"]
    assert isinstance(reason, str) and reason
    return reason


def add_msg(gpa: int, size: int, uaddr: int, offset: int, *, need_reply: bool = True) -> bytes:
    return encode_request(
        Request.ADD_MEM_REG,
        MemRegMsg(MemoryRegion(gpa, size, uaddr, offset)),
        need_reply=need_reply,
    )


# -- explicit cases: framing intact, the connection stays up ------------------------------------
#
# Which requests are refused, with what kind, ack and words, is the pure session's: those cases
# are tables in test_session_table.py. Here stay the two that push the socket to its limits.


async def test_size_field_at_the_limit_is_answered_not_fatal() -> None:
    """A size no request has, but within MAX_PAYLOAD_SIZE: the shell reads the largest payload
    off the socket, the session refuses it, and the connection goes on."""
    async with no_leaks(), wired() as w:
        data = encode_request(Request.SET_FEATURES, b"\xaa" * MAX_PAYLOAD_SIZE, need_reply=True)
        assert await refused(w, Request.SET_FEATURES, data) == 1
        assert error_event(w, "SET_FEATURES")["error_kind"] == "decode"
        await still_up(w)


async def test_add_mem_reg_with_200_fds() -> None:
    """200 fds in one message (transport.MAX_FDS_PER_READ has room for SCM_MAX_FD): all are
    received, none cut off, the request is refused and every one is closed."""
    async with no_leaks(), wired() as w:
        ack = await refused(w, Request.ADD_MEM_REG, add_msg(0, MiB, UADDR, 0), memfds(200, MiB))
        assert ack == 1
        event = error_event(w, "ADD_MEM_REG")
        assert "came with 200 file descriptor" in event["error"] and event["region"]["size"] == MiB
        assert w.table() == [] and w.backend.mapper.stats.maps == 0
        await still_up(w)


# -- an unmap the mapping refuses: the table keeps the region, marked ---------------------------
#
# A view of a region's memory still in use (a slice of one Mapping.view handed out) makes
# Mapping.close refuse to unmap (views-in-use): a real refusal through the real shell, which
# ends when the view is released. (A refused munmap at vm.max_map_count: test_mapping.py.)


def held_view(w: Wire, gpa: int) -> memoryview:
    """A slice of a view of the region at ``gpa``: Mapping.close cannot unmap while it lives."""
    region = w.conn_a.session.table.lookup_gpa(gpa)
    assert region is not None
    view: memoryview = region.handle.view(0, 64)
    return view[8:16]


def regions_doc(backend: Backend) -> dict[str, Any]:
    reply = answer(backend, b'{"cmd": "regions"}')
    assert reply["ok"], reply
    result: dict[str, Any] = reply["result"]
    return result


async def test_rem_whose_unmap_is_refused_keeps_the_region_and_a_retry_unmaps_it() -> None:
    async with no_leaks(), wired() as w:
        [fd] = memfds(1)
        assert await in_thread(w.a.add_region, 0, 2 * MiB, UADDR, 0, fd) == 0
        os.close(fd)
        view = held_view(w, 0)
        assert await in_thread(w.a.rem_region, 0, 2 * MiB, UADDR) == 1
        event = error_event(w, "REM_MEM_REG")
        assert event["error_kind"] == "views-in-use"
        assert "the unmap of region gpa=0x0 size=0x200000 (2 MiB)" in event["error"]
        assert "memoryview" in event["error"] and "stays in the table" in event["error"]
        assert [r["gpa"] for r in event["details"]["unmap_failed"]] == [0]
        [region] = regions_doc(w.backend)["regions"]  # still mapped, so still listed, marked
        assert region["gpa"] == 0 and "memoryview" in region["unmap_failed"]
        text = render_regions(regions_doc(w.backend))
        assert "UNMAP FAILED, still mapped: " in text and "memoryview" in text
        assert w.backend.mapper.stats.maps == 1
        view.release()
        assert await in_thread(w.a.rem_region, 0, 2 * MiB, UADDR) == 0  # QEMU's next REM
        assert w.table() == [] and w.backend.mapper.stats.maps == 0
        assert regions_doc(w.backend)["regions"] == []
        await still_up(w)


async def test_set_mem_table_unmaps_every_old_region_and_names_the_one_left_mapped() -> None:
    async with no_leaks(), wired() as w:
        fds = memfds(4)
        old = [(i * 4 * MiB, 2 * MiB, UADDR + i * 4 * MiB, 0, fds[i]) for i in range(3)]
        assert await in_thread(w.a.set_mem_table, old) == 0
        view = held_view(w, 4 * MiB)  # the middle one of the three
        addresses = {r.gpa: r.info["address"] for r in w.conn_a.session.table}
        new = [(64 * MiB, 2 * MiB, UADDR + 64 * MiB, 0, fds[3])]
        assert await in_thread(w.a.set_mem_table, new) == 1
        event = error_event(w, "SET_MEM_TABLE")
        assert event["error_kind"] == "views-in-use" and event["removed"] == 3
        assert [r["gpa"] for r in event["details"]["unmap_failed"]] == [4 * MiB]
        assert "1 old region(s) could not be unmapped (region gpa=0x400000 " in event["error"]
        assert "gpa=0x0 " not in event["error"] and "gpa=0x800000 " not in event["error"]
        for gpa in (0, 8 * MiB):  # tried and gone, although the middle one failed
            assert not maps_at(addresses[gpa])
        assert maps_at(addresses[4 * MiB])
        listed = [(r["gpa"], "unmap_failed" in r) for r in regions_doc(w.backend)["regions"]]
        assert listed == [(4 * MiB, True), (64 * MiB, False)]
        view.release()
        assert await in_thread(w.a.set_mem_table, new) == 0  # the next one tries it again
        close_all(fds)
        assert not maps_at(addresses[4 * MiB])
        assert [r["gpa"] for r in regions_doc(w.backend)["regions"]] == [64 * MiB]


async def test_disconnect_reports_a_region_left_mapped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vhostmem")
    async with no_leaks(), wired() as w:
        fds = memfds(2)
        for i, fd in enumerate(fds):
            gpa = i * 4 * MiB
            assert await in_thread(w.a.add_region, gpa, 2 * MiB, UADDR + gpa, 0, fd) == 0
        close_all(fds)
        view = held_view(w, 4 * MiB)
        region = w.conn_a.session.table.lookup_gpa(4 * MiB)
        w.a.close()
        await wait_until(lambda: w.backend.sockets.get("a") is None, "connection a to end")
        [event] = [e for e in w.backend.booking.events if e.get("event") == "disconnect"]
        assert event["released"] == 1
        [stuck] = event["unmap_failed"]
        assert stuck["gpa"] == 4 * MiB and "memoryview" in stuck["unmap_failed"]
        assert any(
            "region gpa=0x400000 size=0x200000" in r.getMessage()
            and "stays mapped after the connection ended" in r.getMessage()
            for r in caplog.records
        )
        assert w.backend.mapper.stats.maps == 1  # the one left mapped, nothing else
        view.release()
        region.handle.close()  # nothing else would: the session is gone


# -- explicit cases: broken framing closes that connection only ---------------------------------


async def test_size_field_larger_than_any_payload() -> None:
    async with no_leaks(), wired() as w:
        head = encode_request(Request.ADD_MEM_REG, MemRegMsg(MemoryRegion(0, MiB, UADDR, 0)))
        bad = head[:8] + (MAX_PAYLOAD_SIZE + 1).to_bytes(4, "little") + head[12:]
        fds = memfds(3)
        await in_thread(w.a.send_raw, bad, fds)
        close_all(fds)
        await wait_until(lambda: w.backend.sockets.get("a") is None, "a to close")
        assert "cannot be trusted" in disconnect_reason(w.backend, "a")
        with pytest.raises((ConnectionError, OSError)):
            await in_thread(w.a.call, Request.GET_FEATURES)
        reply = await in_thread(w.b.call, Request.GET_FEATURES)
        assert reply is not None and reply.u64


@pytest.mark.parametrize("cut", [5, HEADER_SIZE, HEADER_SIZE + 17])
async def test_partial_message_then_eof(cut: int) -> None:
    async with no_leaks(), wired() as w:
        fds = memfds(1)
        await in_thread(w.a.send_raw, add_msg(0, MiB, UADDR, 0)[:cut], fds)
        close_all(fds)
        w.a.sock.shutdown(socket.SHUT_WR)
        await wait_until(lambda: w.backend.sockets.get("a") is None, "a to close")
        reason = disconnect_reason(w.backend, "a")
        assert "middle of a message" in reason and f"{cut} bytes" in reason
        reply = await in_thread(w.b.call, Request.GET_FEATURES)
        assert reply is not None and reply.u64


def read_until_eof(sock: socket.socket) -> bytes:
    """Everything until the back-end closes (a close with our bytes unread is a reset)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def check_replies(stream: bytes) -> int:
    """Every reply on the wire is one QEMU accepts; returns how many."""
    n = 0
    while stream:
        header = decode_header(stream[:HEADER_SIZE])
        assert header.flags == 0x5 and len(stream) >= HEADER_SIZE + header.size
        stream = stream[HEADER_SIZE + header.size :]
        n += 1
    return n


@pytest.mark.parametrize("seed", range(6))
async def test_random_bytes(seed: int) -> None:
    """Random bytes (some with fds) after the handshake, then EOF: whatever they frame as is
    answered or refused, the connection ends with a reason, nothing leaks, b never notices."""
    rng = random.Random(seed)
    async with no_leaks(), wired() as w:
        for _ in range(8):
            data = rng.randbytes(rng.randint(1, 300))
            if rng.random() < 0.5:
                # a plausible header in front: known code, flags 1 or 9, small size
                code = rng.choice(list(Request))
                size = rng.randint(0, 64)
                data = (
                    code.to_bytes(4, "little")
                    + rng.choice([1, 9]).to_bytes(4, "little")
                    + size.to_bytes(4, "little")
                    + data
                )
            fds = memfds(rng.randint(0, 3), MiB)
            try:
                await in_thread(w.a.send_raw, data, fds)
            except OSError:
                break  # the back-end already closed on broken framing
            finally:
                close_all(fds)
        w.a.sock.shutdown(socket.SHUT_WR)
        check_replies(await in_thread(read_until_eof, w.a.sock))
        await wait_until(lambda: w.backend.sockets.get("a") is None, "a to close")
        reason = disconnect_reason(w.backend, "a")
        assert "internal error" not in reason, reason
        reply = await in_thread(w.b.call, Request.GET_FEATURES)
        assert reply is not None and reply.u64


# -- stalls -------------------------------------------------------------------------------------


def spam_without_reading(path: str, count: int, done: list[float]) -> None:
    """Connect, handshake, then send ``count`` GET_FEATURES one by one and never read a reply;
    returns once the back-end has dropped the connection."""
    fe = FakeFrontend.connect(path, timeout=15)
    try:
        fe.handshake()
        message = encode_request(Request.GET_FEATURES)
        try:
            for _ in range(count):
                fe.sock.sendall(message)
            fe.sock.shutdown(socket.SHUT_WR)
            # only now read: the replies we left, then EOF once we are dropped
            while fe.sock.recv(65536):
                pass
        except OSError:
            pass  # dropped while we were still sending
    finally:
        done.append(time.monotonic())
        fe.close()


async def test_stalled_frontend_stalls_only_itself_and_is_dropped(tmp_path: Path) -> None:
    stall, good = str(tmp_path / "stall.sock"), str(tmp_path / "good.sock")
    control = str(tmp_path / "ctl.sock")
    config = ServerConfig(sockets=(stall, good), control=control, send_timeout=2.0)
    fds, maps = baseline()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            backend = await nursery.start(run, config)
            fe = await in_thread(FakeFrontend.connect, good)
            await in_thread(fe.handshake)
            done: list[float] = []
            started = time.monotonic()
            nursery.start_soon(in_thread, spam_without_reading, stall, 5000, done)
            # the stalled connection's replies pile up unread until vhostmem blocks sending ...
            await wait_until(lambda: backend.counters["requests"] > 100, "the spam to be read")
            last = -1
            while backend.counters["requests"] != last:
                last = backend.counters["requests"]
                await trio.sleep(0.05)
            assert backend.sockets[stall] is not None and not done
            # ... and everyone else is answered at once
            client = ControlClient(control, timeout=2)
            memfd = make_memfd(4 * MiB)
            for i in range(10):
                t0 = time.monotonic()
                assert await in_thread(fe.add_region, 0, 4 * MiB, UADDR, 0, memfd) == 0
                assert await in_thread(fe.rem_region, 0, 4 * MiB, UADDR) == 0
                stats = await in_thread(client.call, "stats")
                assert stats["version"] == 1
                if i == 0:
                    assert stats["connections_live"] == 2
                assert time.monotonic() - t0 < 0.75, "another socket waited for the stalled one"
            os.close(memfd)
            await wait_until(
                lambda: backend.sockets[stall] is None, "the stalled front-end to be dropped", 10
            )
            dropped = time.monotonic() - started
            reason = disconnect_reason(backend, stall)
            assert reason == (
                "vhostmem dropped the connection after the send timeout: the front-end has not "
                "read its replies for 2 s (socket buffer full; --send-timeout)"
            ), reason
            assert 2.0 <= dropped < 8, dropped
            await wait_until(lambda: done, "the spammer to see the drop")
            # the good connection never noticed
            assert await in_thread(fe.call, Request.GET_FEATURES) is not None
            assert [
                e
                for e in backend.booking.events
                if e.get("socket") == good and e.get("event") == "disconnect"
            ] == []
            fe.close()
            nursery.cancel_scope.cancel()
    assert live_fds() == fds and shared_maps() == maps


CAPTURE_CONFIG = textwrap.dedent(
    """
    import json, sys, trio
    from vhostmem import cli
    from vhostmem.server import ServerConfig

    def fake_run(fn, *args, **kwargs):  # the ServerConfig the command line built, as JSON
        parts = [*args, *getattr(fn, "args", ()), *getattr(fn, "keywords", {}).values()]
        [config] = [p for p in parts if isinstance(p, ServerConfig)]
        print(json.dumps({"batch_gap": config.batch_gap,
                          "linger": config.linger,
                          "book_after": config.book_after,
                          "allow_uids": list(config.allow_uids),
                          "socket_mode": config.socket_mode}))

    trio.run = fake_run
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def cli_config(*argv: str) -> dict[str, Any]:
    """What ``vhostmem ARGV`` puts in its ServerConfig (run in a child: main() binds sockets and
    takes SIGTERM over)."""
    done = subprocess.run(
        [sys.executable, "-c", CAPTURE_CONFIG, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_cli_linger_and_batch_gap_reach_the_server_config(tmp_path: Path) -> None:
    # --send-timeout and its default are driven for real in test_cli.py (a front-end that stops
    # reading is dropped after that long).
    sock = str(tmp_path / "vu.sock")
    config = cli_config("--socket", sock, "--linger-ms", "5", "--batch-gap", "7")
    assert config["linger"] == 0.005  # milliseconds on the command line, seconds in the config
    assert config["batch_gap"] == 0.007
    # and the defaults, as ServerConfig's own: no linger (a read that waits in the kernel holds
    # up every other front-end), booking after 1 ms of silence, 20 ms batch gap
    default = cli_config("--socket", sock)
    assert (default["linger"], default["book_after"], default["batch_gap"]) == (0.0, 0.001, 0.020)
    assert (ServerConfig().linger, ServerConfig().book_after, ServerConfig().batch_gap) == (
        0.0,
        0.001,
        0.020,
    )
    assert not os.path.exists(sock)


# -- faults -------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, sys, time
    from vhostmem.protocol import MemoryRegion, MemRegMsg, Request, encode_request
    from vhostmem.testing.frontend import FakeFrontend, make_memfd
    path, mode = sys.argv[1], sys.argv[2]
    fe = FakeFrontend.connect(path)
    fe.handshake()
    memfd = make_memfd(64 << 20)
    step = 8 << 20
    if mode == "mid-plug":
        for i in range(3):
            assert fe.add_region(i * step, step, 0x7F0000000000 + i * step, i * step, memfd) == 0
    region = MemoryRegion(3 * step, step, 0x7F0000000000 + 3 * step, 3 * step)
    msg = encode_request(Request.ADD_MEM_REG, MemRegMsg(region), need_reply=True)
    fe.send_raw(msg[: int(sys.argv[3])], [memfd])
    print("ready", flush=True)
    time.sleep(60)
    """
)


def start_child_frontend(path: str, mode: str, cut: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, path, mode, str(cut)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    ("mode", "cut", "released"),
    [("mid-message", 7, 0), ("mid-message", 30, 0), ("mid-plug", 20, 3)],
)
async def test_frontend_killed(tmp_path: Path, mode: str, cut: int, released: int) -> None:
    """SIGKILL a front-end process mid-message (an ADD half sent, with its fd) and mid-plug
    (three regions mapped, the fourth half sent): everything it gave us is released."""
    path = str(tmp_path / "vu.sock")
    fds, maps = baseline()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            backend = await nursery.start(run, ServerConfig(sockets=(path,), control=path + ".ctl"))
            child = start_child_frontend(path, mode, cut)
            try:
                assert child.stdout is not None
                line = await in_thread(child.stdout.readline)
                assert line.strip() == "ready", line
                await wait_until(lambda: backend.sockets[path] is not None, "the child to connect")
                conn = backend.sockets[path]
                await wait_until(lambda: conn.session.buffered == cut, "the half message to arrive")
                assert len(conn.session.table) == released
                assert backend.mapper.stats.maps == released
            finally:
                child.kill()
                await in_thread(child.wait)
                assert child.stdout is not None
                child.stdout.close()
            await wait_until(lambda: backend.sockets[path] is None, "the connection to end")
            [event] = [e for e in backend.booking.events if e.get("event") == "disconnect"]
            assert "middle of a message" in event["reason"] and event["released"] == released
            assert event.get("conn") == 1
            assert backend.mapper.stats.maps == 0
            # the socket serves the next front-end
            fe = await in_thread(FakeFrontend.connect, path)
            await in_thread(fe.handshake)
            fe.close()
            nursery.cancel_scope.cancel()
    assert live_fds() == fds and shared_maps() == maps


async def test_second_frontend_is_served_and_the_first_is_undisturbed(tmp_path: Path) -> None:
    path = str(tmp_path / "vu.sock")
    fds, maps = baseline()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            backend = await nursery.start(run, ServerConfig(sockets=(path,), control=path + ".ctl"))
            first = await in_thread(FakeFrontend.connect, path)
            await in_thread(first.handshake)
            second = await in_thread(FakeFrontend.connect, path)
            await in_thread(second.send, Request.GET_FEATURES)
            memfd = make_memfd(64 * MiB)
            for i in range(8):  # the first plugs and unplugs as if nobody else were there
                assert (
                    await in_thread(
                        first.add_region,
                        i * 8 * MiB,
                        8 * MiB,
                        UADDR + i * 8 * MiB,
                        i * 8 * MiB,
                        memfd,
                    )
                    == 0
                )
            for i in range(4):
                assert (
                    await in_thread(first.rem_region, i * 8 * MiB, 8 * MiB, UADDR + i * 8 * MiB)
                    == 0
                )
            # the second was answered meanwhile, on a connection of its own
            reply = await in_thread(second.recv_reply, Request.GET_FEATURES)
            assert reply.u64
            assert backend.counters["connections"] == 2
            assert len(backend.sockets[path].session.table) == 4
            first.close()
            await wait_until(lambda: len(backend.connections()) == 1, "the first to end")
            assert backend.mapper.stats.maps == 0  # the first's regions went with it
            assert [
                e["released"] for e in backend.booking.events if e.get("event") == "disconnect"
            ] == [4]
            second.close()
            os.close(memfd)
            nursery.cancel_scope.cancel()
    assert live_fds() == fds and shared_maps() == maps


def connect_cycles(path: str, n: int) -> None:
    for _ in range(n):
        fe = FakeFrontend.connect(path, timeout=5)
        reply = fe.call(Request.GET_FEATURES)
        assert reply is not None and reply.u64
        fe.close()


async def test_thousand_connect_disconnect_cycles(tmp_path: Path) -> None:
    path = str(tmp_path / "vu.sock")
    fds, maps = baseline()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            backend = await nursery.start(run, ServerConfig(sockets=(path,), control=path + ".ctl"))
            t0 = time.monotonic()
            await in_thread(connect_cycles, path, 1000)
            await wait_until(
                lambda: backend.counters["connections"] == 1000 and not backend.connections(),
                "the last disconnect",
            )
            elapsed = time.monotonic() - t0
            assert elapsed < 20, f"1000 cycles took {elapsed:.1f} s"
            disconnects = [e for e in backend.booking.events if e.get("event") == "disconnect"]
            assert len(disconnects) == 1000
            assert all(e["reason"] == "front-end closed the connection" for e in disconnects)
            assert backend.counters["errors"] == 0 and backend.mapper.stats.maps == 0
            nursery.cancel_scope.cancel()
    assert live_fds() == fds and shared_maps() == maps


def test_sigterm_while_a_request_is_in_flight(tmp_path: Path) -> None:
    running = start_backend(tmp_path, ["--inject", "ADD_MEM_REG:every:delay=5s"])
    memfd = make_memfd(8 * MiB)
    fe = FakeFrontend.connect(running.socket, timeout=10)
    try:
        fe.handshake()
        fe.send_raw(add_msg(0, 8 * MiB, UADDR, 0), [memfd])
        # handled (mapped) and now holding its reply back for 5 s
        running.wait_for(lambda: running.regions(), 5, "the region to be mapped")
        t0 = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        status = running.process.wait(5)
        elapsed = time.monotonic() - t0
        assert status == 0, running.stderr()[-2000:]
        assert elapsed < 3, f"exit took {elapsed:.1f} s: the delayed reply was waited for"
        assert not os.path.exists(running.socket) and not os.path.exists(running.control)
        assert read_until_eof(fe.sock) == b""  # no reply: the connection just ends
        lines = running.log_lines()
        assert lines[-1]["event"] == "disconnect" and lines[-1]["released"] == 1
        # vhostmem ended the connection, and says so: not "front-end closed the connection"
        assert lines[-1]["reason"] == "vhostmem shutting down (SIGTERM received)"
        stderr = running.stderr()
        assert "released 1 region(s); vhostmem shutting down (SIGTERM received)" in stderr
    finally:
        fe.close()
        os.close(memfd)
        running.stop()


def good_cycles(path: str, n: int) -> list[int]:
    acks = []
    memfd = make_memfd(64 * MiB)
    with FakeFrontend.connect(path) as fe:
        fe.handshake()
        for i in range(n):
            gpa = (i % 8) * 8 * MiB
            acks.append(fe.add_region(gpa, 8 * MiB, UADDR + gpa, gpa, memfd))
            acks.append(fe.rem_region(gpa, 8 * MiB, UADDR + gpa))
    os.close(memfd)
    return acks


def bad_connections(path: str, n: int) -> None:
    rng = random.Random(7)
    for i in range(n):
        with FakeFrontend.connect(path, timeout=5) as fe:
            kind = i % 4
            if kind == 0:
                fe.send_raw(rng.randbytes(200))
            elif kind == 1:
                fe.send_raw(
                    encode_request(Request.GET_FEATURES)[:8] + (1 << 31).to_bytes(4, "little")
                )
            elif kind == 2:
                fd = make_memfd(MiB)
                fe.send_raw(add_msg(0, MiB, UADDR, 0)[:20], [fd])
                os.close(fd)
            else:
                fe.handshake()
                fd = make_memfd(MiB)
                fe.send_raw(add_msg(0, MiB, UADDR, 0), [fd, fd, fd])
                os.close(fd)
            fe.sock.shutdown(socket.SHUT_WR)
            try:
                read_until_eof(fe.sock)
            except OSError:
                pass


async def test_misbehaving_socket_does_not_disturb_another(tmp_path: Path) -> None:
    good, bad = str(tmp_path / "good.sock"), str(tmp_path / "bad.sock")
    fds, maps = baseline()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            backend = await nursery.start(
                run, ServerConfig(sockets=(good, bad), control=good + ".ctl")
            )
            results: dict[str, Any] = {}

            async def run_good() -> None:
                results["acks"] = await in_thread(good_cycles, good, 150)

            async with trio.open_nursery() as both:
                both.start_soon(run_good)
                both.start_soon(in_thread, bad_connections, bad, 40)
            assert results["acks"] == [0] * 300
            await wait_until(lambda: not backend.connections(), "all connections to end")
            on_good = [e for e in backend.booking.events if e.get("socket") == good]
            assert [e for e in on_good if e.get("result") == "error"] == []
            assert [e["event"] for e in on_good if "request" not in e] == ["connect", "disconnect"]
            bad_disconnects = [
                e
                for e in backend.booking.events
                if e.get("socket") == bad and e.get("event") == "disconnect"
            ]
            assert len(bad_disconnects) == 40
            assert not [e for e in bad_disconnects if "internal error" in e["reason"]]
            nursery.cancel_scope.cancel()
    assert live_fds() == fds and shared_maps() == maps


# -- security -----------------------------------------------------------------------------------


async def test_sockets_are_created_0600(tmp_path: Path) -> None:
    path = str(tmp_path / "vu.sock")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run, ServerConfig(sockets=(path,), control=path + ".ctl"))
            for p in (path, path + ".ctl"):
                st = os.stat(p)
                assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(
                    st.st_mode
                )
            nursery.cancel_scope.cancel()


def test_socket_mode_option_sets_both_sockets(tmp_path: Path) -> None:
    running = start_backend(tmp_path, ["--socket-mode", "0660"])
    try:
        for p in (running.socket, running.control):
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o660
        assert running.stats()["version"] == 1
    finally:
        assert running.stop() == 0


async def test_peer_credentials_in_event_log_and_regions(tmp_path: Path) -> None:
    path = str(tmp_path / "vu.sock")
    log = tmp_path / "events.jsonl"
    me = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                run, ServerConfig(sockets=(path,), control=path + ".ctl", event_log=str(log))
            )
            fe = await in_thread(FakeFrontend.connect, path)
            await in_thread(fe.handshake)
            memfd = make_memfd(MiB)
            assert await in_thread(fe.add_region, 0, MiB, UADDR, 0, memfd) == 0
            os.close(memfd)
            doc = await in_thread(ControlClient(path + ".ctl").call, "regions")
            [region] = doc["regions"]
            assert region["peer_pid"] == me["pid"]
            [sock] = doc["sockets"]
            [conn] = sock["connections"]
            assert conn["peer"] == me
            fe.close()
            nursery.cancel_scope.cancel()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    [connect] = [e for e in lines if e.get("event") == "connect"]
    assert connect["peer"] == me
    [add] = [e for e in lines if e.get("request") == "ADD_MEM_REG"]
    assert add["peer_pid"] == me["pid"]


async def test_allow_uid_refuses_other_peers_with_a_logged_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "vu.sock")
    log = tmp_path / "events.jsonl"
    other = os.getuid() + 4242
    config = ServerConfig(
        sockets=(path,), control=path + ".ctl", event_log=str(log), allow_uids=(other, other + 1)
    )
    caplog.set_level(logging.WARNING, logger="vhostmem")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            backend = await nursery.start(run, config)
            fe = await in_thread(FakeFrontend.connect, path)
            with pytest.raises((ConnectionError, OSError)):
                await in_thread(fe.call, Request.GET_FEATURES)
            fe.close()
            with pytest.raises(ControlError):
                await in_thread(ControlClient(path + ".ctl", timeout=5).call, "stats")
            await wait_until(
                lambda: (
                    len([e for e in backend.booking.events if e.get("event") == "refused"]) == 2
                ),
                "two refusals",
            )
            assert backend.connections() == []
            nursery.cancel_scope.cancel()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    refusals = [e for e in lines if e.get("event") == "refused"]
    assert {e["socket"] for e in refusals} == {path, "control"}
    for e in refusals:
        assert (
            f"uid {os.getuid()}" in e["reason"]
            and f"--allow-uid {other} {other + 1}" in e["reason"]
        )
    assert refusals[0]["peer"]["uid"] == os.getuid() and refusals[0]["peer"]["pid"] == os.getpid()
    assert any(
        "refused" in r.getMessage() and "is not allowed" in r.getMessage() for r in caplog.records
    )
    assert not [e for e in lines if e.get("event") == "connect"]


def test_allow_uid_is_repeatable_on_the_command_line(tmp_path: Path) -> None:
    sock = str(tmp_path / "x.sock")
    assert cli_config("--socket", sock, "--allow-uid", "7", "--allow-uid", "0")["allow_uids"] == [
        7,
        0,
    ]
    assert cli_config("--socket", sock) == {
        "batch_gap": 0.020,
        "linger": 0.0,
        "book_after": 0.001,
        "allow_uids": [],
        "socket_mode": 0o600,
    }
    assert cli_config("--socket", sock, "--socket-mode", "0640")["socket_mode"] == 0o640


async def test_allow_uid_accepts_the_listed_uid(tmp_path: Path) -> None:
    config = ServerConfig(allow_uids=(7, os.getuid()))
    path = str(tmp_path / "vu.sock")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                run,
                ServerConfig(sockets=(path,), control=path + ".ctl", allow_uids=config.allow_uids),
            )
            fe = await in_thread(FakeFrontend.connect, path)
            assert (await in_thread(fe.call, Request.GET_FEATURES)) is not None
            fe.close()
            assert (await in_thread(ControlClient(path + ".ctl").call, "stats"))["version"] == 1
            nursery.cancel_scope.cancel()


async def test_a_path_that_is_not_a_socket_is_never_removed(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    target = tmp_path / "target"
    target.write_text("keep me too")
    link = tmp_path / "link"
    link.symlink_to(target)
    sock = str(tmp_path / "vu.sock")
    for socket_path, control in (
        (str(plain), sock + ".ctl"),
        (sock, str(plain)),
        (str(link), sock + ".ctl"),
        (sock, str(link)),
    ):
        with trio.fail_after(10):
            try:
                await run(ServerConfig(sockets=(socket_path,), control=control))
            except BaseException as err:  # SocketError, maybe inside an ExceptionGroup
                assert "not a socket" in repr(err), repr(err)
            else:
                raise AssertionError("run() served on a path that is not a socket")
        assert plain.read_text() == "keep me" and target.read_text() == "keep me too"
        assert link.is_symlink()
        # ours, removed
        assert not await trio.Path(sock).exists() and not await trio.Path(sock + ".ctl").exists()
    # our socket replaced by a file while we run: left alone at exit
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run, ServerConfig(sockets=(sock,), control=sock + ".ctl"))
            os.unlink(sock)
            await trio.Path(sock).write_text("someone else's")
            nursery.cancel_scope.cancel()
    assert await trio.Path(sock).read_text() == "someone else's"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_bind_never_removes_a_non_socket_at_its_temporary_name(tmp_path: Path) -> None:
    """bind_unix_socket binds ``.NAME.PID.tmp`` beside the path first; a file of someone else's
    that happens to have that name must not be unlinked."""
    path = tmp_path / "vu.sock"
    temp = tmp_path / f".vu.sock.{os.getpid()}.tmp"
    temp.write_text("not ours")
    try:
        sock = bind_unix_socket(str(path), 0o600)
    except SocketError:
        pass  # refusing is fine too
    else:
        sock.close()
    assert temp.exists() and temp.read_text() == "not ours"


async def test_a_socket_we_did_not_create_is_not_removed_at_exit(tmp_path: Path) -> None:
    """Our socket file was replaced by another server's socket while we ran: at exit we remove
    only the socket we created (the same inode), not the other server's."""
    path = str(tmp_path / "vu.sock")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run, ServerConfig(sockets=(path,), control=path + ".ctl"))
            os.unlink(path)
            theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            theirs.bind(path)
            theirs.listen(1)
            nursery.cancel_scope.cancel()
    try:
        assert await trio.Path(path).exists(), "vhostmem removed another server's socket"
    finally:
        theirs.close()


async def test_wire_bytes_are_never_paths_or_format_strings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Payloads full of %-formats, {}-formats and paths: logged and recorded as data only."""
    caplog.set_level(logging.DEBUG, logger="vhostmem")
    evil = b"%s%n%x{0}{.__class__}../../" + str(tmp_path / "pwned").encode() + b"\0"
    async with no_leaks(), wired(event_log=str(tmp_path / "events.jsonl")) as w:
        for code in (
            200,
            int(Request.SET_LOG_BASE),
            int(Request.GET_CONFIG),
            int(Request.SET_MEM_TABLE),
        ):
            await in_thread(w.a.send_raw, encode_request(code, evil, need_reply=True))
            if code in (int(Request.GET_CONFIG),):
                await in_thread(w.a.recv_reply, code)
            else:
                assert (await in_thread(w.a.recv_reply, code)).u64 != 0
        await still_up(w)
        # the control socket: names and numbers looked up, never opened or formatted
        for request in (
            {"cmd": "%s%n", "args": {}},
            {"cmd": "peek", "args": {"gpa": 0, "len": 8, "socket": str(tmp_path / "pwned")}},
            {"cmd": "events", "args": {"limit": "%d"}},
            {"cmd": "regions", "args": {"merged": True, "markers": [[0, 1, "%s%s%s{0}"]]}},
        ):
            reply = answer(w.backend, json.dumps(request).encode())
            assert "internal error" not in json.dumps(reply)
    for record in caplog.records:
        record.getMessage()  # every record formats (a wire %s as the format would raise or lie)
        assert "pwned" not in str(record.msg), record.msg
    assert not (tmp_path / "pwned").exists()
    for line in (tmp_path / "events.jsonl").read_text().splitlines():
        json.loads(line)
