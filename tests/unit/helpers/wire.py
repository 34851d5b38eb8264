"""A back-end with QEMU-like fake front-ends over socketpairs (``start_pair``, ``wired_one``,
``wired``)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from vhostmem.server import Backend, ServerConfig
from vhostmem.session import SessionConfig
from vhostmem.testing.frontend import FakeFrontend

from .waiting import in_thread, wait_until


async def start_pair(backend: Backend, nursery: trio.Nursery, name: str = "pair") -> FakeFrontend:
    """Serve one end of a socketpair as connection ``name``; the fake front-end holds the other."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    nursery.start_soon(backend.serve_connection, ours, name)
    return FakeFrontend(theirs, timeout=10)


@asynccontextmanager
async def wired_one(**config: Any) -> AsyncIterator[tuple[Backend, FakeFrontend]]:
    """One connection "pair" after QEMU's handshake; closed, and the back-end cleaned up,
    when the block ends (the front-end may have closed already)."""
    backend = Backend(ServerConfig(**config))
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                fe = await start_pair(backend, nursery)
                await in_thread(fe.handshake)
                yield backend, fe
                fe.close()
                nursery.cancel_scope.cancel()
    finally:
        backend.cleanup()


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
