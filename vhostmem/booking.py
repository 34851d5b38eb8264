"""Booking: what the back-end keeps of each handled request and event, in order.

To book is to log a handled request (vhostmem's own log), keep its event line for ``vhostmem-ctl
events``, append that line to the event log (``--event-log``) and, for a memory-table request,
add it to the atomicity :class:`~vhostmem.atomicity.History`. The lines themselves come from the
pure builders of :mod:`vhostmem.journal`; this module is the I/O shell around them.

Two verbs: :meth:`Booking.book` books a request or an event (a request that succeeded quietly
waits on its connection's :class:`Ledger` until the front-end pauses), and
:meth:`Booking.book_pending` books what waits. The rules they keep:

- **Booking order is reply order.** A quiet success is acked at once and booked later, so the
  event log and the history never cost the front-end's round trip; everything else (a failure,
  a note, an injected fault, a protocol deviation, an event) is booked at once, after what
  every connection left pending, merged by reply time. Lines are stamped with the reply's
  time, not the booking's.
- **At most** :data:`BOOK_EVERY` **requests wait** on a connection that never pauses.
- **With QEMU's trace** (``--qemu-trace``) a memory request is booked only once its lines in the
  trace are paired (:class:`~vhostmem.qemu_trace.Pairer`); what follows it waits, in order.
- **An event log that cannot be written costs no connection**: the failure is logged once, the
  lines stay in memory, and writing resumes when it works again.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO, final, overload

import trio

from vhostmem import journal
from vhostmem.atomicity import History
from vhostmem.events import Handled
from vhostmem.protocol import Request
from vhostmem.qemu_trace import Pairer, Resolution
from vhostmem.tracefile import POLL_INTERVAL, TraceFollower

__all__ = ["BOOK_EVERY", "Booking", "EventLog", "Ledger"]

logger = logging.getLogger(__name__)

MEMORY_REQUESTS = frozenset({Request.SET_MEM_TABLE, Request.ADD_MEM_REG, Request.REM_MEM_REG})
#: Events kept in memory for ``vhostmem-ctl events``.
_EVENT_HISTORY = 10000
#: Acknowledged requests booked together at most (the front-end going quiet books them sooner).
BOOK_EVERY = 64

#: An acknowledged request waiting to be booked: (handled, arrived, replied), monotonic seconds.
Pending = tuple[Handled, float, float]


@final
class EventLog:
    """Appends one JSON object per line to a file, flushed per line so ``tail -f`` sees it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: TextIO | None = open(path, "a", encoding="utf-8", buffering=1)

    def write(self, doc: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(doc, sort_keys=True) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(slots=True)
class Ledger:
    """What booking keeps of one front-end connection: who it is and what waits to be booked."""

    socket: str
    conn: int
    log: logging.Logger
    peer_pid: int | None = None
    #: The front-end's process name (/proc/PID/comm), for explanations.
    peer_name: str | None = None
    #: Acknowledged requests not yet booked, in reply order.
    pending: list[Pending] = field(default_factory=list)
    #: Pairs memory requests with QEMU's trace (``--qemu-trace``), else ``None``.
    pairer: Pairer | None = None
    #: Resolutions of pending memory requests, by ``id(handled)``, until booked.
    paired: dict[int, Resolution] = field(default_factory=dict)
    #: Memory requests paired so far (numbers them in the pairer's messages).
    paired_count: int = 0
    #: The connection has ended: what the trace lacks now will not come.
    closing: bool = False
    #: The front-end's SO_PEERCRED (``pid``, ``uid``, ``gid``), ``None`` when unknown.
    peer: Mapping[str, int] | None = None
    #: Deviation kinds logged so far: each is logged once per connection (every one is in
    #: the event log).
    deviations_logged: set[str] = field(default_factory=set)


@final
class Booking:
    """The process's books: recent events, the event log, the atomicity history.

    Args:
        ledgers: returns every live connection's :class:`Ledger`, in the order a merge by reply
            time keeps for equal times (socket by socket, connect order).
        counters: the process's counters; booking counts ``requests`` and ``errors``.
        event_log: path of the JSON Lines event log, or ``None``.
        batch_gap: seconds of silence that end a batch without QEMU's trace.
        qemu_trace: ``(socket, file)`` pairs (``--qemu-trace``; ``""``: every socket).
        trace_wait: seconds a memory request's booking waits for its lines in QEMU's trace.
    """

    def __init__(
        self,
        ledgers: Callable[[], Iterable[Ledger]],
        counters: dict[str, int],
        *,
        event_log: str | None = None,
        batch_gap: float = 0.020,
        qemu_trace: tuple[tuple[str, str], ...] = (),
        trace_wait: float = 2.0,
    ) -> None:
        self._ledgers = ledgers
        self.counters = counters
        self.events: deque[dict[str, Any]] = deque(maxlen=_EVENT_HISTORY)
        self.event_log = EventLog(event_log) if event_log else None
        self._event_log_failing = False
        self.batch_gap = batch_gap
        self.history = History()
        self.history.trace_configured = bool(qemu_trace)
        self.trace_wait = trace_wait
        self._traces: Mapping[str, str] = dict(qemu_trace)
        self.followers = {path: TraceFollower(path, trace_wait) for _, path in qemu_trace}

    # -- the two verbs ---------------------------------------------------------------------

    @overload
    def book(self, what: dict[str, Any]) -> None: ...
    @overload
    def book(
        self, what: Handled, ledger: Ledger, *, arrived: float, replied: float | None = None
    ) -> None: ...
    def book(
        self,
        what: Handled | dict[str, Any],
        ledger: Ledger | None = None,
        *,
        arrived: float = 0.0,
        replied: float | None = None,
    ) -> None:
        """Book an event line, or a handled request of ``ledger``.

        An event (a line built by :mod:`vhostmem.journal`: connect, disconnect, a refusal, a
        ring error) is booked now, after what every connection left pending: it happened
        later, and the events stay in time order across connections. A request that succeeded
        without notes, injected faults or a protocol deviation waits on its ledger
        (``replied``: when it was acked) until :meth:`book_pending`, or until
        :data:`BOOK_EVERY` wait; any other request is booked now, in order. With QEMU's
        trace a memory request always waits for its lines.

        Args:
            what: the event line, or the handled request.
            ledger: the request's connection (requests only).
            arrived: when the request arrived (monotonic seconds).
            replied: when its reply went out (monotonic seconds); ``None``: now.
        """
        if isinstance(what, dict):
            self.book_pending()
            self._keep(what)
            return
        assert ledger is not None, "a request is booked on its connection's ledger"
        handled = what
        replied = time.monotonic() if replied is None else replied
        if handled.quiet:
            ledger.pending.append((handled, arrived, replied))
            if len(ledger.pending) >= BOOK_EVERY:
                self.book_pending(ledger)
            return
        if ledger.pairer is not None and handled.request in MEMORY_REQUESTS:
            # Its batch needs its trace lines: booked in order with the rest, when they came.
            ledger.pending.append((handled, arrived, replied))
            return
        self.book_pending()
        self._book_request(ledger, handled, arrived, replied)

    def book_pending(self, ledger: Ledger | None = None) -> None:
        """Book what waits: ``ledger``'s requests, or every connection's in reply order.

        With QEMU's trace, only the requests up to the first memory request whose lines have
        not come yet are booked; the rest waits, in order. The control socket books everything
        before it answers.
        """
        if ledger is not None:
            if ledger.pending:
                # Take first: booking may log, and nothing must be booked twice.
                for handled, arrived, replied in self._bookable(ledger):
                    self._book_request(ledger, handled, arrived, replied)
            return
        merged: list[tuple[float, Ledger, Handled, float]] = []
        for each in self._ledgers():
            pending = self._bookable(each) if each.pending else []
            merged += [(replied, each, handled, arrived) for handled, arrived, replied in pending]
        merged.sort(key=lambda entry: entry[0])  # stable: one connection's stay in their order
        for replied, each, handled, arrived in merged:
            self._book_request(each, handled, arrived, replied)

    # -- a connection's ledger -------------------------------------------------------------

    def open(
        self,
        socket: str,
        conn: int,
        log: logging.Logger,
        *,
        peer_pid: int | None = None,
        peer_name: str | None = None,
        peer: Mapping[str, int] | None = None,
    ) -> Ledger:
        """A new connection's ledger, paired with QEMU's trace of its socket if one is given."""
        ledger = Ledger(socket, conn, log, peer_pid, peer_name, peer=peer)
        follower = self._follower(socket)
        if follower is not None:
            ledger.pairer = follower.attach()
        return ledger

    def close(self, ledger: Ledger, *, ended: float, last: dict[str, Any]) -> None:
        """Book what the ended connection left pending, the end of its batch and ``last``
        (its disconnect line), then let go of its trace pairing, even if booking fails."""
        try:
            ledger.closing = True  # what QEMU's trace lacks now will not come
            self.book_pending(ledger)
            if ledger.pairer is not None:
                for text in ledger.pairer.finish(ended=ended):
                    self._wire_mismatch(ledger, text)
            self.history.close_batch(socket=ledger.socket, conn=ledger.conn)
            self.book(last)
        finally:
            follower = self._follower(ledger.socket)
            if follower is not None and ledger.pairer is not None:
                follower.detach(ledger.pairer)

    def ready(self, ledger: Ledger) -> bool:
        """Whether every memory request pending on ``ledger`` met its lines in QEMU's trace
        (always, without a trace); pairs what the lines read so far allow, in order."""
        pairer = ledger.pairer
        if pairer is None:
            return True
        follower = self._follower(ledger.socket)
        if follower is not None:
            try:
                follower.poll()
            except OSError as err:
                ledger.log.warning("cannot read QEMU's trace file: %s", err)
        now_mono, now_wall = time.monotonic(), time.time()
        for handled, arrived, _ in ledger.pending:
            if handled.request not in MEMORY_REQUESTS or id(handled) in ledger.paired:
                continue
            res = pairer.pair(
                handled.name,
                ledger.paired_count + 1,
                arrived=now_wall - (now_mono - arrived),
                # The reply went out after the request arrived: a time taken after sending
                # can be late (the process descheduled), so the arrival bounds it soundly.
                replied=now_wall - (now_mono - arrived) if handled.reply else None,
                now=now_wall,
                final=ledger.closing,
            )
            if res is None:
                return False
            ledger.paired[id(handled)] = res
            ledger.paired_count += 1
        return True

    async def settle_trace(self) -> None:
        """Wait, at most ``trace_wait``, until every pending memory request met its trace
        lines, so a verdict asked for now has them (the control socket calls it)."""
        if not self.followers:
            return
        with trio.move_on_after(self.trace_wait + POLL_INTERVAL):
            while True:
                # Every connection, not only until the first that waits: each pairs what it can.
                if all([self.ready(ledger) for ledger in self._ledgers()]):
                    return
                await trio.sleep(POLL_INTERVAL / 5)

    def close_files(self) -> None:
        """Stop following QEMU's traces and close the event log."""
        for follower in self.followers.values():
            follower.close()
        if self.event_log is not None:
            self.event_log.close()

    # -- inside ----------------------------------------------------------------------------

    def _keep(self, doc: dict[str, Any]) -> None:
        """Keep an event for ``vhostmem-ctl events`` and append it to the event log."""
        doc.setdefault("ts", time.time())
        self.events.append(doc)
        if self.event_log is not None:
            try:
                self.event_log.write(doc)
            except OSError as err:
                if not self._event_log_failing:
                    logger.error(
                        "cannot write the event log (%s); events stay in memory "
                        "(vhostmem-ctl events) until it can be written again",
                        err,
                    )
                self._event_log_failing = True
            else:
                self._event_log_failing = False

    def _book_request(
        self, ledger: Ledger, handled: Handled, arrived: float, replied: float
    ) -> None:
        self.counters["requests"] += 1
        if not handled.ok:
            self.counters["errors"] += 1
        log = ledger.log
        if handled.ok:
            if log.isEnabledFor(logging.DEBUG):  # its arguments cost more than the check
                log.debug(
                    "<-- %s ok%s",
                    handled.name,
                    f" ({'; '.join(handled.notes)})" if handled.notes else "",
                )
        else:
            log.warning("%s failed: %s", handled.name, handled.error)
        for note in handled.notes:
            log.warning("%s", note)
        # Booked after the reply, maybe later: the time is the reply's, not the booking's.
        ts = time.time() - (time.monotonic() - replied)
        if handled.deviation is not None:
            self._book_deviation(ledger, handled, ts)
        if (
            handled.request not in MEMORY_REQUESTS
            and handled.ok
            and not handled.notes
            and not handled.injected
            and handled.dirty_log is None
        ):
            return
        if handled.dirty_log is not None:
            doc = journal.dirty_log(
                handled, ts=ts, socket=ledger.socket, conn=ledger.conn, peer_pid=ledger.peer_pid
            )
            area = doc.get("log")
            log.info(
                "%s: dirty logging %s%s",
                handled.name,
                "on" if doc["logging"] else "off",
                f"; log of {area['size']} bytes at mmap_offset {area['mmap_offset']:#x}, "
                f"{area['marked']} page(s) marked so far"
                if area
                else "; no log mapped",
            )
        elif handled.request not in MEMORY_REQUESTS:
            doc = journal.request(
                handled, ts=ts, socket=ledger.socket, conn=ledger.conn, peer_pid=ledger.peer_pid
            )
        else:
            change = handled.change
            requested = handled.requested
            trace = self._resolution(ledger, handled, arrived, replied)
            record = self.history.record(
                socket=ledger.socket,
                conn=ledger.conn,
                request=handled.name,
                ok=handled.ok,
                removed=change.removed if change else (),
                added=change.added if change else (),
                kept=change.kept if change else (),
                requested=requested,
                arrived=arrived,
                replied=replied,
                batch_gap=self.batch_gap,
                batching=trace.batching,
                commit=trace.commit,
                commit_text=trace.edge_text,
                fallback=trace.fallback,
                peer=ledger.peer_name,
                peer_pid=ledger.peer_pid,
            )
            if trace.fallback:
                log.warning("QEMU TRACE PAIRING ENDS, gap rule from here: %s", trace.fallback)
            for text in trace.wire:
                self._wire_mismatch(ledger, text)
            for violation in record.violations:
                log.warning("NON-ATOMIC UPDATE (%s): %s", violation.kind, violation.why)
            doc = journal.memory_table(
                handled,
                record,
                ts=ts,
                socket=ledger.socket,
                conn=ledger.conn,
                peer_pid=ledger.peer_pid,
                requested=requested,
                fallback=trace.fallback,
            )
        self._keep(doc)

    def _book_deviation(self, ledger: Ledger, handled: Handled, ts: float) -> None:
        """The protocol-deviation line of a request served against the spec's order, and its
        log line: the first of each kind per connection at warning level, the rest at debug."""
        deviation = handled.deviation
        assert deviation is not None
        peer = ledger.peer
        who = (
            f"pid {peer['pid']}{f' ({ledger.peer_name})' if ledger.peer_name else ''} "
            f"uid {peer['uid']}"
            if peer is not None
            else "a peer whose credentials could not be read"
        )
        first = deviation.kind not in ledger.deviations_logged
        ledger.deviations_logged.add(deviation.kind)
        ledger.log.log(
            logging.WARNING if first else logging.DEBUG,
            "PROTOCOL DEVIATION (%s): %s in state %s from %s, served: %s%s",
            deviation.kind,
            handled.name,
            deviation.state,
            who,
            deviation.rule,
            "; further ones on this connection go to the event log only" if first else "",
        )
        self._keep(
            journal.protocol_deviation(
                handled, ts=ts, socket=ledger.socket, conn=ledger.conn, peer=peer
            )
        )

    def _wire_mismatch(self, ledger: Ledger, text: str) -> None:
        ledger.log.warning("WIRE MISMATCH with QEMU's trace: %s", text)
        self.history.wire_mismatch(socket=ledger.socket, conn=ledger.conn, text=text)

    def _follower(self, socket: str) -> TraceFollower | None:
        """The trace file of a socket: its own ``SOCKET=FILE``, else a ``FILE`` for all."""
        path = self._traces.get(socket) or self._traces.get("")
        return self.followers.get(path) if path else None

    def _resolution(
        self, ledger: Ledger, handled: Handled, arrived: float, replied: float
    ) -> Resolution:
        """How a memory request being booked was batched (``gap`` without a trace)."""
        if ledger.pairer is None:
            return Resolution("gap")
        res = ledger.paired.pop(id(handled), None)
        if res is None:  # booked at once (not through pending): pair it now, for good
            ledger.pending.insert(0, (handled, arrived, replied))
            closing, ledger.closing = ledger.closing, True
            try:
                self.ready(ledger)
            finally:
                ledger.closing = closing
                ledger.pending.pop(0)
            res = ledger.paired.pop(id(handled), Resolution("gap"))
        return res

    def _bookable(self, ledger: Ledger) -> list[Pending]:
        """Take from ``ledger.pending`` what can be booked now: with a trace, the requests up to
        the first one whose lines have not come yet (the rest waits, in order)."""
        pending = ledger.pending
        if ledger.pairer is not None and not self.ready(ledger):
            cut = next(
                i
                for i, (handled, _, _) in enumerate(pending)
                if handled.request in MEMORY_REQUESTS and id(handled) not in ledger.paired
            )
            ledger.pending = pending[cut:]
            return pending[:cut]
        ledger.pending = []
        return pending
