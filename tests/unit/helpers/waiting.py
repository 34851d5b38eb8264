"""trio helpers the shell tests share: a blocking call in a thread, polling with a deadline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio


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
