"""Every event-log line and control-socket document the suite makes must match the schemas
shipped in the package (vhostmem/schemas).

Two places write event-log lines: an in-process :class:`vhostmem.server.Backend` (unit tests;
every event it keeps is also an ``events --json`` entry and, with ``event_log``, a line of the
file) and a ``vhostmem`` process started through :mod:`vhostmem.testing.backend` (unit tests
and the real-QEMU tests). Both are watched for the whole test; a line that does not match
``vhostmem/schemas/event-log.schema.json`` fails the test that made it, naming the field.
Every answer of an in-process control socket (what ``vhostmem-ctl COMMAND --json`` prints) is
held to its command's schema the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from vhostmem import control
from vhostmem.booking import Booking
from vhostmem.server import Backend
from vhostmem.testing import schema
from vhostmem.testing.backend import RunningBackend


def pytest_configure(config: pytest.Config) -> None:
    if not schema.available():
        raise pytest.UsageError(
            "the tests check vhostmem's JSON against its schemas with the jsonschema library, "
            "which is not installed: pip install jsonschema (or pip install -e '.[test]')"
        )


@pytest.fixture(autouse=True)
def event_lines_match_schema(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail the test if any event-log line or control document it made breaks its schema."""
    found: list[str] = []
    keep = Booking._keep
    stop = RunningBackend.stop

    def checked_keep(self: Booking, doc: dict[str, Any]) -> None:
        keep(self, doc)
        found.extend(
            f"{p}\n    in {json.dumps(doc, sort_keys=True, default=repr)[:600]}"
            for p in schema.problems(doc, "event-log")
        )

    def checked_stop(self: RunningBackend, timeout: float = 10.0) -> int:
        status = stop(self, timeout)
        found.extend(f"{self.event_log} {p}" for p in schema.event_log_problems(self.event_log))
        return status

    def checked_command(name: str, command: Any) -> Any:
        def run(backend: Backend, args: dict[str, Any]) -> dict[str, Any]:
            doc: dict[str, Any] = command(backend, args)
            found.extend(f"{name} --json {p}" for p in schema.problems(doc, name))
            return doc

        return run

    monkeypatch.setattr(Booking, "_keep", checked_keep)
    monkeypatch.setattr(RunningBackend, "stop", checked_stop)
    for name, command in list(control.COMMANDS.items()):
        monkeypatch.setitem(control.COMMANDS, name, checked_command(name, command))
    yield
    if found:
        unique = list(dict.fromkeys(found))
        pytest.fail(
            f"{len(unique)} problem(s) against the schemas in vhostmem/schemas:\n"
            + "\n".join(unique[:20])
        )
