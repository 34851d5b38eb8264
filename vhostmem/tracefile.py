"""Following QEMU's trace log as QEMU writes it (``--qemu-trace``): the I/O half of qemu_trace.

QEMU opens its ``-D FILE`` at start (truncating it) and flushes every line
(util/log.c ``qemu_log_unlock``), so the follower reads what was appended since its last look.
The file may not exist yet when vhostmem starts, may be replaced when QEMU restarts (a new inode,
or the same inode truncated), and holds other trace events too; only whole lines are parsed,
every understood line goes to every connection's :class:`~vhostmem.qemu_trace.Pairer` attached
to this file. A replacement is detected by the inode, by a size below what was read, and by the
file's first bytes changing (QEMU may truncate and write past the old size between two looks).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Final, final

import trio

from vhostmem.qemu_trace import DEFAULT_WAIT, Pairer, parse_lines

__all__ = ["POLL_INTERVAL", "TraceFollower"]

logger = logging.getLogger(__name__)

#: Seconds between two looks at the file when nothing asks sooner.
POLL_INTERVAL: Final = 0.05
#: Bytes of the file's start remembered to tell a rewritten file from a grown one.
_HEAD: Final = 64
#: Bytes read at most per look (a huge backlog is read over several looks).
_CHUNK: Final = 1 << 20


@final
class TraceFollower:
    """One QEMU trace file, read incrementally, feeding the pairers attached to it.

    Args:
        path: the file QEMU writes with ``-D``.
        wait: seconds a request waits for its lines (``Pairer.wait``).
    """

    def __init__(self, path: str, wait: float = DEFAULT_WAIT) -> None:
        self.path = path
        self.wait = wait
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._offset = 0
        self._head = b""
        self._partial = b""
        self._lineno = 0
        self._pairers: list[Pairer] = []
        self._missing_logged = False

    @property
    def exists(self) -> bool:
        """Whether the file is open (it existed at the last look)."""
        return self._fd is not None

    def attach(self) -> Pairer:
        """A pairer for a new connection: fed every line written from now on.

        Returns:
            The pairer; :meth:`detach` it when the connection ends.
        """
        self.poll()
        pairer = Pairer(self.path, present=self.exists, wait=self.wait)
        self._pairers.append(pairer)
        return pairer

    def detach(self, pairer: Pairer) -> None:
        """Stop feeding ``pairer``."""
        with contextlib.suppress(ValueError):
            self._pairers.remove(pairer)

    def poll(self) -> None:
        """Read what was appended since the last look and feed it; notice a replaced file."""
        try:
            st = os.stat(self.path)
        except OSError:
            if self._fd is not None:
                self._replaced("the file was removed")
            elif not self._missing_logged:
                logger.info("waiting for QEMU's trace file %s to appear", self.path)
                self._missing_logged = True
            return
        ident = (st.st_dev, st.st_ino)
        if self._fd is not None and ident != self._ident:
            self._replaced(f"inode {self._ident[1] if self._ident else '?'} -> {st.st_ino}")
        elif self._fd is not None and st.st_size < self._offset:
            self._replaced(f"truncated from {self._offset} to {st.st_size} bytes")
        elif self._fd is not None and self._head and st.st_size >= len(self._head):
            if os.pread(self._fd, len(self._head), 0) != self._head:
                self._replaced("rewritten from its start")
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as err:
                logger.warning("cannot open QEMU's trace file %s: %s", self.path, err)
                return
            self._ident = ident
            logger.info("following QEMU's trace file %s", self.path)
        self._read()

    def _read(self) -> None:
        assert self._fd is not None
        data = os.pread(self._fd, _CHUNK, self._offset)
        if not data:
            return
        if len(self._head) < _HEAD and self._offset < _HEAD:
            self._head = (self._head + data)[:_HEAD]
        self._offset += len(data)
        data = self._partial + data
        *whole, self._partial = data.split(b"\n")
        if not whole:
            return
        texts = [w.decode("utf-8", "replace") for w in whole]
        lines = parse_lines(texts, self._lineno + 1)
        self._lineno += len(texts)
        if lines:
            for pairer in self._pairers:
                pairer.feed(lines)

    def _replaced(self, detail: str) -> None:
        logger.warning(
            "QEMU's trace file %s was replaced (%s): pairing ends for the connections that "
            "were following it",
            self.path,
            detail,
        )
        for pairer in self._pairers:
            pairer.replaced(detail)
        self.close()
        self._offset = 0
        self._head = b""
        self._partial = b""
        self._lineno = 0

    async def run(self) -> None:
        """Look at the file every :data:`POLL_INTERVAL` seconds, for ever."""
        while True:
            try:
                self.poll()
            except OSError as err:  # a read error must not end the back-end
                logger.warning("cannot read QEMU's trace file %s: %s", self.path, err)
            await trio.sleep(POLL_INTERVAL)

    def close(self) -> None:
        """Close the file (a later look opens it again)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._ident = None
