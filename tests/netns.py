"""Network namespaces and TAPs for the data-path tests (unit and QEMU): ``ip`` and the checks.

Missing prerequisites fail the test with what is missing and how to get it; they never skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess

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


def ip(*args: str, check: bool = True) -> str:
    """``ip ARGS``'s output; a failure raises AssertionError with its stderr (unless not
    ``check``)."""
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def netns_exists(name: str) -> bool:
    return name in ip("netns", "list").split()
