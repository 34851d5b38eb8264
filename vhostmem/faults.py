"""Fault injection: make chosen requests fail on purpose, to see how the front-end copes.

Grammar of a SPEC (``vhostmem --inject SPEC``, ``vhostmem-ctl inject SPEC``)::

    SPEC     := REQUEST (":" PART)*
    REQUEST  := a request name (ADD_MEM_REG, REM_MEM_REG, SET_MEM_TABLE, SET_VRING_KICK, ...) or "*"
    PART     := "nth=" N          fire on the N-th matching request only (1-based)
              | "every"           fire on every matching request (the default without nth)
              | "count=" K        stop after firing K times
              | "errno=" NAME     the mapping step fails as if the kernel said NAME (ENOMEM,
                                  EINVAL, EACCES, ... or a number); the whole diagnosis runs
              | "ack=" V          do not handle the request; reply failure V (default 1)
              | "delay=" TIME     hold the reply back for TIME (500ms, 2s, 0.1); the request is
                                  handled as usual
              | "disconnect"      close the connection when the request arrives, unhandled

    ADD_MEM_REG:nth=2:errno=ENOMEM      REM_MEM_REG:every:delay=500ms
    ADD_MEM_REG:nth=2:ack=1             ADD_MEM_REG:nth=3:disconnect

Counting is per rule, from when the rule was installed, across connections: a rule added at run
time with ``nth=2`` fires on the second matching request after it was added. ``errno=`` only
applies to requests that map memory (SET_MEM_TABLE, ADD_MEM_REG); on others it acts like ``ack``.
Every request a rule fired on is marked ``injected`` in the event log.

Pure: parsing and matching only; the session and the shell carry faults out.
"""

from __future__ import annotations

import errno as errno_names
from dataclasses import dataclass, field
from typing import final

__all__ = ["Fault", "FaultPlan", "FaultSpecError", "parse_fault", "request_names"]


def request_names() -> frozenset[str]:
    """Names a SPEC may use: every protocol request."""
    # Imported here: the command line checks --inject before it binds its sockets, and the
    # protocol package (construct) is most of vhostmem's start-up time.
    from vhostmem.protocol import Request

    return frozenset(r.name for r in Request)


class FaultSpecError(ValueError):
    """A SPEC that does not follow the grammar; the text says which part and why."""


@final
@dataclass(slots=True)
class Fault:
    """One injection rule and how often it fired.

    Attributes:
        spec: the text it was parsed from.
        request: request name it matches, or ``"*"``.
        nth: fire on this matching request only (1-based), or ``None`` for every one.
        count: fire at most this many times (``None``: no limit).
        errno: fail the mapping with this errno.
        ack: reply this failure value without handling the request.
        delay: seconds to hold back the reply.
        disconnect: close the connection instead of handling the request.
        seen: matching requests so far.
        fired: times it fired.
    """

    spec: str
    request: str
    nth: int | None = None
    count: int | None = None
    errno: int | None = None
    ack: int | None = None
    delay: float = 0.0
    disconnect: bool = False
    seen: int = 0
    fired: int = 0

    def as_json(self) -> dict[str, object]:
        return {"spec": self.spec, "seen": self.seen, "fired": self.fired}

    def stops(self, maps_memory: bool) -> bool:
        """Whether the request is not handled at all: a disconnect, an ``ack=``, or an
        ``errno=`` on a request that maps nothing (it acts like ``ack``; see the grammar)."""
        return (
            self.disconnect or self.ack is not None or (self.errno is not None and not maps_memory)
        )


def _parse_time(text: str) -> float:
    for suffix, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def _parse_errno(text: str) -> int:
    if text.isdigit():
        return int(text)
    value = getattr(errno_names, text.upper(), None)
    if not isinstance(value, int):
        raise FaultSpecError(f"errno={text}: not an errno name (try ENOMEM, EINVAL, EACCES)")
    return value


def parse_fault(spec: str) -> Fault:
    """Parse one SPEC.

    Args:
        spec: e.g. ``ADD_MEM_REG:nth=2:errno=ENOMEM``.

    Raises:
        FaultSpecError: naming the part that is wrong.
    """
    request, *parts = spec.strip().split(":")
    if request != "*" and request not in request_names():
        raise FaultSpecError(f"{spec}: unknown request {request!r} (e.g. ADD_MEM_REG, or *)")
    fault = Fault(spec=spec.strip(), request=request)
    every = False
    try:
        for part in parts:
            key, _, value = part.partition("=")
            if key == "nth":
                fault.nth = int(value)
                if fault.nth < 1:
                    raise FaultSpecError(f"{spec}: nth counts from 1")
            elif key == "every" and not value:
                every = True
            elif key == "count":
                fault.count = int(value)
            elif key == "errno":
                fault.errno = _parse_errno(value)
            elif key == "ack":
                fault.ack = int(value) if value else 1
                if fault.ack == 0:
                    raise FaultSpecError(f"{spec}: ack=0 would be success; use a non-zero value")
            elif key == "delay":
                fault.delay = _parse_time(value)
            elif key == "disconnect" and not value:
                fault.disconnect = True
            else:
                raise FaultSpecError(
                    f"{spec}: unknown part {part!r} (nth=N, every, count=K, errno=NAME, ack=V, "
                    "delay=TIME, disconnect)"
                )
    except ValueError as err:
        if isinstance(err, FaultSpecError):
            raise
        raise FaultSpecError(f"{spec}: {err}") from None
    if every and fault.nth is not None:
        raise FaultSpecError(f"{spec}: nth= and every exclude each other")
    if fault.errno is None and fault.ack is None and not fault.delay and not fault.disconnect:
        raise FaultSpecError(f"{spec}: says when but not what (errno=, ack=, delay= or disconnect)")
    return fault


@final
@dataclass(slots=True)
class FaultPlan:
    """The rules in force; shared by every session of the process."""

    faults: list[Fault] = field(default_factory=list)

    def __bool__(self) -> bool:
        # An empty plan is false, so the session skips matching on every request.
        return bool(self.faults)

    def add(self, fault: Fault) -> None:
        self.faults.append(fault)

    def clear(self) -> None:
        self.faults.clear()

    def match(self, request: str) -> Fault | None:
        """Count the request against every rule; return the first rule that fires on it."""
        chosen: Fault | None = None
        for fault in self.faults:
            if fault.request not in ("*", request):
                continue
            if fault.count is not None and fault.fired >= fault.count:
                continue
            fault.seen += 1
            fires = fault.nth is None or fault.seen == fault.nth
            if fires and chosen is None:
                fault.fired += 1
                chosen = fault
        return chosen
