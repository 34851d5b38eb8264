"""A scriptable vhost-user front-end in Python, for tests, benchmarks and fault reproduction.

It speaks the protocol the way QEMU 10 does (the handshake order of shared/vectors/), sends fds
with SCM_RIGHTS, and checks every reply the way QEMU's ``vhost_user_read_header`` does (flags
exactly 0x5, same request code). It is blocking on purpose: a test drives it step by step, from
trio through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import final

from vhostmem.protocol import (
    HAS_OWN_REPLY,
    HEADER_SIZE,
    REPLY_FLAGS,
    Header,
    Log,
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    Payload,
    ProtocolFeature,
    Request,
    VirtioFeature,
    VringAddress,
    VringFile,
    VringState,
    decode_header,
    decode_reply_payload,
    encode_request,
)

__all__ = ["FakeFrontend", "Reply", "make_memfd"]

#: What QEMU 10 acks when offered everything vhostmem offers (observed SET_PROTOCOL_FEATURES
#: 0x8009 = MQ | REPLY_ACK | CONFIGURE_MEM_SLOTS; RESET_DEVICE, STATUS, LOG_SHMFD and RARP too
#: when offered: hw/virtio/vhost-user.c VHOST_USER_PROTOCOL_FEATURE_MASK).
QEMU_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.STATUS
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.RARP
)


def make_memfd(size: int, *, name: str = "vhostmem-test", hugetlb: bool = False) -> int:
    """A memfd of ``size`` bytes (sparse), optionally on 2 MiB huge pages."""
    flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugetlb else 0)
    fd = os.memfd_create(name, flags)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


@final
@dataclass(frozen=True, slots=True)
class Reply:
    """A reply from the back-end."""

    header: Header
    raw: bytes

    @property
    def u64(self) -> int:
        value = decode_reply_payload(Request.GET_FEATURES, self.raw)  # u64 replies decode alike
        assert isinstance(value, int)
        return value


class ProtocolViolation(AssertionError):
    """The back-end's reply breaks what QEMU checks."""


@final
class FakeFrontend:
    """One front-end connection.

    Args:
        sock: a connected Unix stream socket (one end of a socketpair, or connected to vhostmem).
        timeout: seconds to wait for each reply.
    """

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        sock.settimeout(timeout)
        self.reply_ack = False
        self.eventfds: list[int] = []

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0) -> FakeFrontend:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock, timeout)

    def close(self) -> None:
        self.sock.close()
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds.clear()

    def __enter__(self) -> FakeFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw ----------------------------------------------------------------------------------

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes (and fds with their first byte) as they are."""
        if fds:
            sent = socket.send_fds(self.sock, [data], list(fds))
            if sent < len(data):
                self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def send(
        self,
        request: Request | int,
        payload: Payload = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool = False,
    ) -> None:
        self.send_raw(encode_request(request, payload, need_reply=need_reply), fds)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"back-end closed the connection ({len(buf)}/{n} bytes read)")
            buf += chunk
        return buf

    def recv_reply(self, request: Request | int) -> Reply:
        """Read one reply and check it as QEMU does (hw/virtio/vhost-user.c)."""
        header = decode_header(self._recv_exact(HEADER_SIZE))
        raw = self._recv_exact(header.size)
        if header.flags != REPLY_FLAGS:
            raise ProtocolViolation(f"reply flags 0x{header.flags:x} instead of 0x5")
        if header.request != request:
            raise ProtocolViolation(f"reply to {header.request!r} while waiting for {request!r}")
        return Reply(header, raw)

    def call(
        self,
        request: Request | int,
        payload: Payload = None,
        *,
        fds: Sequence[int] = (),
        need_reply: bool | None = None,
    ) -> Reply | None:
        """Send a request and read its reply when one is due.

        ``need_reply=None`` asks for an ack whenever REPLY_ACK is negotiated (as QEMU does for
        memory-table requests); requests with their own reply always get read.
        """
        if need_reply is None:
            # As QEMU: requests with a reply of their own never ask for an ack as well.
            need_reply = self.reply_ack and request not in HAS_OWN_REPLY
        self.send(request, payload, fds=fds, need_reply=need_reply)
        if request in HAS_OWN_REPLY or (need_reply and self.reply_ack):
            return self.recv_reply(request)
        return None

    def ack(self, request: Request, payload: Payload = None, *, fds: Sequence[int] = ()) -> int:
        """Send with NEED_REPLY and return the u64 ack (0 = success)."""
        reply = self.call(request, payload, fds=fds, need_reply=True)
        assert reply is not None, "REPLY_ACK is not negotiated"
        return reply.u64

    # -- QEMU-like steps -----------------------------------------------------------------------

    def handshake(
        self,
        *,
        protocol_features: int = QEMU_PROTOCOL_FEATURES,
        vrings: int = 2,
        features: int = VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES,
        owner: bool = True,
    ) -> None:
        """The handshake in QEMU 10's order (shared/vectors/), up to SET_FEATURES; without
        ``owner`` it skips SET_OWNER, as DPDK's virtio-user does when it reconnects in server
        mode (virtio_user_dev.c, virtio_user_dev_server_reconnect)."""
        offered = self.call(Request.GET_FEATURES)
        assert offered is not None
        offered_proto = self.call(Request.GET_PROTOCOL_FEATURES)
        assert offered_proto is not None
        wanted = offered_proto.u64 & protocol_features
        self.call(Request.SET_PROTOCOL_FEATURES, wanted, need_reply=False)
        self.reply_ack = bool(wanted & ProtocolFeature.REPLY_ACK)
        if wanted & ProtocolFeature.MQ:
            self.call(Request.GET_QUEUE_NUM)
        if wanted & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            self.call(Request.GET_MAX_MEM_SLOTS)
        if owner:
            self.call(Request.SET_OWNER, need_reply=False)
        self.call(Request.GET_FEATURES)
        for index in range(vrings):
            for request in (Request.SET_VRING_CALL, Request.SET_VRING_ERR):
                efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self.eventfds.append(efd)
                self.call(request, VringFile(index, False), fds=[efd], need_reply=False)
        for index in range(vrings):
            self._expect_ok(Request.SET_VRING_ENABLE, VringState(index, 0))
        self.call(Request.SET_FEATURES, offered.u64 & features, need_reply=False)

    def _expect_ok(self, request: Request, payload: Payload) -> None:
        reply = self.call(request, payload)
        if reply is not None and reply.u64 != 0:
            raise ProtocolViolation(f"{request.name} failed with ack {reply.u64}")

    def add_region(self, gpa: int, size: int, uaddr: int, mmap_offset: int, fd: int) -> int:
        """ADD_MEM_REG; returns the ack (0 = mapped)."""
        return self.ack(
            Request.ADD_MEM_REG, MemRegMsg(MemoryRegion(gpa, size, uaddr, mmap_offset)), fds=[fd]
        )

    def rem_region(self, gpa: int, size: int, uaddr: int, fds: Sequence[int] = ()) -> int:
        """REM_MEM_REG as QEMU sends it (mmap_offset 0, no fd); returns the ack."""
        return self.ack(Request.REM_MEM_REG, MemRegMsg(MemoryRegion(gpa, size, uaddr, 0)), fds=fds)

    def set_mem_table(self, regions: Sequence[tuple[int, int, int, int, int]]) -> int:
        """SET_MEM_TABLE of (gpa, size, uaddr, mmap_offset, fd) tuples; returns the ack."""
        table = MemoryTable(tuple(MemoryRegion(g, s, u, o) for g, s, u, o, _ in regions))
        return self.ack(Request.SET_MEM_TABLE, table, fds=[r[4] for r in regions])

    def set_log_base(self, size: int, offset: int, fds: Sequence[int]) -> int:
        """SET_LOG_BASE as QEMU sends it with LOG_SHMFD (no NEED_REPLY, a reply all the same:
        hw/virtio/vhost-user.c vhost_user_set_log_base); returns the reply's u64."""
        self.send(Request.SET_LOG_BASE, Log(size, offset), fds=fds)
        return self.recv_reply(Request.SET_LOG_BASE).u64

    def start_ring(self, index: int, desc: int, avail: int, used: int, num: int = 256) -> None:
        """SET_VRING_NUM/BASE/ADDR/KICK as vhost_virtqueue_start sends them."""
        self._expect_ok(Request.SET_VRING_NUM, VringState(index, num))
        self._expect_ok(Request.SET_VRING_BASE, VringState(index, 0))
        self._expect_ok(Request.SET_VRING_ADDR, VringAddress(index, 0, desc, used, avail, 0))
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.eventfds.append(efd)
        self.call(Request.SET_VRING_KICK, VringFile(index, False), fds=[efd])
