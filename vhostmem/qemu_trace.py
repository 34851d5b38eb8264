"""QEMU's own commit boundaries, from its ``log`` trace: parse the lines, pair them with requests.

Theory of operation
-------------------
With ``-trace vhost_commit -trace vhost_user_write -trace vhost_user_read -D FILE -msg
timestamp=on`` QEMU writes one line per event, ``TID@SECONDS.MICROSECONDS:EVENT ARGS`` (the log
backend's format, ``trace/log``; without ``timestamp=on`` the ``TID@...:`` prefix is missing)::

    20057@1796218704.008438:vhost_commit Started: 1 Changed: 1
    20057@1796218704.008484:vhost_user_write req:37 flags:0x9
    20057@1796218704.009207:vhost_user_read req:37 flags:0x5

Facts this module relies on (qemu/qemu, QEMU 10):

1. ``vhost_commit`` (hw/virtio/vhost.c, the memory listener's commit) traces
   ``Started: %d Changed: %d`` *before* it sends anything; with ``Started: 1`` and a change the
   memory-table messages of that commit follow (``vhost_user_add_remove_regions`` or
   ``vhost_user_set_mem_table``, hw/virtio/vhost-user.c). A ``Started: 0`` commit sends
   nothing: the device is not running; its table goes out when ``vhost_dev_start`` starts it.
   The optional ``vhost_dev_start`` event marks such a start exactly.
2. ``vhost_user_write req:%d flags:0x%x`` is traced after every message written (newer QEMU adds
   the request's name: ``req:37 (ADD_MEM_REG)``), ``vhost_user_read`` after every reply read.
   The write line may therefore reach the file after the back-end has the message, but always
   before QEMU reads that message's reply, so before its next message.
3. The memory listener runs under QEMU's big lock in one thread at a time: a commit's messages
   are written by the thread that traced the commit, before any other commit starts.
4. QEMU's log calls flush the file after each line (util/log.c ``qemu_log_unlock``).

Pairing rules (one :class:`Pairer` per connection, fed the lines written after it connected):

- The memory-table requests vhostmem receives (SET_MEM_TABLE 5, ADD_MEM_REG 37, REM_MEM_REG 38)
  pair, in order, with the memory-table ``vhost_user_write`` lines, in order. Other requests'
  lines are ignored.
- A request's batch key is the last ``vhost_commit`` (or ``vhost_dev_start``) line before its
  write line: a ``Started: 1`` commit makes the batch that commit; a ``Started: 0`` commit, a
  ``vhost_dev_start``, or no line at all since the connection began make it a device start.
  A write by another thread than the last ``Started: 1`` commit's, with no line between, is
  outside that commit (fact 3): a new batch. No timing enters the batch.
- Pairing is proven, never assumed. Any of these ends it for the connection (a *fallback*, in
  words, naming the request and the line), after which every request is batched by the gap rule:
  the write line's request code differs from the request's; QEMU wrote the line, or read the
  reply, before vhostmem replied to the message it must follow (a line of another device); two
  replies read for one write; no write line within
  ``wait`` seconds of the request's arrival (the trace stopped, or went on without it); the trace
  file did not exist when the connection began, or was replaced while it lasted.
- Wire cross-check while pairing holds: a reply QEMU read for a memory-table request vhostmem
  sent no reply to, and memory-table messages QEMU wrote that vhostmem never received
  (:meth:`Pairer.finish` at the end of the connection).

The module is pure: the shell reads the file and passes lines, wall-clock times and file events.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, final

from vhostmem.protocol import Request

__all__ = [
    "CLOCK_MARGIN",
    "DEFAULT_WAIT",
    "MEMORY_CODES",
    "MEMORY_REQUESTS",
    "Pairer",
    "Resolution",
    "TraceLine",
    "parse_line",
    "parse_lines",
]

#: Memory-table request codes (as QEMU's trace prints them) and their names.
MEMORY_REQUESTS: Final = {
    int(r): r.name for r in (Request.SET_MEM_TABLE, Request.ADD_MEM_REG, Request.REM_MEM_REG)
}
#: The same, by name.
MEMORY_CODES: Final = {name: code for code, name in MEMORY_REQUESTS.items()}

#: Seconds a request waits for its write line before the pairing gives up (``--trace-wait``).
DEFAULT_WAIT: Final = 2.0

#: Seconds of slack when a trace time is compared with a time of vhostmem's: the two are read in
#: different processes, vhostmem's from its monotonic clock converted to wall-clock time.
CLOCK_MARGIN: Final = 0.002

_LINE: Final = re.compile(
    r"^(?:(?P<tid>\d+)@(?P<sec>\d+)\.(?P<usec>\d+):)?"
    r"(?P<event>vhost_commit|vhost_user_write|vhost_user_read|vhost_dev_start)\s(?P<args>.*)$"
)
_COMMIT: Final = re.compile(r"Started:\s*(?P<started>\d+)\s+Changed:\s*(?P<changed>\d+)")
# QEMU 10: "req:37 flags:0x9"; with the request's name: "req:37 (ADD_MEM_REG) flags:0x9".
_MESSAGE: Final = re.compile(
    r"req:\s*(?P<req>\d+)(?:\s*\(\s*[\w-]*\s*\))?\s+flags:\s*0x(?P<flags>[0-9a-fA-F]+)"
)


@final
@dataclass(frozen=True, slots=True)
class TraceLine:
    """One line of QEMU's trace this module understands.

    Attributes:
        lineno: 1-based line number in the file.
        event: ``commit``, ``write``, ``read`` or ``start`` (``vhost_dev_start``).
        tid: QEMU's thread id, ``None`` without ``-msg timestamp=on``.
        ts: wall-clock seconds, ``None`` without ``-msg timestamp=on``.
        started: for ``commit``, whether the device was running.
        changed: for ``commit``, whether the memory map changed.
        request: for ``write`` / ``read``, the request code.
        flags: for ``write`` / ``read``, the header flags.
    """

    lineno: int
    event: str
    tid: int | None = None
    ts: float | None = None
    started: bool = False
    changed: bool = False
    request: int = 0
    flags: int = 0

    def where(self) -> str:
        """``trace line N`` plus the thread, for messages."""
        return f"trace line {self.lineno}" + (f" (thread {self.tid})" if self.tid else "")


def parse_line(text: str, lineno: int) -> TraceLine | None:
    """One line of QEMU's ``log`` trace, or ``None`` for lines of other events (or garbage).

    Args:
        text: the line, with or without its newline.
        lineno: its 1-based number in the file.

    Returns:
        The parsed line, or ``None``.
    """
    m = _LINE.match(text.strip())
    if m is None:
        return None
    tid = int(m["tid"]) if m["tid"] else None
    ts = int(m["sec"]) + int(m["usec"]) / 1_000_000 if m["sec"] else None
    event = m["event"]
    args = m["args"]
    if event == "vhost_commit":
        c = _COMMIT.search(args)
        if c is None:
            return None
        return TraceLine(
            lineno, "commit", tid, ts, started=c["started"] != "0", changed=c["changed"] != "0"
        )
    if event == "vhost_dev_start":
        return TraceLine(lineno, "start", tid, ts)
    msg = _MESSAGE.search(args)
    if msg is None:
        return None
    return TraceLine(
        lineno,
        "write" if event == "vhost_user_write" else "read",
        tid,
        ts,
        request=int(msg["req"]),
        flags=int(msg["flags"], 16),
    )


def parse_lines(texts: list[str], first_lineno: int = 1) -> list[TraceLine]:
    """Every understood line of ``texts`` (consecutive lines numbered from ``first_lineno``)."""
    out = []
    for i, text in enumerate(texts):
        line = parse_line(text, first_lineno + i)
        if line is not None:
            out.append(line)
    return out


@final
@dataclass(frozen=True, slots=True)
class Resolution:
    """How one memory-table request was batched.

    Attributes:
        batching: ``qemu-trace`` or ``gap``.
        commit: for ``qemu-trace``, the batch key: ``(edge, lineno)`` with edge ``commit`` (a
            ``Started: 1`` commit at that line), ``start`` (a device start after that line,
            0: since the connection began) or ``outside`` (a write at that line by another
            thread than the last commit's, with no commit line before it).
        line: the ``vhost_user_write`` line paired with the request (``qemu-trace`` only).
        fallback: set on the request where pairing ended: why, in words.
        wire: wire mismatches found while pairing this request.
    """

    batching: str
    commit: tuple[str, int] | None = None
    line: int | None = None
    fallback: str | None = None
    wire: tuple[str, ...] = ()

    @property
    def edge_text(self) -> str:
        """Words for the batch edge: ``QEMU commit at trace line 12``, ``QEMU device start``."""
        if self.commit is None:
            return ""
        edge, lineno = self.commit
        if edge == "commit":
            return f"QEMU commit at trace line {lineno}"
        if edge == "outside":
            return f"QEMU messages outside a commit (device start?) from trace line {lineno}"
        return "QEMU device start" + (f" after trace line {lineno}" if lineno else "")


_GAP: Final = Resolution("gap")


@final
@dataclass(frozen=True, slots=True)
class _Prev:
    """The last paired request: what the next one's lines are checked against."""

    label: str
    code: int
    replied: float | None  # wall-clock time of our reply; None when we sent none
    write_ts: float | None
    write_line: int


@final
class Pairer:
    """Pairs one connection's memory-table requests with QEMU's trace lines.

    Args:
        source: the trace file's name, for messages.
        present: whether the file existed when the connection began.
        wait: seconds a request waits for its write line (:data:`DEFAULT_WAIT`).
    """

    def __init__(self, source: str, *, present: bool = True, wait: float = DEFAULT_WAIT) -> None:
        self.source = source
        self.wait = wait
        self._lines: list[TraceLine] = []
        self._cursor = 0
        self._key: tuple[str, int] = ("start", 0)
        self._key_tid: int | None = None
        self._prev: _Prev | None = None
        self._last_lineno = 0
        self._broken: str | None = (
            None
            if present
            else f"the trace file {source} did not exist when the front-end connected (QEMU "
            "creates it at its start with -D FILE: is it the right file?)"
        )
        self.dead = False
        #: Why pairing ended, once it did.
        self.fallback: str | None = None
        #: How many requests were paired.
        self.paired = 0

    @property
    def held(self) -> int:
        """How many lines wait to be paired (spent and irrelevant lines are not kept)."""
        return len(self._lines) - self._cursor

    @property
    def last_lineno(self) -> int:
        """The number of the last line fed (0: none yet)."""
        return self._last_lineno

    def feed(self, lines: list[TraceLine]) -> None:
        """Hand over lines of the file, in order, as they are read."""
        if not lines:
            return
        self._last_lineno = lines[-1].lineno
        if self.dead:
            return  # nothing will be paired any more: keep nothing
        # Only commit edges and memory-table messages take part; other requests' lines of a
        # long-running QEMU would only grow the list.
        self._lines.extend(
            line
            for line in lines
            if line.event in ("commit", "start") or line.request in MEMORY_REQUESTS
        )

    def replaced(self, detail: str) -> None:
        """The file was replaced or truncated (``detail`` says how): pairing cannot go on."""
        if self._broken is None:
            self._broken = (
                f"the trace file {self.source} was replaced ({detail}) while this connection "
                "lasted: its lines are another QEMU run's"
            )

    def pair(
        self,
        request: str,
        seq: int,
        *,
        arrived: float,
        replied: float | None,
        now: float,
        final: bool = False,
    ) -> Resolution | None:
        """Pair the next memory-table request with its lines; ``None``: wait for more lines.

        A request is paired with the next memory-table ``vhost_user_write`` line and, when
        vhostmem replied, with the ``vhost_user_read`` of that reply after it. Nothing is
        consumed when the answer is ``None``, so call again with the same request once more
        lines were fed.

        Args:
            request: ``SET_MEM_TABLE``, ``ADD_MEM_REG`` or ``REM_MEM_REG``.
            seq: its number, for messages.
            arrived: wall-clock seconds when it arrived.
            replied: wall-clock seconds no later than vhostmem sent its reply (a QEMU line
                cannot read the reply, or write the next message, before it); ``None`` if
                vhostmem sent no reply.
            now: wall-clock seconds now (the wait is measured against it).
            final: the connection ended and every line QEMU wrote has been fed: what is
                missing now will not come.

        Returns:
            The request's batching, or ``None`` while its lines may still come.
        """
        if self.dead:
            return _GAP
        label = f"{request} #{seq}"
        code = MEMORY_CODES[request]
        if self._broken is not None:
            return self._fail(f"{label}: {self._broken}")
        key, key_tid = self._key, self._key_tid
        prev = self._prev
        wire: list[str] = []
        write: TraceLine | None = None
        for i in range(self._cursor, len(self._lines)):
            line = self._lines[i]
            if write is not None:
                # Looking for the reply QEMU read for this request.
                if line.event != "read" or line.request not in MEMORY_REQUESTS:
                    if line.event == "write" and line.request in MEMORY_REQUESTS:
                        break  # QEMU went on without reading a reply
                    continue
                problem = self._check_reply(line, label, code, replied)
                if problem:
                    return self._fail(problem, wire)
                return self._paired(label, code, replied, key, key_tid, write, i + 1, wire)
            if line.event == "commit":
                key = ("commit", line.lineno) if line.started else ("start", line.lineno)
                key_tid = line.tid if line.started else None
                continue
            if line.event == "start":
                key, key_tid = ("start", line.lineno), None
                continue
            if line.request not in MEMORY_REQUESTS:
                continue
            name = MEMORY_REQUESTS[line.request]
            if line.event == "read":
                if prev is None:
                    continue  # a reply of a previous connection
                if prev.replied is not None:
                    return self._fail(
                        f"{label}: QEMU read a reply to {name} at {line.where()} after the reply "
                        f"to {prev.label}, with no message of its own before it: a "
                        "vhost_user_write line is missing from the trace, or the line is another "
                        "vhost device's",
                        wire,
                    )
                wire.append(
                    f"QEMU read a reply to {prev.label} ({line.where()}) that vhostmem did not send"
                )
                continue
            # The write line this request must pair with.
            if line.request != code:
                return self._fail(
                    f"{label}: QEMU's next memory-table message is {name} ({line.where()}), "
                    f"not {request}: the trace and the messages received disagree",
                    wire,
                )
            if key[0] == "commit" and None not in (key_tid, line.tid) and line.tid != key_tid:
                # A commit's messages are written by its own thread under QEMU's big lock, so
                # another thread writes only once that commit is over: outside any commit
                # (vhost_dev_start from a vCPU thread, with no commit line of its own).
                key, key_tid = ("outside", line.lineno), None
            if (
                prev is not None
                and prev.write_ts is not None
                and (prev.write_ts > arrived + CLOCK_MARGIN)
            ):
                return self._fail(
                    f"{label} arrived ({arrived:.6f}) before QEMU traced the write it paired "
                    f"{prev.label} with (trace line {prev.write_line}, {prev.write_ts:.6f}): "
                    "that line was a later message's, a vhost_user_write line is missing",
                    wire,
                )
            if (
                prev is not None
                and prev.replied is not None
                and line.ts is not None
                and line.ts < prev.replied - CLOCK_MARGIN
            ):
                return self._fail(
                    f"{label}: QEMU wrote {name} at {line.where()} ({line.ts:.6f}) before "
                    f"vhostmem replied to {prev.label} ({prev.replied:.6f}): the line is another "
                    "vhost device's",
                    wire,
                )
            write = line
            if replied is None:
                return self._paired(label, code, replied, key, key_tid, write, i + 1, wire)
        waited = "when the connection ended" if final else f"within {self.wait:g} s of its arrival"
        if write is not None and not final and now - arrived <= self.wait:
            return None
        if write is not None:
            return self._fail(
                f"{label}: vhostmem replied ({replied:.6f}) but QEMU's trace shows no "
                f"vhost_user_read of the reply after its write (trace line {write.lineno}) "
                f"{waited}",
                wire,
            )
        if not final and now - arrived <= self.wait:
            return None
        later = any(
            line.ts is not None and line.ts > arrived + CLOCK_MARGIN
            for line in self._lines[self._cursor :]
        )
        if later:
            why = (
                f"{label}: vhostmem received it, but QEMU's trace went on past its arrival "
                f"(to trace line {self._last_lineno}) without a vhost_user_write for it"
            )
        else:
            why = (
                f"{label}: no vhost_user_write line for it {waited}; the trace "
                + (f"stopped at line {self._last_lineno}" if self._last_lineno else "is empty")
                + " (is QEMU tracing vhost_user_write into this file?)"
            )
        return self._fail(why, wire)

    def _check_reply(
        self, line: TraceLine, label: str, code: int, replied: float | None
    ) -> str | None:
        """The reply QEMU read after writing this request: same code, not before ours."""
        name = MEMORY_REQUESTS[line.request]
        if line.request != code:
            return (
                f"{label}: QEMU read a {name} reply at {line.where()} after writing {label}: "
                "the trace and the messages received disagree"
            )
        if replied is not None and line.ts is not None and line.ts < replied - CLOCK_MARGIN:
            return (
                f"{label}: QEMU read a {name} reply at {line.where()} ({line.ts:.6f}) before "
                f"vhostmem sent its reply ({replied:.6f}): the lines are another vhost device's"
            )
        return None

    def _paired(
        self,
        label: str,
        code: int,
        replied: float | None,
        key: tuple[str, int],
        key_tid: int | None,
        write: TraceLine,
        cursor: int,
        wire: list[str],
    ) -> Resolution:
        # Lines before the cursor are spent: the batch key and the last pairing hold their facts.
        del self._lines[:cursor]
        self._cursor = 0
        self._key, self._key_tid = key, key_tid
        self._prev = _Prev(label, code, replied, write.ts, write.lineno)
        self.paired += 1
        return Resolution("qemu-trace", key, write.lineno, None, tuple(wire))

    def _fail(self, why: str, wire: list[str] | None = None) -> Resolution:
        self.dead = True
        self._lines.clear()
        self.fallback = why
        return Resolution("gap", None, None, why, tuple(wire or ()))

    def finish(self, *, ended: float | None) -> list[str]:
        """The connection ended: the wire mismatches the remaining lines show.

        Args:
            ended: wall-clock seconds when it ended; lines stamped later belong to whatever
                QEMU does next and are not looked at.

        Returns:
            Mismatches in words: memory-table messages QEMU wrote that vhostmem never received,
            replies QEMU read that vhostmem did not send. Empty once pairing has ended.
        """
        if self.dead or self._broken is not None:
            return []
        wire: list[str] = []
        prev = self._prev
        for line in self._lines[self._cursor :]:
            if ended is not None and line.ts is not None and line.ts > ended + CLOCK_MARGIN:
                break
            if line.event in ("commit", "start") or line.request not in MEMORY_REQUESTS:
                continue
            name = MEMORY_REQUESTS[line.request]
            if line.event == "write":
                wire.append(f"QEMU wrote {name} ({line.where()}) that vhostmem never received")
                prev = None
            elif prev is not None:
                wire.append(
                    f"QEMU read a reply to {prev.label} ({line.where()}) that vhostmem did not send"
                )
        self._cursor = len(self._lines)
        self.dead = True
        return wire
