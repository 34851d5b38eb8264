"""The trio shell: listeners, one task per front-end connection, the control socket, signals.

Each vhost-user socket serves every front-end that connects, all at once, the way DPDK's vhost
library serves several connections per socket (DPDK ``lib/vhost/socket.c``:
``vhost_user_server_new_connection`` adds every accepted fd to the socket's ``conn_list``): a
leftover QEMU, a probe such as ``nc -U`` or a restarted QEMU never leaves the next one waiting
unanswered in the listen backlog. Each connection runs in its own task with its own
:class:`Session` and region table, and releases every mapping and fd of its own when it ends. A
connection's errors stay inside its own task (trio's ``serve_listeners`` documents that a
handler exception would crash the server). With ``--tap`` the TAP bridges the rings of one
connection, the first to start them; another's are refused, loudly (``vhostmem.datapath``).

The shell loop is the sans-IO one (h11's ``examples/trio-server.py``): read what the session
wants, ``receive_data``, drain ``next_event``, send each reply, book each request
(:mod:`vhostmem.booking`). A request that succeeded quietly waits on its connection's ledger
until the front-end has paused (``book_after``; the wait goes through trio, so nothing else
waits), so QEMU's round trip pays only for the mapping and the ack.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, final

import trio

from vhostmem import journal
from vhostmem.booking import Booking, Ledger
from vhostmem.control import serve_control
from vhostmem.datapath import NetAttachment, NetDevice
from vhostmem.errors import FramingError, VhostMemError
from vhostmem.events import NEED_DATA, Handled
from vhostmem.faults import FaultPlan, parse_fault
from vhostmem.mapping import Mapper, Mapping
from vhostmem.protocol import MemoryRegion
from vhostmem.regions import Region
from vhostmem.session import Session, SessionConfig
from vhostmem.sockets import BoundSockets, open_sockets
from vhostmem.tap import TapConfig, open_tap
from vhostmem.tracefile import POLL_INTERVAL
from vhostmem.transport import FdStream, Peer, peer_credentials

__all__ = ["Backend", "ServerConfig", "run"]

logger = logging.getLogger(__name__)

#: Messages handled back to back before the connection's task lets others run.
_YIELD_EVERY = 64
#: Seconds between attempts to connect to a front-end that does not listen yet (``--connect``).
_RECONNECT_INTERVAL = 0.1


class InjectedDisconnect(VhostMemError):
    """A fault rule asked to drop the connection."""


class StalledFrontEnd(VhostMemError):
    """The front-end stopped reading replies."""


class ClosedMidMessage(VhostMemError):
    """The front-end closed the connection with part of a message sent."""


@final
@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything the command line decides.

    Attributes:
        sockets: paths to listen on for front-ends.
        fds: inherited sockets (listening or already connected).
        connect: paths to connect to (QEMU chardev with ``server=on``).
        control: control socket path.
        event_log: JSON Lines file, appended to.
        session: what each session offers.
        socket_mode: permission bits of the sockets we create.
        max_mapped: cap on bytes mapped in total (``None``: no cap).
        inject: fault-injection SPECs in force from the start (see vhostmem.faults).
        allow_uids: peers (SO_PEERCRED uid) allowed to connect; empty allows everyone who can
            open the socket (its mode decides).
        send_timeout: seconds a reply may wait for the front-end to read before the connection
            is dropped.
        unmergeable: GPA ranges ``[start, end)`` whose edges the merged view never crosses.
        merge: ``False`` makes the merged view show every received region on its own.
        tap: bridge queue pair 0 to this TAP device (``--tap``); ``None``: no traffic.
        linger: seconds a connection's read waits in the kernel for the next request before
            handing back to trio (``--linger-ms``; see :class:`~vhostmem.transport.FdStream`).
            0 (the default): reads never block, so one quiet front-end never holds up the
            others, the control socket or the data path.
        book_after: seconds a front-end must stay silent before the requests acked since it
            last paused are booked (log, event log, history); the wait goes through trio, so
            other tasks run meanwhile. A request that arrives sooner is served first.
        qemu_trace: ``(socket, file)`` pairs (``--qemu-trace``): batches of the connections on
            ``socket`` (``""``: every socket) come from the commits in QEMU's trace ``file``.
        trace_wait: seconds a memory request's booking waits for its lines in QEMU's trace.
    """

    sockets: tuple[str, ...] = ()
    fds: tuple[int, ...] = ()
    connect: tuple[str, ...] = ()
    control: str | None = None
    event_log: str | None = None
    session: SessionConfig = field(default_factory=SessionConfig)
    socket_mode: int = 0o600
    max_mapped: int | None = None
    inject: tuple[str, ...] = ()
    allow_uids: tuple[int, ...] = ()
    send_timeout: float = 10.0
    unmergeable: tuple[tuple[int, int], ...] = ()
    merge: bool = True
    batch_gap: float = 0.020
    tap: TapConfig | None = None
    linger: float = 0.0
    book_after: float = 0.001
    qemu_trace: tuple[tuple[str, str], ...] = ()
    trace_wait: float = 2.0


@final
class ShellHost:
    """The session's window on the operating system: mapping through :class:`Mapper`."""

    def __init__(self, mapper: Mapper) -> None:
        self.mapper = mapper
        # The session asks file_id(fd) right before map_region(fd): one fstat answers both.
        self._stat: tuple[int, os.stat_result] | None = None
        #: Warnings of the mappings made for the request being handled (a huge page
        #: shortfall, a failed madvise): the server moves them into its Handled's notes.
        self.notes: list[str] = []

    def map_region(
        self, request: str, region: MemoryRegion, fd: int, fail_errno: int | None = None
    ) -> tuple[Mapping, dict[str, Any]]:
        known, self._stat = self._stat, None
        mapping = self.mapper.map(
            fd,
            gpa=region.guest_phys_addr,
            size=region.memory_size,
            mmap_offset=region.mmap_offset,
            request=request,
            fail_errno=fail_errno,
            st=known[1] if known is not None and known[0] == fd else None,
            uaddr=region.userspace_addr,
        )
        if mapping.warnings:
            self.notes.extend(mapping.warnings)
        backing = mapping.backing
        info: dict[str, Any] = {
            "backing": backing.kind,
            "page_size": backing.page_size,
            "file": backing.target,
            "fd_offset": mapping.fd_offset,
            "map_length": mapping.length,
            "address": mapping.address,
            "fds_held": mapping.fds_held,
        }
        if mapping.pool is not None:
            info["hugepages_free_at_map"] = mapping.pool["free"]
        return mapping, info

    def unmap_region(self, handle: Mapping) -> None:
        handle.close()

    def close_fd(self, fd: int) -> None:
        self._stat = None
        with contextlib.suppress(OSError):
            os.close(fd)

    def file_id(self, fd: int) -> tuple[int, int] | None:
        try:
            st = os.fstat(fd)
        except OSError:
            self._stat = None
            return None
        self._stat = (fd, st)
        return (st.st_dev, st.st_ino)


@dataclass(slots=True)
class Connection:
    """One live front-end on one socket."""

    number: int
    socket_name: str
    session: Session[Mapping]
    peer: Peer | None
    log: logging.Logger
    #: What waits to be booked for this connection (:mod:`vhostmem.booking`).
    ledger: Ledger
    datapath: NetAttachment | None = None


@final
class Backend:
    """The process's state: sockets, live connections, the mapper, the books (:attr:`booking`).

    The control socket reads it through :class:`vhostmem.control.BackendView`.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.mapper = Mapper(max_mapped=config.max_mapped)
        self.host = ShellHost(self.mapper)
        #: Live connections by socket name, then by connection number (in connect order).
        self.live: dict[str, dict[int, Connection]] = {}
        self.counters = {"connections": 0, "requests": 0, "errors": 0, "replies": 0}
        #: Requests and events booked: recent events, the event log, the atomicity history.
        self.booking = Booking(
            lambda: [conn.ledger for conn in self.connections()],
            self.counters,
            event_log=config.event_log,
            batch_gap=config.batch_gap,
            qemu_trace=config.qemu_trace,
            trace_wait=config.trace_wait,
        )
        self.started = time.time()
        self._numbers = 0
        #: Why the process is shutting down (``"SIGTERM received"``), once a signal came.
        self.stopping: str | None = None
        self.faults = FaultPlan()
        self.net: NetDevice | None = None
        for spec in config.inject:
            self.faults.add(parse_fault(spec))

    def _take_map_notes(self, handled: Handled) -> None:
        """Move the warnings of the request's mappings into its notes (log and event log).

        A failed request mapped nothing that stays (SET_MEM_TABLE unmaps what it mapped), so
        its mappings' warnings are dropped.
        """
        if handled.ok:
            handled.notes = (*handled.notes, *self.host.notes)
        self.host.notes.clear()

    # -- serving ---------------------------------------------------------------------------

    async def serve_connection(self, sock: socket.socket, socket_name: str) -> None:
        """Run one front-end connection to its end; never raises (except cancellation)."""
        self._numbers += 1
        number = self._numbers
        self.counters["connections"] += 1
        peer = peer_credentials(sock)
        log = logger.getChild(f"conn{number}")
        refusal = self.refuse_peer(peer)
        if refusal is not None:
            sock.close()
            log.warning("refused a front-end on %s: %s", socket_name, refusal)
            self.booking.book(
                journal.refused(socket=socket_name, reason=refusal, conn=number, peer=peer)
            )
            return
        try:
            stream = FdStream(sock, self.config.linger)
        except OSError as err:
            sock.close()
            log.error("cannot set up the connection on %s: %s", socket_name, err)
            return
        session = Session(self.config.session, self.host, self.faults)
        ledger = self.booking.open(
            socket_name,
            number,
            log,
            peer_pid=peer.pid if peer is not None else None,
            peer_name=_process_name(peer.pid) if peer is not None else None,
            peer=peer.as_json() if peer is not None else None,
        )
        conn = Connection(number, socket_name, session, peer, log, ledger)
        if self.net is not None:
            conn.datapath = self.net.attach(
                session,
                socket_name=socket_name,
                conn=number,
                log=log,
                peer=peer.as_json() if peer else None,
            )
        self.live.setdefault(socket_name, {})[number] = conn
        log.info(
            "front-end connected on %s (pid %s, uid %s)",
            socket_name,
            peer.pid if peer else "?",
            peer.uid if peer else "?",
        )
        self.booking.book(journal.connect(socket=socket_name, conn=number, peer=peer))
        # The reason says who ended the connection: the front-end, or vhostmem and why.
        reason = "front-end closed the connection"
        try:
            await self._loop(conn, stream)
        except ClosedMidMessage as err:
            reason = f"front-end closed the connection in the middle of a message ({err})"
            log.error("%s", reason)
        except trio.BrokenResourceError as err:
            reason = f"front-end went away: {err}"
            log.info("%s", reason)
        except FramingError as err:
            reason = f"vhostmem closed the connection (framing error): {err}"
            log.error("%s", reason)
        except InjectedDisconnect as err:
            reason = f"vhostmem closed the connection (fault injection): {err}"
            log.warning("%s", reason)
        except StalledFrontEnd as err:
            reason = f"vhostmem dropped the connection after the send timeout: {err}"
            log.error("%s", reason)
        except VhostMemError as err:
            reason = f"vhostmem closed the connection (error): {err}"
            log.error("%s", reason)
        except trio.Cancelled:
            # Cancellation ends a connection only when the whole back-end stops.
            reason = "vhostmem shutting down" + (f" ({self.stopping})" if self.stopping else "")
            raise
        except Exception as err:  # a bug of ours must not take the other sockets down
            reason = f"vhostmem closed the connection (internal error): {err!r}"
            log.exception("internal error; closing this connection only")
        finally:
            # Nothing here awaits, so cancellation cannot cut the release short. Release
            # first: booking writes files and may fail, and must not keep mappings or fds.
            if conn.datapath is not None:
                conn.datapath.close()  # rings stop before their memory is unmapped
            gone = session.close()
            stream.close()
            self.live[socket_name].pop(number, None)
            # A region whose unmap failed stays mapped until the process exits: say which.
            stuck = [region for region in gone if region.unmap_failed is not None]
            log.info("released %d region(s); %s", len(gone) - len(stuck), reason)
            for region in stuck:
                log.error(
                    "region %s stays mapped after the connection ended: %s",
                    region.describe(),
                    region.unmap_failed,
                )
            try:
                # Booking reads only the numbers of what was released.
                self.booking.close(
                    ledger,
                    ended=time.time(),
                    last=journal.disconnect(
                        socket=socket_name,
                        conn=number,
                        reason=reason,
                        released=len(gone) - len(stuck),
                        unmap_failed=[region.as_json() for region in stuck],
                    ),
                )
            except Exception:  # the connection is gone either way; the server goes on
                log.exception("could not book the end of the connection")

    async def _loop(self, conn: Connection, stream: FdStream) -> None:
        session = conn.session
        unyielded = 0  # messages handled since the task last let others run
        while True:
            got = stream.try_receive(session.bytes_wanted)
            if got is None:
                unyielded = 0  # waiting below lets the other tasks run
                if conn.ledger.pending:
                    # Book only once the front-end has paused: in a burst (QEMU plugging
                    # memslot after memslot) its next request is already on its way, and
                    # booking now would make it wait. A lingering read has paused already.
                    if not self.config.linger:
                        with trio.move_on_after(self.config.book_after):
                            await stream.wait_readable()
                            continue
                    if not self.booking.ready(conn.ledger):
                        # QEMU traces a write after the write: wait for its line, serving on.
                        with trio.move_on_after(POLL_INTERVAL / 5):
                            await stream.wait_readable()
                        continue
                    self.booking.book_pending(conn.ledger)
                await stream.wait_readable()
                continue
            data, fds = got
            if not data:
                for fd in fds:
                    os.close(fd)
                if session.buffered:
                    raise ClosedMidMessage(f"{session.buffered} bytes of it received")
                return
            arrived = time.monotonic()  # the batch gap runs from our last reply to this
            session.receive_data(data, fds)
            # We read no more than bytes_wanted, so a read completes at most one message.
            handled = session.next_event()
            if handled is NEED_DATA:
                continue
            assert isinstance(handled, Handled)
            if self.host.notes:
                self._take_map_notes(handled)
            if conn.datapath is not None:
                conn.datapath.sync(handled)  # before any await: rings follow the request
            if not handled.quiet:
                if handled.disconnect:
                    self.booking.book(handled, conn.ledger, arrived=arrived)
                    raise InjectedDisconnect(handled.error or "injected disconnect")
                if handled.delay:
                    await trio.sleep(handled.delay)
            reply = handled.reply
            if reply:
                sent = stream.send_now(reply)  # no coroutine on the path QEMU waits on
                if sent < len(reply):
                    await self._send_rest(conn, stream, handled, reply[sent:], arrived)
                self.counters["replies"] += 1
            # A quiet success waits on the ledger until the front-end pauses (above), so the
            # event log and the atomicity history never cost its round trip.
            self.booking.book(handled, conn.ledger, arrived=arrived)
            unyielded += 1
            if unyielded >= _YIELD_EVERY:
                # A front-end that never pauses must not keep the other tasks (control socket,
                # other connections, signals) or cancellation waiting.
                unyielded = 0
                await trio.lowlevel.checkpoint()

    async def _send_rest(
        self, conn: Connection, stream: FdStream, handled: Handled, rest: bytes, arrived: float
    ) -> None:
        """The front-end's socket buffer is full: wait for room, but not forever."""
        with trio.move_on_after(self.config.send_timeout) as scope:
            await stream.send_all(rest)
        if scope.cancelled_caught:
            self.booking.book(handled, conn.ledger, arrived=arrived)
            raise StalledFrontEnd(
                f"the front-end has not read its replies for "
                f"{self.config.send_timeout:g} s (socket buffer full; --send-timeout)"
            )

    async def serve_listener(self, listener: socket.socket, name: str) -> None:
        """Accept front-ends on one socket and serve each in its own task, all at once.

        Nothing waits in the backlog behind a live connection (DPDK's vhost library likewise
        serves every connection on a socket). Cancellation ends every connection of the
        socket; each releases its own mappings and fds on the way out.
        """
        self.live.setdefault(name, {})
        tsock = trio.socket.from_stdlib_socket(listener)
        async with trio.open_nursery() as nursery:
            while True:
                raw, _ = await tsock.accept()
                # No await between accept and start_soon: the fd cannot be lost in between.
                sock = socket.socket(fileno=raw.detach())
                nursery.start_soon(self.serve_connection, sock, name)

    async def serve_connected(self, sock: socket.socket, name: str) -> None:
        """Serve an already connected socket (``--fd``) once."""
        self.live.setdefault(name, {})
        await self.serve_connection(sock, name)

    async def serve_client(self, path: str) -> None:
        """Connect to a front-end that listens (QEMU ``server=on``), and again after it leaves.

        One connection per path at a time: the front-end is the listener here, and it is
        the one that decides how many back-ends it serves. The log says the first failed
        attempt and each change of its cause, then the connection with how long it took,
        never one line per retry.
        """
        self.live.setdefault(path, {})
        failed: str | None = None  # why the last attempt failed, None after a success
        attempts = 0
        since = time.monotonic()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            attempts += 1
            try:
                sock.connect(path)
            except OSError as err:
                sock.close()
                why = err.strerror or str(err)
                if why != failed:
                    logger.info(
                        "cannot connect to %s (%s); retrying every %g s until a front-end "
                        "listens there",
                        path,
                        why,
                        _RECONNECT_INTERVAL,
                    )
                    failed = why
                await trio.sleep(_RECONNECT_INTERVAL)
                continue
            if attempts > 1:
                logger.info(
                    "connected to %s after %d attempts in %.1f s",
                    path,
                    attempts,
                    time.monotonic() - since,
                )
            else:
                logger.info("connected to %s", path)
            failed = None
            await self.serve_connection(sock, path)
            logger.info("connecting to %s again", path)
            attempts, since = 0, time.monotonic()

    def refuse_peer(self, peer: Peer | None) -> str | None:
        """Why a peer may not connect (``--allow-uid``), or ``None``."""
        allowed = self.config.allow_uids
        if not allowed:
            return None
        if peer is None:
            return "its credentials (SO_PEERCRED) cannot be read and --allow-uid is set"
        if peer.uid not in allowed:
            return (
                f"uid {peer.uid} (pid {peer.pid}) is not allowed "
                f"(--allow-uid {' '.join(map(str, allowed))})"
            )
        return None

    # -- state for the control socket -------------------------------------------------------

    @property
    def sockets(self) -> dict[str, Connection | None]:
        """Each socket served and its oldest live connection (``None`` when none is live);
        :attr:`live` holds every connection."""
        return {name: next(iter(conns.values()), None) for name, conns in self.live.items()}

    def connections(self) -> list[Connection]:
        """Every live connection: socket by socket, each socket's in connect order."""
        return [c for conns in self.live.values() for c in conns.values()]

    def regions(self) -> list[tuple[Connection, Region[Mapping]]]:
        return [(c, r) for c in self.connections() for r in c.session.table.mapped]

    def cleanup(self) -> None:
        """Release everything: sessions, the data path, mappings, the event log."""
        for conn in self.connections():
            conn.session.close()
        if self.net is not None:
            self.net.close()
            self.net = None
        self.mapper.close()
        self.booking.close_files()


async def run(
    config: ServerConfig,
    *,
    bound: BoundSockets | None = None,
    task_status: trio.TaskStatus[Backend] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the back-end until SIGINT/SIGTERM or cancellation, then release everything.

    Args:
        config: what to serve.
        bound: sockets opened already (the command line binds them first, so the socket
            accepts as soon as possible); opened here from ``config`` when ``None``.
        task_status: receives the :class:`Backend` once every socket accepts.
    """
    backend = Backend(config)
    try:
        if bound is None:
            bound = open_sockets(config.sockets, config.fds, config.control, config.socket_mode)
        if config.tap is not None:
            backend.net = NetDevice(open_tap(config.tap), backend.booking.book)
        async with trio.open_nursery() as nursery:
            # Signals first: a connection may keep the loop busy from its first message on
            # (the linger), and SIGTERM must find trio's handler by then.
            await nursery.start(_watch_signals, nursery.cancel_scope, backend)
            if backend.net is not None:
                backend.net.nursery = nursery
            for follower in backend.booking.followers.values():
                nursery.start_soon(follower.run)
            if bound.control is not None:
                nursery.start_soon(serve_control, bound.control, backend)
            for sock, name in bound.listeners:
                nursery.start_soon(backend.serve_listener, sock, name)
            for sock, name in bound.connected:
                nursery.start_soon(backend.serve_connected, sock, name)
            for path in config.connect:
                nursery.start_soon(backend.serve_client, path)
            serving = [
                *(f"listening on {name}" for _, name in bound.listeners),
                *(f"serving the connected socket {name}" for _, name in bound.connected),
                *(f"connecting to {path} (client mode)" for path in config.connect),
            ]
            logger.info("%s; control socket %s", "; ".join(serving), config.control)
            task_status.started(backend)
    finally:
        if bound is not None:
            bound.close()
        backend.cleanup()


async def _watch_signals(
    scope: trio.CancelScope,
    backend: Backend,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            backend.stopping = f"{signal.Signals(signum).name} received"
            logger.info("%s: releasing everything and exiting", backend.stopping)
            scope.cancel()
            return


def _process_name(pid: int) -> str | None:
    """A process's name (``/proc/PID/comm``), ``None`` when it cannot be read."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None
