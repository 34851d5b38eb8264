"""Shared helpers for unit tests: a fake host for the sans-IO session, leak counters, the
trio helpers the shell tests share (a blocking call in a thread, polling with a deadline), and a
back-end with QEMU-like fake front-ends over socketpairs (``start_pair``, ``wired``)."""

from __future__ import annotations

import fcntl
import gc
import itertools
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from vhostmem.errors import MappingError
from vhostmem.protocol import MemoryRegion
from vhostmem.server import Backend, ServerConfig
from vhostmem.session import SessionConfig
from vhostmem.testing.frontend import FakeFrontend


def open_fds() -> set[int]:
    """The process's open fds right now."""
    return {int(n) for n in os.listdir("/proc/self/fd")}


def map_lines() -> list[str]:
    with open("/proc/self/maps", encoding="ascii") as f:
        return f.read().splitlines()


def shared_maps() -> list[str]:
    """Shared mappings (guest memory is always MAP_SHARED); thread stacks come and go, these
    must not."""
    return [line for line in map_lines() if line.split()[1][3] == "s"]


def live_fds() -> set[int]:
    """``open_fds()`` without the fd that listing /proc/self/fd itself used."""
    live = set()
    for fd in open_fds():
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        live.add(fd)
    return live


def baseline() -> tuple[set[int], list[str]]:
    """fds and shared maps before a test; objects earlier tests dropped are collected first
    (their sockets would otherwise close in the middle of ours)."""
    gc.collect()
    return live_fds(), shared_maps()


@asynccontextmanager
async def no_leaks() -> AsyncIterator[None]:
    """The block leaves the process's fds and shared maps as it found them."""
    fds, maps = baseline()
    yield
    assert live_fds() == fds, "fds leaked"
    assert shared_maps() == maps, "shared mappings leaked"


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking call (the fake front-end) in a worker thread."""
    return await trio.to_thread.run_sync(fn, *args)


async def wait_until(predicate: Callable[[], Any], what: str, seconds: float = 10) -> Any:
    """Poll what other tasks and threads change; fail naming ``what``."""
    deadline = trio.current_time() + seconds
    while not (value := predicate()):
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        await trio.sleep(0.01)
    return value


# -- a back-end with QEMU-like connections over socketpairs -------------------------------------


async def start_pair(backend: Backend, nursery: trio.Nursery, name: str = "pair") -> FakeFrontend:
    """Serve one end of a socketpair as connection ``name``; the fake front-end holds the other."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    nursery.start_soon(backend.serve_connection, ours, name)
    return FakeFrontend(theirs, timeout=10)


@dataclass
class Wire:
    backend: Backend
    a: FakeFrontend
    b: FakeFrontend

    @property
    def conn_a(self) -> Any:
        conn = self.backend.sockets.get("a")
        assert conn is not None, "connection a was closed"
        return conn

    def table(self) -> list[tuple[int, int, int, int]]:
        return [(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in self.conn_a.session.table]


@asynccontextmanager
async def wired(session: SessionConfig | None = None, **config: Any) -> AsyncIterator[Wire]:
    """Connections "a" and "b", both after QEMU's handshake (REPLY_ACK, CONFIGURE_MEM_SLOTS)."""
    backend = Backend(ServerConfig(session=session or SessionConfig(), **config))
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                a = await start_pair(backend, nursery, "a")
                b = await start_pair(backend, nursery, "b")
                await in_thread(a.handshake)
                await in_thread(b.handshake)
                assert a.reply_ack and b.reply_ack
                yield Wire(backend, a, b)
                a.close()
                b.close()
                await wait_until(lambda: not backend.connections(), "both connections to end")
                nursery.cancel_scope.cancel()
    finally:
        backend.cleanup()
    assert backend.mapper.stats.maps == 0


# -- the sans-IO session's shell, faked ----------------------------------------------------------


@dataclass
class FakeHost:
    """Records what the session asks of its shell; maps nothing.

    fds are plain numbers handed out by ``new_fd``; the host tracks which are open.
    """

    open: set[int] = field(default_factory=set)
    mapped: dict[int, MemoryRegion] = field(default_factory=dict)
    file_ids: dict[int, tuple[int, int]] = field(default_factory=dict)
    fail_map: set[int] = field(default_factory=set)  # fail the n-th map call (1-based)
    # unmaps of the mapping at this gpa fail with this reason (munmap refused) until removed
    fail_unmap: dict[int, str] = field(default_factory=dict)
    unmaps_tried: list[int] = field(default_factory=list)  # gpa of every unmap attempted
    maps_done: int = 0
    _numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1000))
    _handles: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def new_fd(self, file_id: tuple[int, int] | None = None) -> int:
        fd = next(self._numbers)
        self.open.add(fd)
        if file_id is not None:
            self.file_ids[fd] = file_id
        return fd

    def map_region(
        self, request: str, region: MemoryRegion, fd: int, fail_errno: int | None = None
    ) -> tuple[Any, dict[str, Any]]:
        assert fd in self.open, f"map of fd {fd} that is not open"
        self.open.discard(fd)  # consumed on success and failure
        self.maps_done += 1
        if fail_errno is not None:
            raise MappingError(
                f"{request}: mmap failed errno {fail_errno}",
                errno=fail_errno,
                kind="injected-errno",
            )
        if self.maps_done in self.fail_map:
            raise MappingError(
                f"{request}: injected failure gpa=0x{region.guest_phys_addr:x}", kind="test"
            )
        handle = next(self._handles)
        self.mapped[handle] = region
        return handle, {"backing": "fake"}

    def unmap_region(self, handle: Any) -> None:
        gpa = self.mapped[handle].guest_phys_addr
        self.unmaps_tried.append(gpa)
        if gpa in self.fail_unmap:
            raise MappingError(
                f"munmap failed for gpa=0x{gpa:x}: {self.fail_unmap[gpa]}", kind="munmap-failed"
            )
        del self.mapped[handle]

    def close_fd(self, fd: int) -> None:
        assert fd in self.open, f"close of fd {fd} that is not open"
        self.open.discard(fd)

    def file_id(self, fd: int) -> tuple[int, int] | None:
        return self.file_ids.get(fd, (0, fd))
