"""pytest plugin: a ``vhostmem`` back-end for your own CI tests.

Installed with vhostmem (entry point ``pytest11``), so the fixtures are there in any test::

    def test_plug_is_atomic(vhostmem_backend):
        qemu = start_my_qemu(chardev_path=vhostmem_backend.socket)   # your harness
        ...
        assert vhostmem_backend.violations() == []
        assert [r["gpa"] for r in vhostmem_backend.regions()] == [0, 0x100000000]

``vhostmem_backend`` starts ``vhostmem`` on a temporary socket with default options and waits
until it accepts; ``vhostmem_factory(args)`` starts one with your options (``--max-slots 8``,
``--no-mem-slots`` ...). Every process a fixture started is stopped at teardown, and the
fixture fails the test if vhostmem did not exit cleanly (status 0) or, when the ``jsonschema``
library is installed, if a line of its event log breaks vhostmem/schemas/event-log.schema.json.

Exact verdicts: each back-end follows a QEMU trace log at ``backend.qemu_trace`` (batches are
QEMU's own commits); start your QEMU with ``vhostmem.testing.qemu.trace_args(
backend.qemu_trace)``. Without those QEMU options every connection says it fell back to the gap
rule; ``vhostmem_factory(qemu_trace=False)`` turns the trace off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from vhostmem.testing import schema
from vhostmem.testing.backend import RunningBackend, start_backend

__all__ = ["vhostmem_backend", "vhostmem_factory"]


@pytest.fixture
def vhostmem_factory(tmp_path: Path) -> Iterator[Callable[..., RunningBackend]]:
    """A function ``(args=(), name="vu.sock", qemu_trace=True, connect=None) ->
    RunningBackend``; all are stopped at teardown. With ``connect=PATH`` vhostmem connects to
    a front-end listening on PATH (client mode) and ``name`` names its other files."""
    started: list[RunningBackend] = []

    def factory(
        args: Sequence[str] = (),
        name: str = "vu.sock",
        qemu_trace: bool = True,
        connect: str | None = None,
    ) -> RunningBackend:
        trace = str(tmp_path / f"{name}.qemu-trace.log") if qemu_trace else None
        backend = start_backend(tmp_path, args, name=name, qemu_trace=trace, connect=connect)
        started.append(backend)
        return backend

    factory.started = started  # type: ignore[attr-defined]  # read by tests/integration
    yield factory
    failures = []
    for backend in started:
        status = backend.stop()
        if status != 0:
            failures.append(
                f"vhostmem pid {backend.pid} exited {status}:\n{backend.stderr()[-2000:]}"
            )
    if schema.available():
        for backend in started:
            failures += [f"{backend.event_log} {p}" for p in backend.schema_problems()[:20]]
    if failures:
        pytest.fail("\n".join(failures))


@pytest.fixture
def vhostmem_backend(vhostmem_factory: Callable[..., RunningBackend]) -> RunningBackend:
    """A vhostmem with default options on a temporary socket."""
    return vhostmem_factory()
