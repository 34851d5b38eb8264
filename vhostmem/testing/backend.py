"""Start a real ``vhostmem`` process for a test and read what it saw.

Used by the pytest plugin (:mod:`vhostmem.testing.plugin`), by our integration tests and by
tools/. The process is ours: we stop it by its pid and by nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, final

from vhostmem.control import ControlClient, ControlError

__all__ = ["RunningBackend", "start_backend"]

#: Seconds a failing test's timeline waits for a running vhostmem to book what waits.
_BOOK_TIMEOUT = 2.0


@final
class RunningBackend:
    """A ``vhostmem`` process started by :func:`start_backend`.

    Attributes:
        socket: the vhost-user socket to give QEMU.
        control: its control socket.
        event_log: the JSON Lines event log.
        process: the process (stderr goes to ``stderr_path``).
    """

    def __init__(
        self,
        socket: str,
        control: str,
        event_log: str,
        stderr_path: str,
        process: subprocess.Popen[bytes],
        qemu_trace: str | None = None,
    ) -> None:
        self.socket = socket
        #: The QEMU trace log vhostmem follows (``--qemu-trace``); give it to QEMU with
        #: ``vhostmem.testing.qemu.trace_args``. ``None``: batches by the gap rule.
        self.qemu_trace = qemu_trace
        self.control = control
        self.event_log = event_log
        self.stderr_path = stderr_path
        self.process = process
        self.client = ControlClient(control)

    @property
    def pid(self) -> int:
        return self.process.pid

    def regions(self) -> list[dict[str, Any]]:
        """The live region table (``vhostmem-ctl regions --json``'s ``regions``)."""
        return list(self.client.call("regions")["regions"])

    def stats(self) -> dict[str, Any]:
        return self.client.call("stats")

    def peek(self, gpa: int, length: int) -> bytes:
        """Guest memory through vhostmem's own mapping (unpopulated pages read as zeros)."""
        return bytes.fromhex(self.client.call("peek", gpa=gpa, len=length)["hex"])

    def log_lines(self) -> list[dict[str, Any]]:
        """Every line of the event log so far."""
        try:
            text = Path(self.event_log).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def memory_events(self) -> list[dict[str, Any]]:
        """Event-log lines of memory-table requests only (``"event": "memory-table"``)."""
        return [e for e in self.log_lines() if e.get("event") == "memory-table"]

    def violations(self) -> list[dict[str, Any]]:
        """Memory-table lines whose ``violations`` array is not empty."""
        return [e for e in self.memory_events() if e["violations"]]

    def schema_problems(self) -> list[str]:
        """Event-log lines that break vhostmem/schemas/event-log.schema.json (needs the
        ``jsonschema`` library); ``[]`` when every line matches."""
        from vhostmem.testing.schema import event_log_problems

        return event_log_problems(self.event_log)

    def stderr(self) -> str:
        return Path(self.stderr_path).read_text(encoding="utf-8", errors="replace")

    def write_timeline(self) -> tuple[list[Path], list[str]]:
        """Write the run's timeline beside the event log (``vhostmem-ctl timeline``):
        ``NAME.timeline.pftrace`` (Perfetto; needs the ``perfetto`` package, the ``timeline``
        extra) and ``NAME.timeline.html``, from the event log and, when QEMU wrote it, the
        trace vhostmem follows. A vhostmem still running books what waits first (it does
        before answering any control request).

        Returns:
            The files written, and what could not be written, in words.
        """
        from vhostmem.qemu_trace import parse_lines
        from vhostmem.timeline import build_trace, parse_event_lines, render_html, replay

        if self.process.poll() is None:
            try:
                ControlClient(self.control, timeout=_BOOK_TIMEOUT).call("stats")
            except (ControlError, OSError):
                pass  # the lines in the file are what there is
        try:
            lines = Path(self.event_log).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        trace = Path(self.qemu_trace) if self.qemu_trace else None
        story = replay(
            parse_event_lines(lines),
            parse_lines(trace.read_text(errors="replace").splitlines())
            if trace is not None and trace.exists()
            else [],
        )
        base = self.event_log.removesuffix(".events.jsonl") + ".timeline"
        written: list[Path] = []
        missing: list[str] = []
        try:
            data = build_trace(story)
        except ImportError as err:
            missing.append(f"no Perfetto trace: {err} (pip install 'vhostmem[timeline]')")
        else:
            Path(base + ".pftrace").write_bytes(data)
            written.append(Path(base + ".pftrace"))
        page = Path(base + ".html")
        page.write_text(render_html(story, f"vhostmem timeline: {self.socket}"), encoding="utf-8")
        written.append(page)
        return written, missing

    def wait_for(self, predicate: Any, timeout: float, what: str) -> Any:
        """Poll ``predicate()`` until it returns something truthy, or fail naming ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vhostmem exited with {self.process.returncode} while waiting for {what}:\n"
                    + self.stderr()[-3000:]
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM our process and wait; SIGKILL it if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode


def start_backend(
    directory: str | os.PathLike[str],
    args: Sequence[str] = (),
    *,
    name: str = "vu.sock",
    timeout: float = 10.0,
    qemu_trace: str | None = None,
    connect: str | os.PathLike[str] | None = None,
) -> RunningBackend:
    """Start ``python -m vhostmem`` on ``directory/name`` and wait until it accepts.

    Args:
        directory: where the sockets, event log and stderr file go.
        args: extra command-line arguments (``--max-slots 8``, ``--no-mem-slots``, ...).
        name: file name of the vhost-user socket.
        timeout: seconds to wait for the socket to appear.
        qemu_trace: QEMU's trace log for ``--qemu-trace`` (QEMU started with
            ``vhostmem.testing.qemu.trace_args(qemu_trace)``); ``None``: no trace.
        connect: client mode: connect to the front-end listening there (``--connect``)
            instead of listening on ``directory/name``, which then names only the control
            socket, event log and stderr files; waits for the control socket only.
    """
    base = Path(directory)
    control = str(base / name) + ".ctl"
    sock = str(connect) if connect is not None else str(base / name)
    serve = ["--connect", sock] if connect is not None else ["--socket", sock]
    event_log = str(base / (name + ".events.jsonl"))
    stderr_path = str(base / (name + ".stderr"))
    with open(stderr_path, "wb") as err:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vhostmem",
                *serve,
                "--control",
                control,
                "--event-log",
                event_log,
                *(["--qemu-trace", qemu_trace] if qemu_trace else []),
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )
    backend = RunningBackend(sock, control, event_log, stderr_path, process, qemu_trace)
    try:
        if connect is not None:
            backend.wait_for(lambda: os.path.exists(control), timeout, f"{control} to accept")
        else:
            backend.wait_for(
                lambda: os.path.exists(sock) and os.path.exists(control),
                timeout,
                f"{sock} to accept",
            )
    except BaseException:
        backend.stop()
        raise
    return backend
