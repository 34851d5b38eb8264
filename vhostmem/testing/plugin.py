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

When a test that started a back-end fails, each back-end's timeline is written beside its event
log, ``NAME.timeline.pftrace`` (open it in ui.perfetto.dev) and ``NAME.timeline.html`` (any
browser), and their paths are attached to the report: a "vhostmem timeline" section in pytest's
failure output and ``vhostmem_timeline`` properties in ``--junitxml``, so CI can keep them as
artifacts. A test that passes writes none.

Exact verdicts: each back-end follows a QEMU trace log at ``backend.qemu_trace`` (batches are
QEMU's own commits); start your QEMU with ``vhostmem.testing.qemu.trace_args(
backend.qemu_trace)``. Without those QEMU options every connection says it fell back to the gap
rule; ``vhostmem_factory(qemu_trace=False)`` turns the trace off.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path

import pytest

from vhostmem.testing import schema
from vhostmem.testing.backend import RunningBackend, start_backend

__all__ = ["pytest_runtest_makereport", "vhostmem_backend", "vhostmem_factory"]

#: The back-ends a test started (the factory's list), and whether their timelines are written.
_STARTED = pytest.StashKey[list[RunningBackend]]()
_WRITTEN = pytest.StashKey[bool]()

#: The name of the report section and of the junitxml properties.
TIMELINE = "vhostmem timeline"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On the first failed phase of a test that started back-ends, write their timelines
    and attach the paths to the report (and to the item, so later reports carry them)."""
    report = yield
    backends = item.stash.get(_STARTED, [])
    if report.failed and backends and not item.stash.get(_WRITTEN, False):
        item.stash[_WRITTEN] = True
        lines = []
        for backend in backends:
            try:
                written, missing = backend.write_timeline()
            except Exception as err:  # the test's own failure matters more
                lines.append(f"{backend.event_log}: no timeline: {err!r}")
                continue
            for path in written:
                prop = ("vhostmem_timeline", str(path))
                item.user_properties.append(prop)
                report.user_properties.append(prop)
                lines.append(str(path))
            lines += [f"{backend.event_log}: {text}" for text in missing]
        report.sections.append((TIMELINE, "\n".join(lines)))
    return report


@pytest.fixture
def vhostmem_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., RunningBackend]]:
    """A function ``(args=(), name="vu.sock", qemu_trace=True, connect=None) ->
    RunningBackend``; all are stopped at teardown. With ``connect=PATH`` vhostmem connects to
    a front-end listening on PATH (client mode) and ``name`` names its other files."""
    started: list[RunningBackend] = []
    request.node.stash[_STARTED] = started

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
