"""The process's fds and shared mappings, for tests that nothing leaks."""

from __future__ import annotations

import fcntl
import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


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
