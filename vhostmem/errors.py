"""vhostmem's errors.

Every error carries the data a reply, an event-log line or a person needs, not just text::

    VhostMemError
     ├── LocalProtocolError    we were asked to do something the protocol does not allow here
     ├── RemoteProtocolError   the front-end broke framing: the connection must close
     ├── StateError            a request that is illegal in the session's current state
     ├── MappingError          mmap of a region failed or was refused; the text is the diagnosis
     └── TableError            the region table refused a change (overlap, slot limit,
                               unknown region)

Inside the session, ``LocalProtocolError``, ``StateError``, ``TableError`` and ``MappingError``
become a failed ``Handled`` (a failure ack, the connection stays); only broken framing or a
session that has ended raises ``RemoteProtocolError`` out of ``receive_data``/``next_event``.
"""

from __future__ import annotations

from typing import Any, final


class VhostMemError(Exception):
    """Root of every error vhostmem raises on purpose."""


@final
class LocalProtocolError(VhostMemError):
    """A request that cannot be honoured (answered with a failure; the connection stays)."""


@final
class RemoteProtocolError(VhostMemError):
    """The front-end broke framing; the connection must close."""


@final
class StateError(VhostMemError):
    """A request arrived in a state that does not allow it.

    Args:
        msg: what happened, in words.
        state: the session state name at the time.
        required: what would have allowed the request.
    """

    def __init__(self, msg: str, state: str, required: str) -> None:
        super().__init__(msg)
        self.state = state
        self.required = required


@final
class MappingError(VhostMemError):
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
        super().__init__(msg)
        self.errno = errno
        self.kind = kind
        self.details = details or {}


@final
class TableError(VhostMemError):
    """The region table refused a change.

    Args:
        msg: the reason with the regions' numbers.
        kind: ``overlap-gpa``, ``overlap-uaddr``, ``slot-limit``, ``not-found``, ``bad-region``.
        details: the numbers, for JSON consumers.
    """

    def __init__(self, msg: str, *, kind: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(msg)
        self.kind = kind
        self.details = details or {}
