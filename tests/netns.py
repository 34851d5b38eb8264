"""Network namespaces and TAPs for the data-path tests (unit and QEMU): ``ip`` and the checks.

Missing prerequisites fail the test with what is missing and how to get it; they never skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest


def require_tap_and_netns(doing: str) -> None:
    """Fail (never skip) unless we can make a TAP in a network namespace and ping through it:
    root, /dev/net/tun, ``ip`` and busybox (its ping)."""
    if os.geteuid() != 0:
        pytest.fail(f"{doing} needs root (CAP_NET_ADMIN) to make a TAP and a network namespace")
    if not os.path.exists("/dev/net/tun"):
        pytest.fail("/dev/net/tun is missing: modprobe tun (or give the container the device)")
    if shutil.which("ip") is None:
        pytest.fail("ip is missing: install iproute2")
    if shutil.which("busybox") is None:
        pytest.fail(
            "busybox is missing (its ping is used): tools/setup-host installs busybox-static"
        )


def own_name(prefix: str) -> str:
    """A namespace or TAP name of this test process: ``prefix`` and the pid, so that two runs
    on one host do not meet; at most 15 characters (a link name's limit, IFNAMSIZ - 1)."""
    name = f"{prefix}{os.getpid() % 100000}"
    assert len(name) <= 15, name
    return name


def ip(*args: str, check: bool = True) -> str:
    """``ip ARGS``'s output; a failure raises AssertionError with its stderr (unless not
    ``check``)."""
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def netns_exists(name: str) -> bool:
    return name in ip("netns", "list").split()


@contextlib.contextmanager
def fresh_tap_and_netns(netns: str, tap: str) -> Iterator[None]:
    """A test's own namespace and TAP names: refused if the namespace is left from elsewhere,
    removed afterwards (what vhostmem --netns created, should vhostmem not have)."""
    require_tap_and_netns("vhostmem --tap/--netns")
    if netns_exists(netns):
        pytest.fail(f"network namespace {netns} exists already; remove it: ip netns del {netns}")
    yield
    if netns_exists(netns):
        ip("netns", "del", netns, check=False)
    ip("link", "del", tap, check=False)
