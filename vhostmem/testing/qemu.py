"""Start and drive a real QEMU guest with virtio-mem (and optionally a vhost-user netdev).

Blocking on purpose: QMP goes through `qemu.qmp.legacy.QEMUMonitorProtocol`, which runs a
private asyncio loop per connection. Trio tests call these methods through
`trio.to_thread.run_sync`; tools/run-guest calls them directly. One lock serialises QMP use, so
successive calls may come from different worker threads (never from two at once).

The QEMU shape is the one verified in DESIGN.md §5 (q35 with a memfd boot RAM backend,
virtio-mem with dynamic memslots, TCG because this machine's /dev/kvm hangs stock guests)::

    with Guest(GuestConfig(vhost_socket="/tmp/vu.sock")) as g:
        g.wait_ready(timeout=60)
        g.plug(1 << 30)
        print(memslot_aliases(g.mtree()))

Every wait has a timeout. The object owns exactly one process, QEMU, and only ever signals
that pid (and only while it is unreaped, so a recycled pid is never hit).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from qemu.qmp import ExecuteError, QMPError

from vhostmem.qmp import BoundedQMP, MemslotAlias, memslot_aliases
from vhostmem.testing.guest import READY_MARKER, GuestImage, GuestImageError, find_image

__all__ = [
    "MIN_QEMU_VERSION",
    "Guest",
    "GuestConfig",
    "GuestTimeout",
    "MemslotAlias",
    "PrerequisiteError",
    "QemuError",
    "find_qemu",
    "memslot_aliases",
    "parse_size",
    "parse_xp",
]

#: dynamic-memslots and unmergeable memslot aliases arrived in QEMU 8.2 (533f5d6679, 177f9b1ee4).
MIN_QEMU_VERSION: Final = (8, 2)
_SETUP_HINT: Final = "run tools/setup-host"


class QemuError(RuntimeError):
    """QEMU failed, exited, or answered something unexpected. The message carries the evidence."""


class PrerequisiteError(QemuError):
    """QEMU or the guest image is missing or too old; the message names tools/setup-host."""


class GuestTimeout(QemuError):
    """A bounded wait ran out (boot marker, plug, QMP connect, shutdown)."""


def parse_size(text: str | int) -> int:
    """Parses a QEMU-style size ("512M", "4G", "2MiB", "1073741824") into bytes (powers of 1024).

    Raises:
        ValueError: not a size.
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 4G, 2MiB or a byte count)")
    shift = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]
    return int(m.group(1)) << shift


@functools.cache
def find_qemu(binary: str = "qemu-system-x86_64") -> tuple[str, tuple[int, int, int]]:
    """Finds QEMU and checks it can run the vhostmem scenarios.

    Probes the feature (virtio-mem-pci's `dynamic-memslots` property) instead of trusting the
    version alone, because distributions backport; the version check gives the clearer message.

    Returns:
        (absolute path, (major, minor, micro)).

    Raises:
        PrerequisiteError: missing, older than 8.2, or without dynamic-memslots.
    """
    path = shutil.which(binary)
    if path is None:
        raise PrerequisiteError(f"{binary} not found: {_SETUP_HINT} (installs QEMU >= 8.2)")
    out = subprocess.run(
        [path, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise PrerequisiteError(f"cannot read the version of {path}: {out.strip()!r}")
    version = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    if version[:2] < MIN_QEMU_VERSION:
        raise PrerequisiteError(
            f"{path} is QEMU {'.'.join(map(str, version))}, vhostmem needs >= 8.2 "
            f"(virtio-mem dynamic-memslots): {_SETUP_HINT} (installs it from bookworm-backports)"
        )
    props = subprocess.run(
        [path, "-device", "virtio-mem-pci,help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    if "dynamic-memslots" not in props:
        raise PrerequisiteError(
            f"{path} ({'.'.join(map(str, version))}) has no virtio-mem-pci dynamic-memslots: "
            f"{_SETUP_HINT}"
        )
    return path, version


@dataclass
class GuestConfig:
    """How to start the guest. Defaults are the DESIGN.md §5 shape on this machine."""

    #: Boot RAM (`-m` and the `mem0` backend, which must be equal). Needs free huge pages of
    #: this total when `hugetlb` is on.
    boot_ram: str = "512M"
    #: Size of virtio-mem's backend `vmem0` (reserve=off, so it costs nothing until plugged).
    #: With dynamic memslots QEMU splits it into 1 GiB memslots.
    vmem_size: str = "4G"
    #: virtio-mem `block-size` (granularity of plug/unplug). None = QEMU's default (2 MiB on
    #: x86, or the huge page size). A block size above the guest's 128 MiB memory block puts
    #: the Linux driver in Big Block Mode.
    vmem_block_size: str | None = None
    #: `-m maxmem=`; must be >= boot_ram + vmem_size + any DIMMs you hot-add.
    maxmem: str = "8G"
    #: `-m slots=`: DIMM slots for `hot_add_dimm`. QEMU refuses pc-dimm without slots; 0 omits it.
    dimm_slots: int = 4
    #: Back both memory backends with huge pages: memory-backend-memfd hugetlb=on.
    hugetlb: bool = False
    #: Huge page size for `hugetlb` (memfd's `hugetlbsize`); the pool must have pages of it.
    hugetlb_size: str = "2M"
    #: A hugetlbfs mount (or any directory/file QEMU may create files in): use
    #: memory-backend-file mem-path=THIS,share=on for both backends instead of memfd.
    hugetlb_path: str | None = None
    #: virtio-mem `dynamic-memslots=on`: one unmergeable alias (memslot-N) per GiB plugged.
    dynamic_memslots: bool = True
    #: The vhost-user socket vhostmem listens on; adds the -chardev/-netdev vhost-user/
    #: virtio-net-pci trio. None = no vhost-user device (harness self-tests).
    vhost_socket: str | None = None
    #: chardev `reconnect-ms=`: lets QEMU start before the back-end listens and reconnect
    #: after it restarts. None = connect once at start-up (QEMU exits if nobody listens).
    reconnect_ms: int | None = None
    #: `-accel`. Keep tcg here: this machine's /dev/kvm (kvm_pvm) hangs stock guests.
    accel: str = "tcg"
    #: `-cpu`; `max` works with tcg (and `host` tripped an MSR assertion under kvm_pvm).
    cpu: str = "max"
    #: vCPUs.
    smp: int = 2
    #: Appended to the kernel command line after `console=ttyS0`.
    append: str = ""
    #: `-incoming URI`: this QEMU waits for a migration (e.g. `unix:/path`) instead of booting;
    #: its guest is the one the source sends (see `Guest.migrate`). None = boot normally.
    incoming: str | None = None
    #: Extra QEMU arguments, appended last.
    extra_args: list[str] = field(default_factory=list)
    #: QEMU binary name or path.
    qemu_binary: str = "qemu-system-x86_64"
    #: Directory for sockets, console log and QEMU's stderr. None = a fresh temp dir, removed on
    #: a clean exit and kept (its path is in every error) when the `with` block raised.
    workdir: str | None = None
    #: A specific guest image; None = `find_image()` (the tools/build-guest cache).
    image: GuestImage | None = None
    #: Seconds to wait after SIGTERM before SIGKILL, and for the QMP socket to appear.
    stop_timeout: float = 10.0
    #: Seconds any single QMP command may take.
    qmp_timeout: float = 30.0
    #: QEMU's trace log for ``vhostmem --qemu-trace`` (:func:`trace_args`): True = WORKDIR/
    #: qemu-trace.log, a path = that file, False = no trace.
    qemu_trace: bool | str = True


_XP_LINE_RE: Final = re.compile(r"^([0-9a-f]+):((?:\s+0x[0-9a-f]{2})+)\s*$")


def parse_xp(text: str, gpa: int, length: int) -> bytes:
    """Parses HMP `xp /<length>xb <gpa>` output into bytes, checking the addresses line up.

    Raises:
        QemuError: QEMU printed an error or fewer bytes than asked.
    """
    out = bytearray()
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _XP_LINE_RE.match(line.strip())
        if not m or int(m.group(1), 16) != gpa + len(out):
            raise QemuError(f"unexpected xp output at {gpa + len(out):#x}: {line!r}")
        out += bytes(int(tok, 16) for tok in m.group(2).split())
    if len(out) != length:
        raise QemuError(f"xp {gpa:#x} returned {len(out)} bytes, asked {length}: {text!r}")
    return bytes(out)


if TYPE_CHECKING:  # finalize is generic only to type checkers in 3.11
    _Finalizer = weakref.finalize[[subprocess.Popen[bytes], Path | None], "Guest"]


def _abandon(proc: subprocess.Popen[bytes], workdir: Path | None) -> None:
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


#: The trace events ``vhostmem --qemu-trace`` pairs with (hw/virtio/vhost.c, vhost-user.c);
#: ``vhost_dev_start`` marks device starts exactly (without it a start right after a commit, in
#: the same thread and with no commit between, would join that commit's batch).
TRACE_EVENTS: Final = ("vhost_commit", "vhost_user_write", "vhost_user_read", "vhost_dev_start")


def trace_args(path: str | os.PathLike[str]) -> list[str]:
    """QEMU arguments that write the trace ``vhostmem --qemu-trace PATH`` follows.

    Args:
        path: the log file (QEMU creates or truncates it at start).

    Returns:
        ``-trace EVENT`` for each of :data:`TRACE_EVENTS`, ``-D PATH -msg timestamp=on``.
    """
    out: list[str] = []
    for event in TRACE_EVENTS:
        out += ["-trace", event]
    return [*out, "-D", str(path), "-msg", "timestamp=on"]


class Guest:
    """One QEMU process running the test guest; a context manager.

    Attributes available after `start()`: `pid`, `argv`, `workdir`, `qmp_path` (the harness's
    QMP socket), `qmp_user_path` (a second QMP socket left free for a person or tool, e.g.
    `vhostmem-ctl check --qmp`), `console_path` (serial console log), `stderr_path`.
    """

    def __init__(self, config: GuestConfig | None = None) -> None:
        self.config = config if config is not None else GuestConfig()
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: BoundedQMP | None = None
        self._lock = threading.RLock()
        self._fifo_fd: int | None = None
        self._own_workdir = False
        self._console_mark = 0  # console offset where the current boot's output starts
        self._dimm_files: list[Path] = []
        self._finalizer: _Finalizer | None = None
        self.argv: list[str] = []
        self.workdir = Path(self.config.workdir) if self.config.workdir else Path()
        self.pid = 0

    # ---- paths ---------------------------------------------------------------------------

    @property
    def qmp_path(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def qmp_user_path(self) -> Path:
        return self.workdir / "qmp-user.sock"

    @property
    def console_path(self) -> Path:
        return self.workdir / "console.log"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "qemu.log"

    @property
    def trace_path(self) -> Path | None:
        """QEMU's trace log (``GuestConfig.qemu_trace``), ``None`` when off."""
        trace = self.config.qemu_trace
        if trace is False:
            return None
        return self.workdir / "qemu-trace.log" if trace is True else Path(trace)

    @property
    def _console_in(self) -> Path:
        return self.workdir / "console.in"

    # ---- life cycle ------------------------------------------------------------------------

    def command_line(self, qemu: str, image: GuestImage) -> list[str]:
        """The full QEMU argv for this config (DESIGN.md §5 shape)."""
        c = self.config
        hugetlb = f",hugetlb=on,hugetlbsize={c.hugetlb_size}" if c.hugetlb else ""

        def backend(mem_id: str, size: str, reserve: bool) -> str:
            # share=on on both: vhost-user ignores private RAM (vhost_section in vhost.c).
            # reserve=off on the sparse virtio-mem backend: no swap/huge page reservation
            # for memory that is mostly never plugged.
            extra = "" if reserve else ",reserve=off"
            if c.hugetlb_path is not None:
                return (
                    f"memory-backend-file,id={mem_id},size={size},"
                    f"mem-path={c.hugetlb_path},share=on{extra}"
                )
            return f"memory-backend-memfd,id={mem_id},size={size},share=on{hugetlb}{extra}"

        mem = f"{c.boot_ram},maxmem={c.maxmem}"
        if c.dimm_slots:
            mem = f"{c.boot_ram},slots={c.dimm_slots},maxmem={c.maxmem}"
        argv = [qemu, "-accel", c.accel]
        if c.cpu:
            argv += ["-cpu", c.cpu]
        argv += [
            "-smp",
            str(c.smp),
            "-machine",
            "q35,memory-backend=mem0",
            "-m",
            mem,
            "-object",
            backend("mem0", c.boot_ram, reserve=True),
            "-object",
            backend("vmem0", c.vmem_size, reserve=False),
            "-device",
            "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0,"
            f"dynamic-memslots={'on' if c.dynamic_memslots else 'off'}"
            + (f",block-size={c.vmem_block_size}" if c.vmem_block_size else ""),
        ]
        if c.vhost_socket is not None:
            chardev = f"socket,id=c0,path={c.vhost_socket}"
            if c.reconnect_ms is not None:
                chardev += f",reconnect-ms={c.reconnect_ms}"
            argv += [
                "-chardev",
                chardev,
                "-netdev",
                "vhost-user,id=n0,chardev=c0",
                "-device",
                "virtio-net-pci,netdev=n0",
            ]
        append = "console=ttyS0" + (f" {c.append}" if c.append else "")
        argv += [
            "-kernel",
            str(image.kernel),
            "-initrd",
            str(image.initrd),
            "-append",
            append,
            "-nographic",
            "-nodefaults",
            # Console output to a file the harness can read at any time; input from a FIFO the
            # harness holds open, so it can type into the guest's shell (run_in_guest).
            "-chardev",
            f"file,id=ser0,path={self.console_path},input-path={self._console_in}",
            "-serial",
            "chardev:ser0",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp",
            f"unix:{self.qmp_user_path},server=on,wait=off",
        ]
        if self.trace_path is not None:
            argv += trace_args(self.trace_path)
        if c.incoming is not None:
            argv += ["-incoming", c.incoming]
        return argv + list(c.extra_args)

    def start(self) -> Guest:
        """Starts QEMU (does not wait for the guest; see `wait_ready`).

        Raises:
            PrerequisiteError: QEMU or the guest image is missing (names tools/setup-host).
            QemuError: already started.
        """
        with self._lock:
            if self._proc is not None:
                raise QemuError("this Guest was already started")
            qemu, _ = find_qemu(self.config.qemu_binary)
            try:
                image = self.config.image if self.config.image is not None else find_image()
            except GuestImageError as err:
                raise PrerequisiteError(str(err)) from err
            if self.config.workdir is None:
                self.workdir = Path(tempfile.mkdtemp(prefix="vhostmem-guest-"))
                self._own_workdir = True
            else:
                self.workdir.mkdir(parents=True, exist_ok=True)
            for stale in (self.qmp_path, self.qmp_user_path, self._console_in):
                stale.unlink(missing_ok=True)
            os.mkfifo(self._console_in, 0o600)
            # O_RDWR on a FIFO never blocks on Linux, and holding a writer open means QEMU's
            # O_RDONLY open of input-path does not block either and never sees EOF.
            self._fifo_fd = os.open(self._console_in, os.O_RDWR | os.O_CLOEXEC)
            self.console_path.write_bytes(b"")
            self._console_mark = 0
            self.argv = self.command_line(qemu, image)
            with open(self.stderr_path, "wb") as err_file:
                # A new session: a Ctrl-C in the caller's terminal must not kill QEMU behind
                # the caller's back; the caller shuts it down in order (QEMU before vhostmem).
                self._proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=err_file,
                    stderr=err_file,
                    start_new_session=True,
                )
            self.pid = self._proc.pid
            # Safety net for a caller that never calls close(): SIGKILL our QEMU (this pid,
            # only if unreaped) and drop our temp dir when the Guest is collected or the
            # interpreter exits. close() detaches it.
            self._finalizer = weakref.finalize(
                self, _abandon, self._proc, self.workdir if self._own_workdir else None
            )
            return self

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(keep_workdir=exc is not None)

    def alive(self) -> bool:
        """True while QEMU (our pid) has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def close(self, *, keep_workdir: bool = False) -> int | None:
        """Stops QEMU: SIGTERM to our pid, SIGKILL after `stop_timeout`; reaps it; cleans up.

        Returns:
            QEMU's exit status (negative = signal), or None if it was never started.
        """
        with self._lock:
            self._close_qmp()
            rc: int | None = None
            if self._proc is not None:
                if self._proc.poll() is None:
                    self._proc.send_signal(signal.SIGTERM)
                    try:
                        self._proc.wait(timeout=self.config.stop_timeout)
                    except subprocess.TimeoutExpired:
                        self._proc.kill()
                        self._proc.wait(timeout=self.config.stop_timeout)
                rc = self._proc.returncode
            if self._fifo_fd is not None:
                os.close(self._fifo_fd)
                self._fifo_fd = None
            for f in self._dimm_files:
                f.unlink(missing_ok=True)
            self._dimm_files.clear()
            if self._own_workdir and not keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            if self._finalizer is not None:
                self._finalizer.detach()
            return rc

    def kill_hard(self) -> int:
        """SIGKILLs QEMU (our pid only) and reaps it: a crash as the back-end sees it.

        Returns:
            The exit status (-9).
        """
        with self._lock:
            proc = self._require_proc()
            self._close_qmp()
            if proc.poll() is None:
                proc.kill()
            return proc.wait(timeout=self.config.stop_timeout)

    # ---- console -------------------------------------------------------------------------

    def console_text(self) -> str:
        """Everything the guest printed on ttyS0 so far (all boots)."""
        try:
            return self.console_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Waits until the guest's /init prints the ready marker (for the current boot).

        Returns:
            Seconds waited.

        Raises:
            GuestTimeout: no marker in time (the message has the console tail).
            QemuError: QEMU exited (the message has its stderr).
        """
        start = time.monotonic()
        deadline = start + timeout
        while True:
            text = self.console_path.read_bytes()[self._console_mark :]
            if READY_MARKER.encode() in text:
                return time.monotonic() - start
            self._check_alive("waiting for the guest to boot")
            if time.monotonic() >= deadline:
                raise GuestTimeout(
                    f"guest printed no {READY_MARKER} within {timeout:.0f} s" + self._evidence()
                )
            time.sleep(0.05)

    def console_write(self, text: str) -> None:
        """Types `text` into the guest's serial console (its shell reads ttyS0)."""
        if self._fifo_fd is None:
            raise QemuError("guest not started")
        os.write(self._fifo_fd, text.encode())

    def run_in_guest(self, command: str, timeout: float = 30.0) -> str:
        """Runs a shell command in the guest over the serial console and returns its output.

        The output is cut out between two markers the shell prints; the markers are typed with
        quotes inside so that the tty's echo of the typed line never matches them. Kernel
        messages printed meanwhile can appear in the output.

        Raises:
            GuestTimeout: the end marker did not appear in time.
        """
        token = uuid.uuid4().hex[:12]
        begin, end = f"@@B{token}@@", f"@@E{token}@@"
        start_at = len(self.console_path.read_bytes())
        self.console_write(f"echo '@@B''{token}@@'; {command}; echo '@@E''{token}@@'\n")
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_path.read_bytes()[start_at:].decode("utf-8", "replace")
            b, e = text.find(begin), text.find(end)
            if b >= 0 and e > b:
                return text[b + len(begin) : e].strip("\r\n").replace("\r\n", "\n")
            self._check_alive(f"running {command!r} in the guest")
            if time.monotonic() >= deadline:
                raise GuestTimeout(
                    f"{command!r} did not finish in the guest within "
                    f"{timeout:.0f} s" + self._evidence()
                )
            time.sleep(0.05)

    # ---- QMP / HMP -------------------------------------------------------------------------

    def qmp(self, cmd: str, **args: Any) -> Any:
        """Runs one QMP command on the harness socket and returns its `return` value (JSON).

        Argument names with dashes: pass them as `**{"command-line": ...}`.

        Raises:
            qemu.qmp.ExecuteError: QEMU answered with an error.
            QemuError / GuestTimeout: QEMU is gone, or the command took > qmp_timeout.
        """
        with self._lock:
            client = self._connect()
            try:
                return client.cmd(cmd, **args)
            except ExecuteError:
                raise  # QEMU answered; the connection is fine
            except TimeoutError as err:  # asyncio.TimeoutError is TimeoutError since 3.11
                raise GuestTimeout(
                    f"QMP {cmd} took more than {self.config.qmp_timeout} s" + self._evidence()
                ) from err
            except (QMPError, OSError, EOFError) as err:
                # Disconnected (ExecInterruptedError, StateError...): most likely QEMU died.
                # Drop the client so a later call reconnects if QEMU is in fact still there.
                self._close_qmp()
                raise QemuError(
                    f"QMP {cmd} failed ({err!r}); {self._process_state()}" + self._evidence()
                ) from err

    def hmp(self, cmdline: str) -> str:
        """Runs a human monitor command (`human-monitor-command`) and returns its text."""
        out = self.qmp("human-monitor-command", **{"command-line": cmdline})
        return str(out)

    def memory_devices(self) -> list[dict[str, Any]]:
        """QMP `query-memory-devices`: [{"type": "virtio-mem", "data": {...}}, ...]."""
        devices: list[dict[str, Any]] = self.qmp("query-memory-devices")
        return devices

    def virtio_mem(self, dev_id: str = "vm0") -> dict[str, Any]:
        """The `data` of the virtio-mem device `dev_id` (memaddr, size, requested-size, ...)."""
        for dev in self.memory_devices():
            if dev.get("type") == "virtio-mem" and dev["data"].get("id") == dev_id:
                data: dict[str, Any] = dev["data"]
                return data
        raise QemuError(f"no virtio-mem device {dev_id!r} in query-memory-devices")

    def plug(self, size_bytes: int, timeout: float = 60.0, dev_id: str = "vm0") -> float:
        """Resizes virtio-mem and waits until the guest driver has (un)plugged to that size.

        QEMU only records the request (qom-set requested-size); the guest's virtio_mem driver
        does the plugging, so this needs a booted guest (`wait_ready` first).

        Returns:
            Seconds it took.

        Raises:
            GuestTimeout: the device's `size` did not reach `size_bytes` in time.
        """
        start = time.monotonic()
        self.qmp(
            "qom-set",
            path=f"/machine/peripheral/{dev_id}",
            property="requested-size",
            value=size_bytes,
        )
        deadline = start + timeout
        while True:
            data = self.virtio_mem(dev_id)
            if data["size"] == size_bytes:
                return time.monotonic() - start
            if time.monotonic() >= deadline:
                raise GuestTimeout(
                    f"virtio-mem {dev_id} size is {data['size']:#x}, requested "
                    f"{size_bytes:#x}, after {timeout:.0f} s" + self._evidence()
                )
            time.sleep(0.05)

    def mtree(self, flat: bool = False) -> str:
        """HMP `info mtree` (or `info mtree -f`, the flat views)."""
        return self.hmp("info mtree -f" if flat else "info mtree")

    def memslots(self) -> list[MemslotAlias]:
        """The virtio-mem memslot aliases QEMU currently maps (see `memslot_aliases`)."""
        return memslot_aliases(self.mtree())

    def xp(self, gpa: int, length: int) -> bytes:
        """Reads guest physical memory as the guest sees it (HMP `xp /Nxb`), in 4 KiB chunks."""
        out = bytearray()
        while len(out) < length:
            addr = gpa + len(out)
            n = min(4096, length - len(out))
            out += parse_xp(self.hmp(f"xp /{n}xb {addr:#x}"), addr, n)
        return bytes(out)

    def migrate(self, uri: str, timeout: float = 240.0) -> dict[str, Any]:
        """Migrates this guest to ``uri`` (QMP ``migrate``: ``unix:PATH`` of a QEMU started with
        ``GuestConfig.incoming``, or ``file:PATH``) and waits until it ends.

        Returns:
            ``query-migrate``'s answer at the end; ``status`` is ``completed`` when it worked.

        Raises:
            qemu.qmp.ExecuteError: QEMU refused to start it (a migration blocker, e.g. a
                vhost-user back-end without LOG_SHMFD).
            GuestTimeout: it did not end within ``timeout`` seconds.
        """
        self.qmp("migrate", uri=uri)
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.qmp("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            if time.monotonic() > deadline:
                raise GuestTimeout(
                    f"migration to {uri} not finished after {timeout:g} s: {info}"
                    + self._evidence()
                )
            time.sleep(0.2)

    def wait_running(self, timeout: float = 60.0) -> float:
        """Waits until the VM runs (``query-status``), e.g. a destination after migration.

        Returns:
            Seconds it took.

        Raises:
            GuestTimeout: it was not running within ``timeout`` seconds.
        """
        start = time.monotonic()
        while True:
            status = self.qmp("query-status")
            if status.get("status") == "running":
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise GuestTimeout(
                    f"the VM is {status.get('status')}, not running, after {timeout:g} s"
                    + self._evidence()
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """Pauses the vCPUs (QMP `stop`); QEMU keeps running and serving QMP."""
        self.qmp("stop")

    def cont(self) -> None:
        """Resumes the vCPUs (QMP `cont`)."""
        self.qmp("cont")

    def system_reset(self) -> None:
        """Resets the machine (QMP `system_reset`). virtio-mem unplugs everything on a system
        reset; the guest boots again and `wait_ready` waits for the new boot's marker."""
        with self._lock:
            self._console_mark = len(self.console_path.read_bytes())
            self.qmp("system_reset")

    def hot_add_dimm(self, dimm_id: str, size: int, mem_path: str | None = None) -> str:
        """Hot-adds a pc-dimm backed by a shared file (object-add + device_add).

        Args:
            dimm_id: the device id; the backend gets id `mem-<dimm_id>`.
            size: bytes.
            mem_path: the backing file (or a hugetlbfs directory); default a file in /dev/shm
                that is removed on `close()`. Needs `dimm_slots` > 0 and room under maxmem.

        Returns:
            The backend's mem-path.
        """
        path = mem_path or f"/dev/shm/vhostmem-{self.pid}-{dimm_id}"
        created = mem_path is None and not os.path.exists(path)
        self.qmp(
            "object-add",
            **{
                "qom-type": "memory-backend-file",
                "id": f"mem-{dimm_id}",
                "mem-path": path,
                "size": size,
                "share": True,
            },
        )
        if created:
            self._dimm_files.append(Path(path))
        self.qmp("device_add", driver="pc-dimm", id=dimm_id, memdev=f"mem-{dimm_id}")
        return path

    # ---- internals -----------------------------------------------------------------------

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise QemuError("guest not started")
        return self._proc

    def _check_alive(self, doing: str) -> None:
        proc = self._require_proc()
        if proc.poll() is not None:
            raise QemuError(
                f"QEMU (pid {proc.pid}) exited with {proc.returncode} while {doing}"
                + self._evidence()
            )

    def _connect(self) -> BoundedQMP:
        if self._qmp is not None:
            return self._qmp
        # wait=off: QEMU creates the socket early in start-up, but not instantly.
        deadline = time.monotonic() + self.config.stop_timeout
        while not self.qmp_path.exists():
            self._check_alive("waiting for its QMP socket")
            if time.monotonic() >= deadline:
                raise GuestTimeout(f"QMP socket {self.qmp_path} did not appear" + self._evidence())
            time.sleep(0.02)
        client = BoundedQMP(str(self.qmp_path), nickname=f"qemu-{self.pid}")
        try:
            client.connect_within(self.config.qmp_timeout)
        except TimeoutError as err:
            with contextlib.suppress(Exception):
                client.close()
            raise GuestTimeout(
                f"no QMP greeting from QEMU within {self.config.qmp_timeout} s "
                "(is its main loop blocked, e.g. on the vhost-user back-end?)" + self._evidence()
            ) from err
        except (QMPError, OSError) as err:
            with contextlib.suppress(Exception):
                client.close()
            raise QemuError(
                f"cannot connect to QMP at {self.qmp_path} ({err!r}); "
                f"{self._process_state()}" + self._evidence()
            ) from err
        client.settimeout(self.config.qmp_timeout)
        self._qmp = client
        return client

    def _close_qmp(self) -> None:
        client, self._qmp = self._qmp, None
        if client is not None:
            # Closing after QEMU died raises; the connection is gone either way.
            with contextlib.suppress(Exception):
                client.close()

    def _process_state(self) -> str:
        proc = self._proc
        if proc is None:
            return "QEMU not started"
        rc = proc.poll()
        return f"QEMU pid {proc.pid} " + ("is running" if rc is None else f"exited with {rc}")

    def _evidence(self, lines: int = 25) -> str:
        """The console tail and QEMU's stderr, for error messages."""
        try:
            err = self.stderr_path.read_text(errors="replace").strip()
        except FileNotFoundError:
            err = ""
        tail = "\n".join(self.console_text().splitlines()[-lines:])
        return (
            f"\n--- workdir: {self.workdir}\n--- qemu stderr:\n{err or '(empty)'}"
            f"\n--- console tail:\n{tail or '(empty)'}"
        )
