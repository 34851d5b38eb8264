"""Moving bytes and file descriptors over a Unix stream socket, the trio way, syscall first.

Each read is one ``recvmsg`` with room for file descriptors (SCM_RIGHTS), received with
``MSG_CMSG_CLOEXEC`` so no fd of QEMU's leaks into a child we start. We try the syscall first
and only wait for readability (through trio) when it says EAGAIN: one syscall per message on the
hot path instead of a scheduler round trip. With a linger, the syscall itself waits briefly in
the kernel for the next message (see :class:`FdStream`).

We never read past the end of the message in hand: the session says how many bytes complete it
(:attr:`Session.bytes_wanted`): the 12-byte header first, then exactly its payload, the way
libvhost-user's ``vu_message_read_default`` reads. That matters for fds: a Unix stream socket
glues the tail of one ``sendmsg`` to the start of the next one that carries fds, so a larger read
could hand us message B's fds together with message A's last bytes.
"""

from __future__ import annotations

import array
import errno
import math
import os
import socket
import struct
from dataclasses import dataclass
from typing import final

import trio

from vhostmem.errors import FramingError

__all__ = ["MAX_FDS_PER_READ", "FdStream", "Peer", "peer_credentials"]

#: SET_MEM_TABLE carries at most 8 fds; leave room for a hostile front-end's extras so they are
#: received (and then closed) rather than cut off with MSG_CTRUNC.
MAX_FDS_PER_READ = 253  # SCM_MAX_FD in the kernel
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_READ * array.array("i").itemsize)
#: A plain int: ``socket.MSG_CTRUNC`` is an IntFlag, whose ``&`` runs in Python (enum.py
#: Flag.__and__), and every message with fds tests it.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


def _unpack_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    return fds


@final
class FdStream:
    """A connected Unix stream socket that carries fds, for one front-end.

    Args:
        sock: a connected ``AF_UNIX``/``SOCK_STREAM`` socket; the stream owns it.
        linger: seconds a read may wait in the kernel for the front-end's next message before
            it gives up with "nothing yet" (``SO_RCVTIMEO``; Linux rounds it up to whole
            ticks, net/core/sock.c ``sock_set_timeout``, and the wait can end a tick later);
            0 (vhostmem's default) makes every read non-blocking. QEMU sends memory updates
            as a ping-pong (a request, our ack, the next request); waiting in the kernel for
            the next one costs one syscall where a trip through trio costs several. While a
            read lingers, the process's other tasks wait too: another front-end's request
            waits until that read times out (tools/bench's "GET_FEATURES, 2nd front-end" row
            shows it).
    """

    def __init__(self, sock: socket.socket, linger: float = 0.0) -> None:
        if linger > 0:
            # A blocking fd whose reads time out; every send passes MSG_DONTWAIT instead.
            sock.setblocking(True)
            seconds, micros = divmod(max(1, math.ceil(linger * 1e6)), 1_000_000)
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, micros)
            )
        else:
            sock.setblocking(False)
        self.sock = sock
        # One task owns a connection and sends its replies in order; a second concurrent sender
        # would interleave bytes, so catch it (trio's ConflictDetector idea) instead of paying
        # for a lock on every reply.
        self._sending = False

    def try_receive(self, max_bytes: int) -> tuple[bytes, list[int]] | None:
        """One ``recvmsg`` of up to ``max_bytes``: ``None`` when nothing came within the linger.

        Returns:
            The bytes (``b""`` at end of stream) and the fds that came with them.

        Raises:
            FramingError: the kernel cut off fds (MSG_CTRUNC) or the socket failed.
        """
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(
                max_bytes, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return None
        except OSError as err:
            if err.errno in (errno.ECONNRESET, errno.EPIPE):
                return b"", []
            raise FramingError(f"receive failed: {err}") from err
        if not ancdata:
            return data, []
        fds = _unpack_fds(ancdata)
        if flags & _MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise FramingError(
                "the front-end sent more file descriptors than fit in one message "
                f"({MAX_FDS_PER_READ}); the kernel cut them off (MSG_CTRUNC)"
            )
        return data, fds

    async def wait_readable(self) -> None:
        """Wait (through trio) until the front-end has sent something."""
        await trio.lowlevel.wait_readable(self.sock)

    def send_now(self, data: bytes | memoryview) -> int:
        """Send what the socket takes right now, without waiting; returns the bytes sent.

        Replies are small and the socket buffer is almost always free, so the shell tries this
        first and only sets up a timeout for what is left (a cancel scope per reply costs more
        than the send).

        Raises:
            trio.BrokenResourceError: the front-end went away.
        """
        try:
            return self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0
        except OSError as err:
            raise trio.BrokenResourceError(f"send failed: {err}") from err

    async def send_all(self, data: bytes) -> None:
        """Send every byte, waiting for room when the front-end does not read.

        Raises:
            trio.BrokenResourceError: the front-end went away.
            trio.BusyResourceError: another task is sending on this connection.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this connection")
        self._sending = True
        try:
            view = memoryview(data)
            while view:
                sent = self.send_now(view)
                if not sent:
                    await trio.lowlevel.wait_writable(self.sock)
                view = view[sent:]
        finally:
            self._sending = False

    def close(self) -> None:
        self.sock.close()


@dataclass(slots=True)
class Peer:
    """Who is on the other end (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int

    def as_json(self) -> dict[str, int]:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid}


def peer_credentials(sock: socket.socket) -> Peer | None:
    """SO_PEERCRED of a connected Unix socket."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)
