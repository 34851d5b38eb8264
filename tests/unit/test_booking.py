"""Booking order against vhostmem.booking alone: no sockets, no server, handled requests in.

The socket-level tests (test_server.py) show the same rules through a running back-end; these
pin them on the object that keeps them.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import pytest

from vhostmem import journal
from vhostmem.booking import BOOK_EVERY, Booking, Ledger
from vhostmem.events import Handled, TableChange
from vhostmem.protocol import Header, MemoryRegion, MemRegMsg, Request
from vhostmem.regions import Region

MiB = 1 << 20


class Books:
    """A Booking over ledgers the test opens, with the counters the server would pass."""

    def __init__(self) -> None:
        self.ledgers: list[Ledger] = []
        self.counters = {"requests": 0, "errors": 0}
        self.booking = Booking(lambda: self.ledgers, self.counters)

    def open(self, socket: str) -> Ledger:
        ledger = self.booking.open(socket, len(self.ledgers) + 1, logging.getLogger("test"))
        self.ledgers.append(ledger)
        return ledger

    def lines(self) -> list[tuple[str, str, Any]]:
        """(socket, event, the region's gpa or the request name) of every line kept."""
        return [
            (e["socket"], e["event"], e["region"]["gpa"] if "region" in e else e.get("name"))
            for e in self.booking.events
            if "socket" in e
        ]


def add(gpa: int, *, ok: bool = True) -> Handled:
    """An ADD_MEM_REG of 4 MiB at ``gpa``, handled: mapped when ``ok``, refused otherwise."""
    request = Request.ADD_MEM_REG
    wire = MemoryRegion(gpa, 4 * MiB, 0x10000000 + gpa, 0)
    region = Region(gpa, 4 * MiB, 0x10000000 + gpa, 0, handle=None)
    return Handled(
        request,
        Header(request, 1, 32),
        MemRegMsg(wire),
        b"",
        ok,
        error=None if ok else f"gpa 0x{gpa:x} overlaps a region",
        error_kind=None if ok else "overlap-gpa",
        change=TableChange((), (region,) if ok else (), ()),
    )


def get_features(*, notes: tuple[str, ...] = ()) -> Handled:
    request = Request.GET_FEATURES
    return Handled(request, Header(request, 1, 0), None, b"", True, notes=notes)


def test_a_quiet_success_waits_on_its_ledger_until_booked() -> None:
    books = Books()
    a = books.open("a")
    books.booking.book(add(0), a, arrived=1.0, replied=1.1)
    assert books.lines() == []
    assert [h.name for h, _, _ in a.pending] == ["ADD_MEM_REG"]
    books.booking.book_pending(a)
    assert books.lines() == [("a", "memory-table", 0)]
    assert a.pending == []
    assert books.counters == {"requests": 1, "errors": 0}


def test_anything_else_is_booked_at_once_after_every_connections_pending() -> None:
    books = Books()
    a, b = books.open("a"), books.open("b")
    books.booking.book(add(0), a, arrived=1.0, replied=1.1)
    books.booking.book(add(4 * MiB), b, arrived=1.2, replied=1.3)
    books.booking.book(add(0, ok=False), b, arrived=1.4)  # refused: booked now, last
    assert books.lines() == [
        ("a", "memory-table", 0),
        ("b", "memory-table", 4 * MiB),
        ("b", "memory-table", 0),
    ]
    assert [e["result"] for e in books.booking.events] == ["ok", "ok", "error"]
    assert a.pending == [] and b.pending == []
    assert books.counters == {"requests": 3, "errors": 1}


def test_pending_requests_merge_by_reply_time_across_connections() -> None:
    books = Books()
    a, b = books.open("a"), books.open("b")
    books.booking.book(add(0), a, arrived=2.0, replied=2.1)
    books.booking.book(add(8 * MiB), a, arrived=4.0, replied=4.1)
    books.booking.book(add(4 * MiB), b, arrived=3.0, replied=3.1)  # replied between a's two
    books.booking.book_pending()
    assert books.lines() == [
        ("a", "memory-table", 0),
        ("b", "memory-table", 4 * MiB),
        ("a", "memory-table", 8 * MiB),
    ]


def test_an_event_is_booked_after_what_waits() -> None:
    books = Books()
    a = books.open("a")
    books.booking.book(add(0), a, arrived=1.0, replied=1.1)
    books.booking.book(journal.connect(socket="b", conn=2, peer=None))
    assert books.lines() == [("a", "memory-table", 0), ("b", "connect", None)]


def test_a_success_with_notes_is_booked_at_once_and_a_quiet_one_only_counted() -> None:
    books = Books()
    a = books.open("a")
    books.booking.book(get_features(), a, arrived=1.0, replied=1.1)
    books.booking.book(get_features(notes=("a note",)), a, arrived=1.2, replied=1.3)
    assert books.lines() == [("a", "request-note", "GET_FEATURES")]
    assert books.counters == {"requests": 2, "errors": 0}


def test_a_connection_that_never_pauses_is_booked_every_book_every_requests() -> None:
    books = Books()
    a = books.open("a")
    for i in range(BOOK_EVERY - 1):
        books.booking.book(add(i * 4 * MiB), a, arrived=float(i), replied=float(i))
    assert books.lines() == [] and len(a.pending) == BOOK_EVERY - 1
    books.booking.book(add(BOOK_EVERY * 4 * MiB), a, arrived=100.0, replied=100.0)
    assert len(books.lines()) == BOOK_EVERY and a.pending == []


def test_close_books_what_waits_then_the_last_line() -> None:
    books = Books()
    a = books.open("a")
    books.booking.book(add(0), a, arrived=1.0, replied=1.1)
    last = journal.disconnect(socket="a", conn=1, reason="gone", released=1, unmap_failed=[])
    books.booking.close(a, ended=0.0, last=last)
    assert books.lines() == [("a", "memory-table", 0), ("a", "disconnect", None)]
    assert a.closing


def test_an_event_log_that_cannot_be_written_is_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class FullDisk:
        fail = True
        writes = 0

        def write(self, doc: object) -> None:
            FullDisk.writes += 1
            if FullDisk.fail:
                raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    books = Books()
    books.booking.event_log = FullDisk()  # type: ignore[assignment]
    a = books.open("a")
    with caplog.at_level(logging.ERROR, logger="vhostmem.booking"):
        for gpa in (0, 4 * MiB):
            books.booking.book(add(gpa, ok=False), a, arrived=1.0)
        FullDisk.fail = False
        books.booking.book(add(8 * MiB, ok=False), a, arrived=1.0)  # written again
        FullDisk.fail = True
        books.booking.book(add(12 * MiB, ok=False), a, arrived=1.0)  # failing again: said again
    said = [r for r in caplog.records if "cannot write the event log" in r.getMessage()]
    assert len(said) == 2, [r.getMessage() for r in said]
    assert FullDisk.writes == 4
    assert len(books.lines()) == 4  # every line stays in memory
