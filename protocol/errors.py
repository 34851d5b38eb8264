"""Errors of the ``protocol`` package.

One root, and every error keeps what a reply or a log line needs::

    ProtocolError       root: anything protocol/ raises on purpose
     ├── DecodeError    bytes that are not a valid message; keeps ``raw`` and construct's ``path``
     └── EncodeError    a model that cannot go on the wire (value out of range, wrong payload)

A ``construct.ConstructError`` never escapes: it is re-raised as one of these ``from`` the
original, the way qemu.qmp ``message.py`` wraps JSON errors and keeps the raw bytes.
"""

from __future__ import annotations

from typing import final

__all__ = ["DecodeError", "EncodeError", "ProtocolError"]


class ProtocolError(Exception):
    """Root of the errors ``protocol`` raises."""


@final
class DecodeError(ProtocolError):
    """Bytes that do not decode as the message they claim to be.

    Attributes:
        raw: the bytes that failed (header or payload, as given to the decoder).
        path: construct's path to the failing field (``"(parsing) -> region"``) or ``None`` when
            the failure was a size or value check of our own.
    """

    def __init__(self, msg: str, *, raw: bytes, path: str | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.raw = raw
        self.path = path

    def __str__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return f"{self.msg}{where} (raw {len(self.raw)} bytes: {self.raw[:64].hex()})"


@final
class EncodeError(ProtocolError):
    """A payload that cannot be encoded.

    Attributes:
        path: construct's path to the failing field, or ``None`` for checks of our own.
    """

    def __init__(self, msg: str, *, path: str | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.path = path
