"""Reading guest memory through vhostmem's own mapping: the result types."""


from __future__ import annotations

import errno as errno_mod
from dataclasses import dataclass
from typing import Any, Final, Literal, final

#: Largest ``peek`` in bytes; the bytes are returned in memory.
PEEK_MAX: Final = 64 << 20


# --- peek ---------------------------------------------------------------------------------------


PeekState = Literal["data", "unpopulated", "fault"]


@final
@dataclass(frozen=True, slots=True)
class PeekChunk:
    """A run of pages of one state. ``offset`` is relative to the region start.

    ``source`` says how ``data`` was read: ``mapping`` (our own mapping, through
    ``/proc/self/mem``) or ``file`` (``pread`` of a hugetlb fd, for pages our mapping has not
    faulted in). ``errno``/``detail`` explain a ``fault``.
    """

    offset: int
    length: int
    state: PeekState
    data: bytes | None
    errno: int | None = None
    source: str | None = None
    detail: str = ""

    @property
    def error(self) -> str | None:
        """Why a ``fault`` chunk could not be read, in words; None for other states."""
        if self.state != "fault":
            return None
        if self.detail:
            return self.detail
        return errno_mod.errorcode.get(self.errno or 0, "fault")


@final
@dataclass(frozen=True, slots=True)
class Peek:
    """Guest memory read through vhostmem's mapping, page by page, without side effects."""

    gpa: int  #: guest physical address of the first byte
    offset: int  #: offset of the first byte in the region
    length: int
    chunks: tuple[PeekChunk, ...]

    @property
    def complete(self) -> bool:
        """True when every byte was read."""
        return all(c.state == "data" for c in self.chunks)

    def data(self, fill: int = 0) -> bytes:
        """The bytes, with ``fill`` standing in for unpopulated or faulting pages."""
        out = bytearray()
        for c in self.chunks:
            out += c.data if c.data is not None else bytes([fill]) * c.length
        return bytes(out)

    def hex(self) -> str:
        """Hex of the bytes; ``__`` marks unpopulated bytes and ``!!`` faulting ones."""
        parts = []
        for c in self.chunks:
            if c.data is not None:
                parts.append(c.data.hex())
            else:
                parts.append(("__" if c.state == "unpopulated" else "!!") * c.length)
        return "".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON (bytes as hex)."""
        return {
            "gpa": self.gpa,
            "offset": self.offset,
            "length": self.length,
            "chunks": [
                {"offset": c.offset, "length": c.length, "state": c.state,
                 "data": None if c.data is None else c.data.hex(), "errno": c.errno,
                 "source": c.source, "detail": c.detail}
                for c in self.chunks
            ],
        }


#: The name HACKING.md uses for the same thing.
PeekResult = Peek


def _append_chunk(chunks: list[PeekChunk], chunk: PeekChunk) -> None:
    """Append, merging with the previous chunk when state, source and errno agree."""
    if chunks:
        prev = chunks[-1]
        if (prev.state, prev.source, prev.errno, prev.detail) == (
            chunk.state, chunk.source, chunk.errno, chunk.detail
        ) and prev.offset + prev.length == chunk.offset:
            data = None if prev.data is None or chunk.data is None else prev.data + chunk.data
            chunks[-1] = PeekChunk(prev.offset, prev.length + chunk.length, prev.state, data,
                                   prev.errno, prev.source, prev.detail)
            return
    chunks.append(chunk)
