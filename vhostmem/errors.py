"""vhostmem's errors, named for what happens next.

A back-end judges only its peer, so the names say the consequence, not who erred (h11's
``LocalProtocolError``/``RemoteProtocolError`` name the side; STYLE.md section 2.4). Every error
carries the data a reply, an event-log line or a person needs, not just text::

    VhostMemError
     ├── RequestRefused        the request is answered with a failure; the connection stays
     │    │                    (carries ``kind``, ``ack`` and ``details``)
     │    ├── StateError       illegal in the session's current state (kind ``state``)
     │    ├── TableError       the region table refused a change (overlap, slot limit, ...)
     │    └── MappingError     mmap of a region failed or was refused; the text is the diagnosis
     └── FramingError          the stream cannot be trusted any more; the connection ends

The session catches :class:`RequestRefused` alone at dispatch and turns it into a failed
``Handled`` whose reply is built from ``ack`` (vhost-user.rst REPLY_ACK: "zero on success or
non-zero on failure"). Only broken framing, or a session that has ended, raises
:class:`FramingError` out of ``receive_data``/``next_event``.
"""

from __future__ import annotations

from typing import Any, final


class VhostMemError(Exception):
    """Root of every error vhostmem raises on purpose."""


class RequestRefused(VhostMemError):
    """A request that cannot be honoured: it is answered with a failure, the connection stays.

    Args:
        msg: why, in words, with the numbers.
        kind: a short class of the refusal for the event log (``protocol``, ``decode``,
            ``injected``, ...).
        ack: the non-zero value of the failure ack, when REPLY_ACK makes one due.
        details: the numbers, for JSON consumers (``{}`` when there are none).
    """

    def __init__(
        self,
        msg: str,
        *,
        kind: str = "protocol",
        ack: int = 1,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(msg)
        self.kind = kind
        self.ack = ack
        self.details: dict[str, Any] = details or {}


@final
class FramingError(VhostMemError):
    """The front-end broke framing (or the session has ended): the connection must close."""


@final
class StateError(RequestRefused):
    """A request arrived in a state that does not allow it.

    Args:
        msg: what happened, in words.
        state: the session state name at the time.
        required: what would have allowed the request.
    """

    def __init__(self, msg: str, state: str, required: str) -> None:
        super().__init__(msg, kind="state")
        self.state = state
        self.required = required

    def __str__(self) -> str:
        return f"{super().__str__()} (state {self.state}; needs {self.required})"


@final
class MappingError(RequestRefused):
    """mmap of a region failed or was refused; ``str(err)`` is the whole diagnosis.

    Args:
        msg: the diagnosis: request, region numbers, backing, the numbers that matter, the fix.
        errno: the kernel's errno when the kernel said no (or an injected one).
        kind: a short class name, e.g. ``past-eof``, ``not-mappable``, ``enomem``.
        details: the numbers, for JSON consumers.
    """

    def __init__(
        self,
        msg: str,
        *,
        errno: int | None = None,
        kind: str = "mmap",
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(msg, kind=kind, details=details)
        self.errno = errno


@final
class TableError(RequestRefused):
    """The region table refused a change.

    Args:
        msg: the reason with the regions' numbers.
        kind: ``overlap-gpa``, ``overlap-uaddr``, ``slot-limit``, ``not-found``, ``bad-region``.
        details: the numbers, for JSON consumers.
    """

    def __init__(self, msg: str, *, kind: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(msg, kind=kind, details=details)
