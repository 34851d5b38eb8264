"""Bytes and file descriptors received from one front-end, by stream offset.

The shape of h11's ``_receivebuffer.py`` (a buffer the protocol object owns, extracted from by
count), plus the one rule vhost-user adds: file descriptors arrive beside bytes (SCM_RIGHTS), and
a batch belongs to the message that contains the first byte of the chunk it came with. That is
where QEMU attaches them (header, payload and fds in one ``sendmsg``,
hw/virtio/vhost-user.c ``vhost_user_write``) and where the shell reads them (``recvmsg`` of the
header, as libvhost-user's ``vu_message_read_default`` does).

Pure: no I/O; the fds are plain numbers the owner of the buffer closes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import final

__all__ = ["ReceiveBuffer"]


@final
class ReceiveBuffer:
    """The unhandled part of one stream: its bytes, and the fds waiting for their message."""

    def __init__(self) -> None:
        self._data = bytearray()
        #: Stream offset of ``_data[0]``: bytes extracted so far.
        self._start = 0
        #: ``(stream offset of the chunk's first byte, its fds)``, oldest first.
        self._fds: deque[tuple[int, list[int]]] = deque()

    def __len__(self) -> int:
        return len(self._data)

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Append a chunk of the stream and the fds that came with it (the buffer holds them)."""
        batch = list(fds)
        if batch:
            self._fds.append((self._start + len(self._data), batch))
        self._data += data

    def peek(self, count: int) -> bytes:
        """The first ``count`` bytes, left in the buffer."""
        return bytes(self._data[:count])

    def extract(self, count: int, *, skip: int = 0) -> tuple[bytes, list[int]]:
        """Take the next ``count`` bytes (one message) and the fds that belong to it.

        Args:
            count: how many bytes the message has; the caller checked that they are here.
            skip: leading bytes not to copy out (a header already decoded from :meth:`peek`).

        Returns:
            ``data[skip:count]`` and the fds of every chunk whose first byte lies in the message
            (chunks that started earlier went with earlier messages).
        """
        data = bytes(self._data[skip:count]) if count > skip else b""
        del self._data[:count]
        self._start += count
        fds: list[int] = []
        pending = self._fds
        while pending and pending[0][0] < self._start:
            fds.extend(pending.popleft()[1])
        return data, fds

    def held_fds(self) -> list[int]:
        """Every fd waiting for its message, oldest first (the buffer still owns them)."""
        return [fd for _, batch in self._fds for fd in batch]

    def clear(self) -> list[int]:
        """Drop every byte; return every fd still held, for the caller to close."""
        fds = self.held_fds()
        self._fds.clear()
        self._data.clear()
        return fds
