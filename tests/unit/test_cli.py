"""The command line as people and QEMU use it: a real ``vhostmem`` process per test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vhostmem.cli import main
from vhostmem.control import ControlClient
from vhostmem.ctl import ctl_main
from vhostmem.protocol import Request, encode_request
from vhostmem.testing.backend import start_backend
from vhostmem.testing.frontend import FakeFrontend, make_memfd

MiB = 1 << 20


def run_vhostmem(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vhostmem", *args],
        pass_fds=pass_fds,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_path(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_capabilities_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--print-capabilities"]) == 0
    assert json.loads(capsys.readouterr().out) == {"type": "net"}
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "vhostmem" in capsys.readouterr().out


def test_help_teaches() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vhostmem", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for words in [
        "--socket",
        "share=on",
        "vhost-user",
        "--max-slots",
        "509",
        "--inject",
        "vhostmem-ctl",
        "no traffic",
    ]:
        assert words in out, words


def test_usage_errors() -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["--fd", "3"])  # --fd needs --control
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["--socket", "/tmp/x.sock", "--inject", "ADD_MEM_REG:nth=0:ack=1"])
    assert exc.value.code == 2


def test_fd_and_socket_are_exclusive(tmp_path: Path) -> None:
    # vhost-user.rst, "Backend program conventions": --socket-path is incompatible with --fd.
    # A real inherited listener: the refusal must come before anything is served or bound.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "inherited.sock"))
    listener.listen()
    sock = str(tmp_path / "vu.sock")
    try:
        for where in (["--socket", sock], ["--socket-path", sock]):
            proc = run_vhostmem(
                "--fd",
                str(listener.fileno()),
                *where,
                "--control",
                str(tmp_path / "x.ctl"),
                pass_fds=(listener.fileno(),),
            )
            try:
                _, err = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                pytest.fail(f"vhostmem {' '.join(where)} --fd N was accepted and served")
            assert proc.returncode == 2, err
            text = err.decode()
            assert "--fd and --socket (--socket-path) are mutually exclusive" in text, text
            assert "back-end program conventions" in text, text
            assert not os.path.exists(sock) and not os.path.exists(tmp_path / "x.ctl")
    finally:
        listener.close()


def test_ctl_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.environ.pop("VHOSTMEM_CONTROL", None)
    assert ctl_main(["regions"]) == 2
    assert ctl_main(["--control", str(tmp_path / "nothing.ctl"), "regions"]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert ctl_main(["--control", "x", "bogus"]) == 2


def test_ctl_commands_against_a_running_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = start_backend(tmp_path)
    try:
        with FakeFrontend.connect(backend.socket) as fe:
            fe.handshake()
            memfd = make_memfd(4 * MiB)
            os.pwrite(memfd, b"vhostmem!", 0x1000)
            assert fe.add_region(0x100000000, 4 * MiB, 0x7F0000000000, 0, memfd) == 0
            os.close(memfd)
            ctl = ["--control", backend.control]
            assert ctl_main([*ctl, "regions"]) == 0
            assert "0x0000000100000000" in capsys.readouterr().out
            assert ctl_main([*ctl, "regions", "--json"]) == 0
            doc = json.loads(capsys.readouterr().out)
            assert doc["version"] == 1 and doc["regions"][0]["size"] == 4 * MiB
            assert ctl_main([*ctl, "peek", "0x100001000", "9", "--json"]) == 0
            assert bytes.fromhex(json.loads(capsys.readouterr().out)["hex"]) == b"vhostmem!"
            assert ctl_main([*ctl, "peek", "0x100001000", "9"]) == 0
            assert "vhostmem!" in capsys.readouterr().out
            assert ctl_main([*ctl, "peek", "0x200000000", "9"]) == 1
            assert "in no region" in capsys.readouterr().err
            for command in ("map", "events", "stats", "diagnose", "inject"):
                assert ctl_main([*ctl, command]) == 0, command
                assert capsys.readouterr().out.strip()
            assert ctl_main([*ctl, "inject", "REM_MEM_REG:nth=1:ack=3"]) == 0
            capsys.readouterr()
            assert fe.rem_region(0x100000000, 4 * MiB, 0x7F0000000000) == 3
    finally:
        assert backend.stop() == 0
    assert not os.path.exists(backend.socket) and not os.path.exists(backend.control)


def test_sigterm_cleans_up_and_non_socket_refused(tmp_path: Path) -> None:
    keep = tmp_path / "precious"
    keep.write_text("data")
    proc = run_vhostmem("--socket", str(keep))
    _, err = proc.communicate(timeout=20)
    assert proc.returncode != 0 and b"not a socket" in err
    assert keep.read_text() == "data"
    sock = str(tmp_path / "vu.sock")
    proc = run_vhostmem("--socket", sock, "--socket-mode", "0660")
    wait_path(sock)
    assert oct(os.stat(sock).st_mode & 0o777) == "0o660"
    assert oct(os.stat(sock + ".ctl").st_mode & 0o777) == "0o660"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert not os.path.exists(sock) and not os.path.exists(sock + ".ctl")


def test_fd_listening_and_connected(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "inherited.sock"))
    listener.listen()
    ctl = str(tmp_path / "a.ctl")
    proc = run_vhostmem(
        "--fd", str(listener.fileno()), "--control", ctl, pass_fds=(listener.fileno(),)
    )
    try:
        wait_path(ctl)
        with FakeFrontend.connect(str(tmp_path / "inherited.sock")) as fe:
            fe.handshake()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        listener.close()
    ours, theirs = socket.socketpair()
    ctl = str(tmp_path / "b.ctl")
    proc = run_vhostmem("--fd", str(theirs.fileno()), "--control", ctl, pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        fe = FakeFrontend(ours)
        fe.handshake()
        fe.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def wait_line(path: Path, words: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while words not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{words!r} never logged: {path.read_text()}"
        time.sleep(0.02)


def test_connect_mode_retries_until_frontend_listens(tmp_path: Path) -> None:
    # The log names what client mode connects to, the first failed attempt and each change of
    # its cause (not every retry), the connection with its attempts, and a reconnect; the
    # disconnect says who ended the connection.
    path = str(tmp_path / "qemu-server.sock")
    stderr = tmp_path / "stderr"
    events = tmp_path / "events.jsonl"
    ctl = str(tmp_path / "c.ctl")
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "vhostmem", "--connect", path, "--control", ctl),
                *("--event-log", str(events)),
            ],
            stderr=err,
        )
    try:
        wait_line(stderr, f"cannot connect to {path} (No such file or directory); retrying")
        time.sleep(0.5)  # a few more attempts, each 0.1 s apart
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        listener.settimeout(10)
        conn, _ = listener.accept()
        fe = FakeFrontend(conn)
        fe.handshake()
        listener.close()  # the path stays, refusing: another cause
        fe.close()
        wait_line(stderr, f"cannot connect to {path} (Connection refused); retrying")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    log = stderr.read_text()
    assert f"connecting to {path} (client mode); control socket {ctl}" in log, log
    assert "listening on" not in log, log
    [connected] = [line for line in log.splitlines() if f"connected to {path} after" in line]
    attempts = int(connected.split(" after ")[1].split()[0])
    assert attempts >= 3, connected
    assert log.count("cannot connect to") == 2, log  # one per cause, not one per attempt
    assert "released 0 region(s); front-end closed the connection" in log, log
    assert f"connecting to {path} again" in log, log
    [disconnect] = [
        e for e in map(json.loads, events.read_text().splitlines()) if e["event"] == "disconnect"
    ]
    assert disconnect["reason"] == "front-end closed the connection"


def test_start_backend_in_client_mode(tmp_path: Path) -> None:
    # vhostmem.testing's runner for a front-end that listens (DPDK's server=1, QEMU's
    # server=on): --connect PATH, and name names the control socket and the logs.
    path = str(tmp_path / "frontend.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        listener.settimeout(10)
        backend = start_backend(tmp_path, name="client", connect=path)
        try:
            assert backend.socket == path
            assert backend.control == str(tmp_path / "client.ctl")
            args = list(backend.process.args)  # type: ignore[arg-type]  # a list, as given
            assert "--connect" in args and "--socket" not in args
            conn, _ = listener.accept()
            fe = FakeFrontend(conn)
            fe.handshake()
            backend.wait_for(lambda: backend.stats()["connections_live"] == 1, 10, "the peer")
            fe.close()
        finally:
            assert backend.stop() == 0, backend.stderr()
    # (and then it connects again, as --connect does after each disconnect)
    assert [e["event"] for e in backend.log_lines()][:2] == ["connect", "disconnect"]


@pytest.mark.parametrize(
    ("flags", "violations"), [(("--batch-gap", "5000"), 1), (("--batch-gap", "0"), 0)]
)
def test_batch_gap_reaches_the_server(
    tmp_path: Path, flags: tuple[str, ...], violations: int
) -> None:
    # A REM and the identical re-ADD right behind it: one batch (a violation) under a 5 s gap
    # (wide enough for a busy machine; the 20 ms default is checked in test_robustness.py), two
    # batches under --batch-gap 0.
    sock = str(tmp_path / "vu.sock")
    ctl = str(tmp_path / "vu.ctl")
    proc = run_vhostmem("--socket", sock, "--control", ctl, *flags)
    try:
        wait_path(sock)
        memfd = make_memfd(4 << 20)
        with FakeFrontend.connect(sock) as fe:
            fe.handshake()
            assert fe.add_region(0, 4 << 20, 0x10000000, 0, memfd) == 0
            # the ADD is a batch of its own either way: a REM after an ADD starts a new batch
            assert fe.rem_region(0, 4 << 20, 0x10000000) == 0
            assert fe.add_region(0, 4 << 20, 0x10000000, 0, memfd) == 0
            report = ControlClient(ctl).call("check")
        os.close(memfd)
        assert report["counts"]["violations"] == violations, report
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def stall_until_dropped(path: str, give_up: float) -> float:
    """A front-end that handshakes, then sends GET_FEATURES and never reads a reply.

    Returns the seconds from its first unread request to the moment vhostmem dropped it (the
    send fails with EPIPE or ECONNRESET): at least the send timeout, since vhostmem can only
    start waiting on a reply after that first request.
    """
    fe = FakeFrontend.connect(path, timeout=give_up)
    try:
        fe.handshake()
        batch = encode_request(Request.GET_FEATURES) * 64
        started = time.monotonic()
        try:
            while time.monotonic() - started < give_up:
                fe.sock.sendall(batch)
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
        except TimeoutError:
            pass
        pytest.fail(f"vhostmem still had {path} open {give_up:g} s after it stopped reading")
    finally:
        fe.close()


def test_send_timeout_drops_a_frontend_that_stops_reading(tmp_path: Path) -> None:
    # Two real back-ends side by side, one with --send-timeout 1.5 and one with the default
    # (10 s), each with a front-end that never reads its replies: each is dropped after its own
    # time, and says so. The lower bounds are exact (vhostmem waits from a reply the front-end
    # caused); the upper ones leave room to fill the socket buffers on a busy machine.
    slack = 4.0
    backends = {"1.5": ("--send-timeout", "1.5"), "10": ()}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, flags in backends.items():
            sock = str(tmp_path / f"{name}.sock")
            procs[name] = run_vhostmem("--socket", sock, *flags)
            wait_path(sock)
        with ThreadPoolExecutor(len(backends)) as pool:
            waits = {
                name: pool.submit(
                    stall_until_dropped, str(tmp_path / f"{name}.sock"), float(name) + 2 * slack
                )
                for name in backends
            }
            dropped = {name: future.result() for name, future in waits.items()}
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        logs = {name: proc.communicate(timeout=20)[1].decode() for name, proc in procs.items()}
    for name, seconds in dropped.items():
        assert float(name) <= seconds < float(name) + slack, (name, dropped, logs[name])
        assert f"has not read its replies for {name} s" in logs[name], logs[name]
    assert all(proc.returncode == 0 for proc in procs.values()), logs


def test_linger_and_send_timeout_are_checked() -> None:
    for flags in (["--linger-ms", "-1"], ["--send-timeout", "0"], ["--batch-gap", "-5"]):
        with pytest.raises(SystemExit) as exc:
            main(["--socket", "/tmp/never-bound.sock", *flags])
        assert exc.value.code == 2


def test_qemu_trace_option_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    from vhostmem.cli import _qemu_trace_option, build_parser

    parser = build_parser()
    socks = ["/run/a.sock", "/run/b.sock"]
    assert _qemu_trace_option(parser, ["/run/t.log"], socks) == (("", "/run/t.log"),)
    assert _qemu_trace_option(parser, ["/run/b.sock=/run/b.log", "/run/t.log"], socks) == (
        ("/run/b.sock", "/run/b.log"),
        ("", "/run/t.log"),
    )
    for values in (["/run/c.sock=/run/c.log"], ["/run/t.log", "/run/u.log"], ["/run/a.sock="]):
        with pytest.raises(SystemExit) as exc:
            _qemu_trace_option(parser, values, socks)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'/run/c.sock' is not a socket given with --socket or --connect" in err
    assert "--qemu-trace given twice for every socket: /run/t.log and /run/u.log" in err
    with pytest.raises(SystemExit) as exc:
        main(["--socket", "/tmp/never-bound.sock", "--trace-wait", "0"])
    assert exc.value.code == 2


def test_strict_protocol_and_deviations_where_people_look(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # SET_FEATURES before SET_OWNER, as DPDK's virtio-user sends it after a reconnect: served
    # and shown by `vhostmem-ctl events` and the log; refused with --strict-protocol.
    for flags, want in (((), 0), (("--strict-protocol",), 1)):
        directory = tmp_path / ("strict" if flags else "lenient")
        directory.mkdir()
        backend = start_backend(directory, flags)
        try:
            with FakeFrontend.connect(backend.socket) as fe:
                fe.call(Request.SET_PROTOCOL_FEATURES, 1 << 3, need_reply=False)  # REPLY_ACK
                fe.reply_ack = True
                assert fe.ack(Request.SET_FEATURES, 1 << 32) == want, flags
                assert ctl_main(["--control", backend.control, "events"]) == 0
        finally:
            assert backend.stop() == 0
        out = capsys.readouterr().out
        deviation = "PROTOCOL DEVIATION (request-before-owner): SET_FEATURES served in state"
        if want:
            assert deviation not in out and "is not allowed before SET_OWNER" in out, out
            assert "PROTOCOL DEVIATION" not in backend.stderr()
        else:
            assert deviation in out and "--strict-protocol refuses it" in out, out
            said = [line for line in backend.stderr().splitlines() if "PROTOCOL DEVIATION" in line]
            assert len(said) == 1 and f"uid {os.getuid()}" in said[0], said
