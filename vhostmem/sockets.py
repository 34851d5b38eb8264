"""Creating and removing the Unix sockets vhostmem listens on. Stdlib only, so the command line
can bind its sockets before importing the rest (the kernel queues QEMU's connection until the
server loop runs; tools/bench's launch row times exec to accepting).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass, field

from vhostmem.errors import VhostMemError

__all__ = [
    "BoundSockets",
    "SocketError",
    "bind_unix_socket",
    "is_listening",
    "open_sockets",
    "remove_our_socket",
]


#: path -> (st_dev, st_ino) of each socket file this process created.
_CREATED: dict[str, tuple[int, int]] = {}


class SocketError(VhostMemError):
    """A socket path cannot be used (exists and is not a socket, or someone listens there)."""


def bind_unix_socket(path: str, mode: int) -> socket.socket:
    """Listen on ``path`` so that the path appears only once it accepts.

    Binds a temporary name in the same directory, sets ``mode``, listens, then renames it over
    ``path``. A stale socket at ``path`` (nobody accepts) is replaced; a live one or anything that
    is not a socket is refused and left as it is.

    Raises:
        SocketError: the path is taken.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketError(
                f"{path} exists and is not a socket; vhostmem will not replace it (remove it or "
                "choose another --socket path)"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except OSError:
            pass  # stale: nobody accepts there
        else:
            raise SocketError(f"{path}: another process is listening on this socket")
        finally:
            probe.close()
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(temp).st_mode):
            raise SocketError(f"{temp} exists and is not a socket; vhostmem will not replace it")
        os.unlink(temp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(temp)
        finally:
            os.umask(old_umask)
        os.chmod(temp, mode)
        sock.listen(16)
        os.rename(temp, path)
        st = os.lstat(path)
        _CREATED[path] = (st.st_dev, st.st_ino)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return sock


def remove_our_socket(path: str) -> None:
    """Remove a socket file we created, but never anything that is not a socket."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        # Only the socket file we made: another server may have replaced it since.
        if stat.S_ISSOCK(st.st_mode) and _CREATED.pop(path, None) == (st.st_dev, st.st_ino):
            os.unlink(path)


def is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


@dataclass
class BoundSockets:
    """Every socket vhostmem serves, opened before the server loop starts.

    Attributes:
        listeners: (socket, name) pairs that accept front-ends.
        connected: (socket, name) pairs already connected (``--fd`` of a connected socket).
        control: the control socket's listener, if any.
        created: paths we created (and so remove at exit).
    """

    listeners: list[tuple[socket.socket, str]] = field(default_factory=list)
    connected: list[tuple[socket.socket, str]] = field(default_factory=list)
    control: socket.socket | None = None
    created: list[str] = field(default_factory=list)

    def close(self) -> None:
        """Close every socket and remove the paths we created."""
        for sock, _ in self.listeners + self.connected:
            sock.close()
        if self.control is not None:
            self.control.close()
        for path in self.created:
            remove_our_socket(path)
        self.created.clear()


def open_sockets(
    paths: tuple[str, ...], fds: tuple[int, ...], control: str | None, mode: int
) -> BoundSockets:
    """Bind every socket path, adopt every inherited fd, bind the control socket.

    Raises:
        SocketError, OSError: a path is taken or cannot be bound; nothing stays open or created.
    """
    bound = BoundSockets()
    try:
        for path in paths:
            bound.listeners.append((bind_unix_socket(path, mode), path))
            bound.created.append(path)
        for fd in fds:
            sock = socket.socket(fileno=fd)
            if sock.family != socket.AF_UNIX:
                sock.detach()
                raise SocketError(f"--fd {fd} is not a Unix socket")
            name = f"fd:{fd}"
            (bound.listeners if is_listening(sock) else bound.connected).append((sock, name))
        if control:
            bound.control = bind_unix_socket(control, mode)
            bound.created.append(control)
    except BaseException:
        bound.close()
        raise
    return bound
