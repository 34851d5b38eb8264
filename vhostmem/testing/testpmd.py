"""Drive DPDK's ``dpdk-testpmd`` with its virtio-user PMD as a vhost-user front-end.

testpmd (Debian's ``dpdk-dev`` package; ``tools/setup-host`` installs it) runs here in
interactive mode: commands go to its stdin and their answers are read back from its stdout,
so counters come from ``show port stats 0`` exactly, at the moment they are asked for::

    cfg = TestpmdConfig(vdev=virtio_user_vdev("/tmp/vu.sock"), memory=Memory.MEMFD)
    with Testpmd(cfg) as pmd:
        pmd.wait_ready(30)
        pmd.start_forwarding()
        ...
        pmd.stop_forwarding()
        print(pmd.port_stats().tx_packets)

Rules the harness keeps:

- Each process has its own ``--file-prefix`` (DPDK's runtime directory
  ``/var/run/dpdk/PREFIX`` and the huge page files ``HUGE_DIR/PREFIXmap_N``), removed when
  the process has exited, whatever way it ended.
- Its lcores are pinned (``--lcores``); by default both lcores (the main one, which mostly
  waits for commands, and the forwarding one, which polls) share the last CPU, so polling
  leaves the other CPUs to the back-end under test.
- Its life is bounded: a watchdog stops it after ``lifetime`` seconds of wall time, and
  RLIMIT_CPU makes the kernel kill it should this process not be there to do so.
- It runs in a session of its own (a Ctrl-C in the caller's terminal does not reach it) and is
  signalled by its pid only, while unreaped: ``stop`` sends SIGINT, then SIGKILL after a bounded
  wait; ``kill`` sends SIGKILL (a front-end crash as the back-end sees it).
- testpmd's stdout goes through a pipe, where stdio buffers whole blocks: it runs under
  ``stdbuf -oL`` (coreutils), which execs it with line-buffered stdout, so each answer arrives
  whole and in order with the prompts (cmdline writes those unbuffered).
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Final, final

__all__ = [
    "Memory",
    "PortStats",
    "Testpmd",
    "TestpmdConfig",
    "TestpmdError",
    "TestpmdMissing",
    "find_testpmd",
    "runtime_dir",
    "virtio_user_vdev",
]

_SETUP_HINT: Final = (
    "run tools/setup-host (it installs Debian's dpdk-dev package, which has dpdk-testpmd)"
)
#: What testpmd prints when it waits for a command (app/test-pmd/cmdline.c, ``cmdline_new``).
PROMPT: Final = "testpmd> "
_counter = itertools.count()


class TestpmdError(RuntimeError):
    """testpmd failed, exited, or did not answer in time; the text carries its last output."""

    __test__ = False  # not a pytest test class, whatever its name


class TestpmdMissing(TestpmdError):
    """dpdk-testpmd (or stdbuf) is not installed; the text names tools/setup-host."""

    __test__ = False


def find_testpmd(binary: str = "dpdk-testpmd") -> str:
    """The path of ``dpdk-testpmd``.

    Raises:
        TestpmdMissing: it is not on PATH (the text says how to install it).
    """
    path = shutil.which(binary)
    if path is None:
        raise TestpmdMissing(f"{binary} is not on PATH: {_SETUP_HINT}")
    return path


def runtime_dir(prefix: str) -> Path:
    """DPDK's runtime directory for ``--file-prefix PREFIX`` (lib/eal/linux/eal.c,
    ``eal_create_runtime_dir``: /var/run for root, else $XDG_RUNTIME_DIR, else /tmp)."""
    if os.geteuid() == 0:
        base = "/var/run"
    else:
        base = os.environ.get("XDG_RUNTIME_DIR", "/tmp")
    return Path(base) / "dpdk" / prefix


def virtio_user_vdev(
    path: str | os.PathLike[str],
    *,
    queues: int = 1,
    server: bool = False,
    name: str = "net_virtio_user0",
    extra: Sequence[str] = (),
) -> str:
    """The ``--vdev`` argument of a virtio-user port on vhost-user socket ``path``.

    Args:
        path: the vhost-user socket.
        queues: queue pairs the port asks for (``queues=N``).
        server: virtio-user listens on ``path`` and the back-end connects (``server=1``;
            drivers/net/virtio/virtio_user_ethdev.c, ``virtio_user_pmd_probe``).
        name: the device name (must start with ``net_virtio_user``).
        extra: more ``key=value`` devargs.
    """
    parts = [name, f"path={path}", f"queues={queues}"]
    if server:
        parts.append("server=1")
    return ",".join([*parts, *extra])


class Memory(enum.Enum):
    """How DPDK backs its memory, hence what SET_MEM_TABLE carries."""

    #: Files in a hugetlbfs mount (``--huge-dir``), one file per memseg list
    #: (``--single-file-segments``).
    HUGETLBFS = "hugetlbfs"
    #: Anonymous huge pages through memfd (``--in-memory --single-file-segments``).
    HUGETLB_MEMFD = "hugetlb-memfd"
    #: Plain memfd, no huge pages (``--no-huge -m MB``).
    MEMFD = "memfd"


@dataclass(frozen=True)
class PortStats:
    """``show port stats N``'s counters (app/test-pmd/config.c, ``nic_stats_display``)."""

    rx_packets: int
    rx_missed: int
    rx_bytes: int
    rx_errors: int
    rx_nombuf: int
    tx_packets: int
    tx_errors: int
    tx_bytes: int
    #: Throughput since the previous ``show port stats`` of the same port.
    rx_pps: int
    tx_pps: int

    _FIELDS: ClassVar[dict[str, str]] = {
        "rx_packets": "RX-packets",
        "rx_missed": "RX-missed",
        "rx_bytes": "RX-bytes",
        "rx_errors": "RX-errors",
        "rx_nombuf": "RX-nombuf",
        "tx_packets": "TX-packets",
        "tx_errors": "TX-errors",
        "tx_bytes": "TX-bytes",
        "rx_pps": "Rx-pps",
        "tx_pps": "Tx-pps",
    }

    @classmethod
    def parse(cls, text: str) -> PortStats:
        """Counters from one ``show port stats`` block.

        Raises:
            TestpmdError: a counter is missing from ``text``.
        """
        values: dict[str, int] = {}
        for attr, label in cls._FIELDS.items():
            m = re.search(rf"{re.escape(label)}:\s*(\d+)", text)
            if m is None:
                raise TestpmdError(f"no {label} in testpmd's port statistics:\n{text}")
            values[attr] = int(m.group(1))
        return cls(**values)


@dataclass(frozen=True)
class TestpmdConfig:
    """How to start testpmd.

    Attributes:
        vdev: the ``--vdev`` argument (:func:`virtio_user_vdev`).
        memory: the memory variant.
        huge_dir: a hugetlbfs mount (``--huge-dir``; needed with ``Memory.HUGETLBFS``).
        memory_mb: ``-m``: memory preallocated at start, in MiB.
        cpus: CPUs the lcores run on, main lcore first; a single CPU carries both lcores
            (default: the last CPU of this process's affinity).
        forward_mode: ``--forward-mode`` (``txonly``, ``rxonly``, ``io``...).
        mbufs: ``--total-num-mbufs``: a small pool starts fast.
        lifetime: seconds of wall time before the watchdog stops it.
        app_args: more testpmd arguments (after ``--``).
        eal_args: more EAL arguments.
        workdir: where the output log goes (default: a temporary directory of its own,
            removed when the run ends as asked and kept after a failure).
        binary: the testpmd program.
    """

    __test__ = False

    vdev: str
    memory: Memory = Memory.MEMFD
    huge_dir: str | os.PathLike[str] | None = None
    memory_mb: int = 1024
    cpus: tuple[int, ...] = ()
    forward_mode: str = "txonly"
    mbufs: int = 8192
    lifetime: float = 60.0
    app_args: tuple[str, ...] = ()
    eal_args: tuple[str, ...] = ()
    workdir: str | os.PathLike[str] | None = None
    binary: str = "dpdk-testpmd"
    prefix: str = field(default_factory=lambda: f"vhm{os.getpid()}n{next(_counter)}")

    def lcores(self) -> str:
        """``--lcores``: lcore 0 is the main one, lcore 1 forwards."""
        cpus = self.cpus or (max(os.sched_getaffinity(0)),)
        if len(cpus) == 1:
            return f"0@{cpus[0]},1@{cpus[0]}"
        return ",".join(f"{lcore}@{cpu}" for lcore, cpu in enumerate(cpus))

    def memory_args(self) -> list[str]:
        if self.memory is Memory.MEMFD:
            return ["--no-huge", "-m", str(self.memory_mb)]
        if self.memory is Memory.HUGETLB_MEMFD:
            return ["--in-memory", "--single-file-segments", "-m", str(self.memory_mb)]
        if self.huge_dir is None:
            raise TestpmdError("Memory.HUGETLBFS needs huge_dir, a hugetlbfs mount")
        return [
            "--single-file-segments",
            "--huge-dir",
            str(self.huge_dir),
            "-m",
            str(self.memory_mb),
        ]

    def argv(self, testpmd: str) -> list[str]:
        nb_cores = max(1, len(self.cpus) - 1) if len(self.cpus) > 1 else 1
        return [
            testpmd,
            "--lcores",
            self.lcores(),
            "--no-pci",
            *self.memory_args(),
            "--file-prefix",
            self.prefix,
            "--vdev",
            self.vdev,
            *self.eal_args,
            "--",
            "-i",
            f"--forward-mode={self.forward_mode}",
            f"--nb-cores={nb_cores}",
            f"--total-num-mbufs={self.mbufs}",
            *self.app_args,
        ]


def _limit_cpu(seconds: int) -> None:
    # In the child between fork and exec: past `seconds` of CPU time the kernel sends SIGXCPU
    # (which kills testpmd), SIGKILL five seconds of CPU later.
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 5))


@final
class Testpmd:
    """One testpmd process; a context manager (stops it on exit).

    Attributes available after ``start()``: ``pid``, ``argv``, ``log_path`` (everything it
    printed).
    """

    __test__ = False

    def __init__(self, config: TestpmdConfig) -> None:
        self.config = config
        self.argv: list[str] = []
        self.pid = 0
        self.returncode: int | None = None
        self.expired = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._out = bytearray()
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._watchdog: threading.Timer | None = None
        self._signal_lock = threading.Lock()
        self._own_workdir = config.workdir is None
        self.workdir = Path(config.workdir) if config.workdir is not None else Path()
        self.log_path = Path()

    # ---- life ----------------------------------------------------------------------------

    def start(self) -> Testpmd:
        """Start testpmd (does not wait for it; see :meth:`wait_ready`).

        Raises:
            TestpmdMissing: dpdk-testpmd or stdbuf is not installed.
            TestpmdError: already started.
        """
        if self._proc is not None:
            raise TestpmdError("this Testpmd was already started")
        testpmd = find_testpmd(self.config.binary)
        stdbuf = shutil.which("stdbuf")
        if stdbuf is None:
            raise TestpmdMissing("stdbuf (coreutils) is not on PATH: apt-get install coreutils")
        if self._own_workdir:
            self.workdir = Path(tempfile.mkdtemp(prefix="vhostmem-testpmd-"))
        else:
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.config.prefix}.log"
        self.argv = self.config.argv(testpmd)
        # CPU time bounds it even if this process dies: two lcores may both use a CPU fully.
        cpu_limit = int(self.config.lifetime * 2) + 10
        self._proc = subprocess.Popen(
            [stdbuf, "-oL", "-eL", *self.argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: _limit_cpu(cpu_limit),
        )
        self.pid = self._proc.pid  # stdbuf execs testpmd: the same pid
        self._reader = threading.Thread(
            target=self._read, args=(self._proc,), name=f"testpmd-{self.pid}", daemon=True
        )
        self._reader.start()
        self._watchdog = threading.Timer(self.config.lifetime, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def __enter__(self) -> Testpmd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGINT (testpmd closes its ports and exits), SIGKILL if it has not exited within
        ``timeout``; then reap it and remove its runtime directory and huge page files.

        Returns:
            The exit status (negative: the signal), or ``None`` if it was never started.
        """
        proc = self._proc
        if proc is None:
            return None
        self._interrupt(proc, timeout)
        return self._finish(proc)

    def kill(self) -> int:
        """SIGKILL testpmd (a crash, as the back-end sees it), reap it, clean up after it.

        Returns:
            The exit status (-9, or how it ended if it had already exited).
        """
        proc = self._require()
        self._kill(proc)
        status = self._finish(proc, killed=True)
        assert status is not None
        return status

    def wait_exit(self, timeout: float) -> int:
        """Wait until testpmd exits by itself (then clean up after it).

        Raises:
            TestpmdError: it still runs after ``timeout`` seconds.
        """
        proc = self._require()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TestpmdError(
                f"testpmd pid {self.pid} still runs after {timeout:g} s\n{self._evidence()}"
            ) from None
        status = self._finish(proc)
        assert status is not None
        return status

    def _signal(self, signum: int) -> None:
        # Only while unreaped: Popen.send_signal does nothing once the pid was waited for.
        with self._signal_lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.send_signal(signum)

    def _interrupt(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """SIGINT, then SIGKILL if it has not exited within ``timeout``; returns reaped."""
        self._signal(signal.SIGINT)
        # Interactive testpmd's SIGINT handler asks its command line to quit
        # (app/test-pmd/testpmd.c, signal_handler -> prompt_exit), which happens once the
        # read it sits in returns: end of file on stdin makes it return.
        self._close_stdin(proc)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        # SIGKILL cannot be caught: the wait ends when the kernel has torn the process down,
        # so it needs no timeout, and a timeout there would skip the clean-up that follows.
        self._signal(signal.SIGKILL)
        proc.wait()

    def _expire(self) -> None:
        if self.alive():
            self.expired = True
            assert self._proc is not None
            self._interrupt(self._proc, 5.0)

    def _finish(self, proc: subprocess.Popen[bytes], *, killed: bool = False) -> int | None:
        """Reaped: stop the watchdog and the reader, clean up after DPDK. A temporary
        directory of its own goes too when the run ended as asked (exit 0, or ``kill``); after
        anything else it stays, with the output log the error messages name."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._reader is not None:
            self._reader.join(5)
        self._close_stdin(proc)
        self.returncode = proc.returncode
        self.cleanup()
        if self._own_workdir and (self.returncode == 0 or killed) and not self.expired:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.returncode

    def _close_stdin(self, proc: subprocess.Popen[bytes]) -> None:
        with self._signal_lock:  # not while a command is being written
            if proc.stdin is not None and not proc.stdin.closed:
                with contextlib.suppress(OSError):
                    proc.stdin.close()

    def cleanup(self) -> None:
        """Remove what DPDK leaves behind an exited process of this prefix: its runtime
        directory and, under ``huge_dir``, its huge page files (which hold huge pages until
        removed). Only once the process is gone."""
        if self.alive():
            raise TestpmdError(f"testpmd pid {self.pid} still runs: stop it first")
        shutil.rmtree(runtime_dir(self.config.prefix), ignore_errors=True)
        if self.config.huge_dir is not None:
            # lib/eal/linux/eal_filesystem.h, eal_get_hugefile_path: DIR/PREFIXmap_N
            for path in Path(self.config.huge_dir).glob(f"{self.config.prefix}map_*"):
                path.unlink(missing_ok=True)

    def _require(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise TestpmdError("testpmd was not started")
        return self._proc

    # ---- output --------------------------------------------------------------------------

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        with open(self.log_path, "wb") as log:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                with self._cond:
                    self._out += chunk
                    self._cond.notify_all()
        proc.stdout.close()
        with self._cond:
            self._cond.notify_all()

    def output(self, since: int = 0) -> str:
        """Everything testpmd printed (stdout and stderr) from offset ``since``."""
        with self._cond:
            return self._out[since:].decode("utf-8", "replace")

    def mark(self) -> int:
        """The current end of the output: an offset for :meth:`wait_output`."""
        with self._cond:
            return len(self._out)

    def wait_output(self, pattern: str, timeout: float, since: int = 0) -> re.Match[str]:
        """Wait until the output from ``since`` matches ``pattern`` (a regex, DOTALL).

        Raises:
            TestpmdError: testpmd exited first, or ``timeout`` seconds passed.
        """
        self._require()
        regex = re.compile(pattern, re.DOTALL)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self._out[since:].decode("utf-8", "replace")
                m = regex.search(text)
                if m is not None:
                    return m
                reader_done = self._reader is None or not self._reader.is_alive()
                left = deadline - time.monotonic()
                if reader_done or left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
        if reader_done:  # its stdout closed: it exits; reap it so the evidence says how
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._require().wait(5)
        why = "exited" if reader_done else f"did not print it within {timeout:g} s"
        raise TestpmdError(f"waiting for {pattern!r}: testpmd {why}\n{self._evidence()}")

    def _evidence(self, chars: int = 3000) -> str:
        state = "running" if self.alive() else f"exited {self._require().returncode}"
        expired = " (stopped by its watchdog)" if self.expired else ""
        return (
            f"testpmd pid {self.pid} {state}{expired}; argv: {' '.join(self.argv)}\n"
            f"--- last output ({self.log_path})\n{self.output()[-chars:]}"
        )

    # ---- commands ------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for the first prompt: EAL up, the port configured and started."""
        self.wait_output(re.escape(PROMPT), timeout)

    def command(self, line: str, timeout: float = 10.0, until: str | None = None) -> str:
        """Send one command and return what it printed up to the next prompt.

        Args:
            line: the command (``show port stats 0``).
            timeout: seconds to wait for the answer.
            until: a regex the answer must match before it counts as complete (default: the
                prompt that follows it).
        """
        proc = self._require()
        start = self.mark()
        assert proc.stdin is not None
        try:
            with self._signal_lock:
                proc.stdin.write(line.encode() + b"\n")
                proc.stdin.flush()
        except (OSError, ValueError) as err:  # ValueError: stdin closed by stop()
            raise TestpmdError(f"cannot send {line!r}: {err}\n{self._evidence()}") from err
        pattern = until if until is not None else re.escape(PROMPT)
        m = self.wait_output(pattern, timeout, since=start)
        return self.output(start)[: m.end()]

    def start_forwarding(self, timeout: float = 10.0) -> str:
        """``start``: the forwarding lcore begins its mode (``--forward-mode``)."""
        return self.command("start", timeout, until=r"forwarding.*?" + re.escape(PROMPT))

    def stop_forwarding(self, timeout: float = 10.0) -> str:
        """``stop``: forwarding ends; returns the forward statistics it printed."""
        return self.command("stop", timeout, until=r"Done\.\s*" + re.escape(PROMPT))

    def port_stats(self, port: int = 0, timeout: float = 10.0) -> PortStats:
        """``show port stats PORT``, parsed: exact counters at this moment."""
        text = self.command(
            f"show port stats {port}",
            timeout,
            until=rf"NIC statistics for port {port}.*?Tx-pps.*?#{{10,}}",
        )
        return PortStats.parse(text[text.index(f"NIC statistics for port {port}") :])
