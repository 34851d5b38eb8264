"""tools/setup-host as a new user runs it on a bare Debian 12: QEMU absent from PATH.

Each test runs the real script with a PATH that holds only a tmp directory: symlinks to the few
real tools it needs (bash, sed, grep...) and stubs of the package manager (apt-get, apt-cache,
dpkg-query), of `id` and of the python deps probe. Every stub records its call; an install that
the test did not allow fails loudly. qemu-system-x86_64 is on PATH only where a test puts a stub.
No root action is taken and nothing outside tmp_path is written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers.tools import load_tool

ROOT = Path(__file__).resolve().parents[2]
SETUP_HOST = ROOT / "tools" / "setup-host"
BACKPORTS_LINE = "deb http://deb.debian.org/debian bookworm-backports main"
QEMU_FIX = "apt-get install -y -t bookworm-backports qemu-system-x86 qemu-utils"

#: The real tools setup-host calls; everything else on its PATH is a stub or absent.
REAL_TOOLS = ("bash", "dirname", "sed", "head", "tail", "grep", "paste")
#: The apt-get stub that installs makes its QEMU stub executable with this, by absolute path.
CHMOD = shutil.which("chmod") or "/bin/chmod"

# A stub records "NAME ARGS..." in $STUB_LOG. apt-get installs only when STUB_APT_INSTALL is ok
# (it installs nothing) or works (QEMU's packages drop a QEMU 10.0.2 stub and qemu-img into
# $STUB_BIN, dpdk-dev drops a dpdk-testpmd stub there unless STUB_DPDK_TESTPMD=no, and every package
# but QEMU's is listed in $STUB_DB for dpkg-query); otherwise an install attempt exits 99 saying so.
STUB_APT_GET = r"""
echo "apt-get $*" >> "$STUB_LOG"
case " $* " in
    *" install "*|*" download "*)
        case "${STUB_APT_INSTALL:-refuse}" in
            ok) ;;
            works)
                for pkg in "$@"; do
                    case "$pkg" in
                        -*|install|bookworm-backports) ;;
                        qemu-system-x86)
                            printf '#!@BASH@\necho "QEMU emulator version 10.0.2 (stub)"\n' \
                                > "$STUB_BIN/qemu-system-x86_64"
                            @CHMOD@ +x "$STUB_BIN/qemu-system-x86_64" ;;
                        qemu-utils)
                            printf '#!@BASH@\nexit 0\n' > "$STUB_BIN/qemu-img"
                            @CHMOD@ +x "$STUB_BIN/qemu-img" ;;
                        dpdk-dev)
                            echo "$pkg" >> "$STUB_DB"
                            if [ "${STUB_DPDK_TESTPMD:-yes}" = yes ]; then
                                printf '#!@BASH@\nexit 0\n' > "$STUB_BIN/dpdk-testpmd"
                                @CHMOD@ +x "$STUB_BIN/dpdk-testpmd"
                            fi ;;
                        *) echo "$pkg" >> "$STUB_DB" ;;
                    esac
                done ;;
            *)
                echo "STUB apt-get: install attempted: apt-get $*" >&2
                exit 99 ;;
        esac ;;
esac
exit 0
"""
STUB_APT_CACHE = r"""
echo "apt-cache $*" >> "$STUB_LOG"
if [ -n "${STUB_APT_CACHE_SHOW:-}" ]; then echo "$(< "$STUB_APT_CACHE_SHOW")"; exit 0; fi
echo "STUB apt-cache: no package lists" >&2
exit 100
"""
# dpkg-query -W -f FORMAT PKG: packages named in $STUB_INSTALLED (space-separated) or in $STUB_DB
# are installed at version 9.9-stub; any other one is unknown, as dpkg-query says for a package
# never seen.
STUB_DPKG_QUERY = r"""
echo "dpkg-query $*" >> "$STUB_LOG"
pkg=${!#}
db=" ${STUB_INSTALLED:-} "
if [ -f "$STUB_DB" ]; then
    while read -r line; do db="$db $line "; done < "$STUB_DB"
fi
case "$db" in
    *" $pkg "*)
        case "$*" in
            *Status*Version*) printf 'install ok installed 9.9-stub' ;;
            *Status*) printf 'install ok installed' ;;
            *) printf '9.9-stub' ;;
        esac
        exit 0 ;;
esac
echo "dpkg-query: no packages found matching $pkg" >&2
exit 1
"""
STUB_ID = r"""
echo "id $*" >> "$STUB_LOG"
if [ "$1" = -u ]; then echo "${STUB_UID:-0}"; exit 0; fi
echo "STUB id: only -u is stubbed" >&2
exit 99
"""
# The python deps probe (`python3 - REPO`, the program on stdin) answers "all import" unless
# STUB_PYTHON_DEPS=missing: the editable install of this machine points at another checkout, and
# most tests are about the system steps. `-m pip --version` fails when STUB_PIP=absent; `-m pip
# install` succeeds (installing nothing) only when STUB_PIP_INSTALL=ok, else fails loudly. With
# STUB_EXTERNALLY_MANAGED=yes the PEP 668 probe says so. Everything else (build-guest, -c
# snippets) runs in the real interpreter.
STUB_PYTHON = r"""
echo "python3 $*" >> "$STUB_LOG"
if [ "${1:-}" = - ]; then
    if [ "${STUB_PYTHON_DEPS:-ok}" = missing ]; then
        echo "cannot import trio: No module named 'trio'" >&2
        exit 1
    fi
    exit 0
fi
if [ "${1:-}" = -m ] && [ "${2:-}" = pip ]; then
    if [ "${STUB_PIP:-present}" = absent ]; then
        echo "@PYTHON@: No module named pip" >&2
        exit 1
    fi
    if [ "${3:-}" = --version ]; then echo "pip 99.0 (stub)"; exit 0; fi
    if [ "${STUB_PIP_INSTALL:-refuse}" != ok ]; then
        echo "STUB python3: pip install attempted: $*" >&2
        exit 99
    fi
    exit 0
fi
if [ "${1:-}" = -c ] && [ "${STUB_EXTERNALLY_MANAGED:-}" = yes ] \
        && [[ "${2:-}" == *EXTERNALLY-MANAGED* ]]; then
    echo --break-system-packages  # as Debian 12's own python3 answers (PEP 668)
    exit 0
fi
exec @PYTHON@ "$@"
"""
STUB_SUDO = r"""
echo "sudo $*" >> "$STUB_LOG"
echo "STUB sudo: setup-host must never call sudo itself" >&2
exit 99
"""


def stub_qemu(version: str) -> str:
    return f"""
echo "qemu-system-x86_64 $*" >> "$STUB_LOG"
echo "QEMU emulator version {version} (stub)"
echo "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers"
"""


@dataclass
class Host:
    """A bare machine in a tmp directory: PATH, apt dirs, cache, and the stubs' call log."""

    tmp: Path
    bin: Path
    sources_dir: Path
    lists_dir: Path
    cache: Path
    log: Path
    env: dict[str, str]

    def stub(self, name: str, body: str) -> None:
        path = self.bin / name
        body = body.replace("@PYTHON@", sys.executable).replace("@BASH@", str(shutil.which("bash")))
        path.write_text(f"#!{shutil.which('bash')}\n" + body.replace("@CHMOD@", CHMOD))
        path.chmod(0o755)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        # Run through the shebang (/usr/bin/env bash): bash must come from this PATH too.
        proc = subprocess.run(
            [str(SETUP_HOST), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.tmp,
        )
        print(
            f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}--- calls\n"
            + "\n".join(self.calls())
        )
        return proc

    def files(self) -> dict[str, bytes]:
        """Every file under tmp except the call log: what a run wrote."""
        return {
            str(p.relative_to(self.tmp)): p.read_bytes()
            for p in sorted(self.tmp.rglob("*"))
            if p.is_file() and p != self.log
        }


@pytest.fixture
def host(tmp_path: Path) -> Host:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in REAL_TOOLS:
        real = shutil.which(tool)
        if real is None:
            pytest.fail(
                f"{tool} is not installed here; setup-host's test needs the real one "
                "(apt-get install -y coreutils grep sed bash)"
            )
        (bin_dir / tool).symlink_to(real)
    sources_dir = tmp_path / "apt" / "sources.list.d"
    sources_dir.mkdir(parents=True)
    lists_dir = tmp_path / "apt-lists"
    lists_dir.mkdir()
    # Package lists present, so the guest-image step runs build-guest --check against the stubs.
    (lists_dir / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4").touch()
    h = Host(
        tmp=tmp_path,
        bin=bin_dir,
        sources_dir=sources_dir,
        lists_dir=lists_dir,
        cache=tmp_path / "cache",
        log=tmp_path / "calls.log",
        env={
            "PATH": str(bin_dir),
            "HOME": str(tmp_path),
            "LC_ALL": "C",
            "STUB_LOG": str(tmp_path / "calls.log"),
            "STUB_BIN": str(bin_dir),
            "STUB_DB": str(tmp_path / "dpkg-db"),
            "VHOSTMEM_CACHE": str(tmp_path / "cache"),
            "VHOSTMEM_APT_SOURCES_DIR": str(sources_dir),
            "VHOSTMEM_APT_LISTS_DIR": str(lists_dir),
        },
    )
    h.stub("apt-get", STUB_APT_GET)
    h.stub("apt-cache", STUB_APT_CACHE)
    h.stub("dpkg-query", STUB_DPKG_QUERY)
    h.stub("id", STUB_ID)
    h.stub("python3", STUB_PYTHON)
    h.stub("sudo", STUB_SUDO)
    return h


def installs(calls: list[str]) -> list[str]:
    return [c for c in calls if " install" in c or c.startswith("sudo")]


def test_check_reports_qemu_missing_with_its_fix(host: Host) -> None:
    before = host.files()
    proc = host.run("--check")
    assert proc.returncode == 1
    assert "unexpected error" not in proc.stdout + proc.stderr
    out = proc.stdout
    assert (
        "setup-host: qemu: MISSING QEMU >= 8.2 with qemu-img "
        "(qemu-system-x86_64 is not on PATH)" in out
    )
    backports = host.sources_dir / "bookworm-backports.list"
    assert (
        f"  fix: echo '{BACKPORTS_LINE}' | tee {backports} && apt-get update && {QEMU_FIX}" in out
    )
    # The other steps are still reported, each with its fix.
    assert "setup-host: python deps: ok" in out
    assert (
        "setup-host: busybox-static cpio: MISSING (not installed)\n"
        "  fix: apt-get install -y busybox-static cpio" in out
    )
    assert (
        "setup-host: chromium: MISSING (not installed; the timeline page's browser test "
        "needs it)\n  fix: apt-get install -y chromium" in out
    )
    assert "setup-host: guest image: MISSING: busybox-static is not installed" in out
    assert (
        "setup-host: dpdk-dev: MISSING (not installed; the DPDK tests run dpdk-testpmd)\n"
        "  fix: apt-get install -y dpdk-dev" in out
    )
    assert "setup-host: check: 5 thing(s) missing" in out
    # Detection only: no install, no apt-get at all, nothing written.
    assert installs(host.calls()) == []
    assert not [c for c in host.calls() if c.startswith("apt-get")]
    assert host.files() == before


def test_install_without_qemu_adds_backports_installs_and_names_the_fix(host: Host) -> None:
    host.env["STUB_APT_INSTALL"] = "ok"
    proc = host.run()
    assert proc.returncode == 1
    assert "unexpected error" not in proc.stdout + proc.stderr
    backports = host.sources_dir / "bookworm-backports.list"
    assert backports.read_text() == BACKPORTS_LINE + "\n"
    assert f"setup-host: apt: added {backports}" in proc.stdout
    calls = host.calls()
    assert "apt-get update -qq" in calls
    assert "apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils" in calls
    assert calls.index("apt-get update -qq") < calls.index(
        "apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils"
    )
    assert (
        "setup-host: FAILED: QEMU is still not >= 8.2 with qemu-img after installing "
        "(qemu-system-x86_64 is not on PATH)\n"
        f"  fix: {QEMU_FIX}"
    ) in proc.stderr
    # It stopped there: busybox was not installed after a failed QEMU step.
    assert not [c for c in calls if "busybox" in c]


def test_backports_already_configured_is_not_written_again(host: Host) -> None:
    host.env["STUB_APT_INSTALL"] = "ok"
    (host.tmp / "apt" / "sources.list").write_text(
        "deb http://deb.debian.org/debian bookworm main\n# bookworm-backports commented out\n"
    )
    own = host.sources_dir / "debian.sources"
    own.write_text(
        "Types: deb\nURIs: http://deb.debian.org/debian\n"
        "Suites: bookworm bookworm-updates bookworm-backports\nComponents: main\n"
    )
    proc = host.run()
    assert proc.returncode == 1
    assert sorted(p.name for p in host.sources_dir.iterdir()) == ["debian.sources"]
    assert "apt: added" not in proc.stdout
    assert "apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils" in host.calls()


def test_non_root_install_fails_naming_sudo(host: Host) -> None:
    host.env["STUB_UID"] = "1000"
    before = host.files()
    proc = host.run()
    assert proc.returncode == 1
    assert "unexpected error" not in proc.stdout + proc.stderr
    assert (
        "setup-host: FAILED: installing QEMU >= 8.2 (qemu-system-x86_64 is not on PATH) "
        "needs root (apt-get)\n"
        f"  fix: sudo {SETUP_HOST}"
    ) in proc.stderr
    assert not [c for c in host.calls() if c.startswith(("apt-get", "sudo"))]
    assert host.files() == before
    # --check needs no root, and the fixes it prints carry sudo where they need root.
    proc = host.run("--check")
    assert proc.returncode == 1
    backports = host.sources_dir / "bookworm-backports.list"
    assert (
        f"  fix: echo '{BACKPORTS_LINE}' | sudo tee {backports} && sudo apt-get update && "
        f"sudo {QEMU_FIX}"
    ) in proc.stdout
    assert "  fix: sudo apt-get install -y busybox-static cpio" in proc.stdout
    assert f"sudo {SETUP_HOST} installs them all" in proc.stdout
    assert installs(host.calls()) == []


def test_too_old_qemu_is_reported_with_its_version(host: Host) -> None:
    host.stub("qemu-system-x86_64", stub_qemu("7.2.0"))
    host.stub("qemu-img", "exit 0\n")
    proc = host.run("--check")
    assert proc.returncode == 1
    assert (
        "setup-host: qemu: MISSING QEMU >= 8.2 with qemu-img (QEMU 7.2.0 is older than 8.2 "
        "(virtio-mem dynamic-memslots needs 8.2))"
    ) in proc.stdout
    assert f"{QEMU_FIX}" in proc.stdout
    # Installing as root: apt-get runs, QEMU stays 7.2.0, and the failure says so.
    host.env["STUB_APT_INSTALL"] = "ok"
    proc = host.run()
    assert proc.returncode == 1
    assert "unexpected error" not in proc.stdout + proc.stderr
    assert "setup-host: qemu: installing from bookworm-backports (found: 7.2.0)" in proc.stdout
    assert (
        "FAILED: QEMU is still not >= 8.2 with qemu-img after installing (QEMU 7.2.0 is "
        "older than 8.2"
    ) in proc.stderr


def complete_host(host: Host) -> None:
    """Everything present: QEMU 10, busybox-static, cpio, dpdk-dev with its testpmd, an
    up-to-date guest image."""
    host.stub("qemu-system-x86_64", stub_qemu("10.0.2"))
    host.stub("qemu-img", "exit 0\n")
    host.stub("dpdk-testpmd", "exit 0\n")
    host.env["STUB_INSTALLED"] = "busybox-static cpio chromium dpdk-dev"
    guest_image(host)


def guest_image(host: Host) -> None:
    """A guest image in the cache, up to date for busybox-static 9.9-stub and apt's kernel."""
    show = host.tmp / "apt-cache-show"
    show.write_text(
        "Package: linux-image-amd64\nDepends: linux-image-6.1.0-99-amd64 (= 6.1.999-1)\n"
    )
    host.env["STUB_APT_CACHE_SHOW"] = str(show)
    bg = load_tool("build-guest")
    host.cache.mkdir()
    (host.cache / "vmlinuz").write_bytes(b"kernel")
    (host.cache / "initrd.gz").write_bytes(b"initrd")
    script = (ROOT / "tools" / "build-guest").read_bytes()
    rhash = bg.recipe_hash(script, "linux-image-6.1.0-99-amd64", "6.1.999-1", "9.9-stub")
    version = {
        "kernel_release": "6.1.0-99-amd64",
        "kernel_package_version": "6.1.999-1",
        "busybox_static_version": "9.9-stub",
        "script_sha256": hashlib.sha256(script).hexdigest(),
        "recipe_hash": rhash,
        "content_sha256": hashlib.sha256(b"kernel" + b"initrd").hexdigest(),
    }
    (host.cache / "VERSION").write_text("".join(f"{k}={v}\n" for k, v in version.items()))


def test_check_passes_when_everything_is_there(host: Host) -> None:
    complete_host(host)
    before = host.files()
    proc = host.run("--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "setup-host: qemu: ok (QEMU 10.0.2 >= 8.2" in proc.stdout
    assert "setup-host: guest image: ok (up to date: 6.1.0-99-amd64" in proc.stdout
    assert f"setup-host: dpdk-dev: ok (9.9-stub, {host.bin / 'dpdk-testpmd'})" in proc.stdout
    assert "setup-host: check: everything is there" in proc.stdout
    assert "MISSING" not in proc.stdout
    assert installs(host.calls()) == []
    assert host.files() == before


def test_check_names_a_stale_or_broken_guest_image(host: Host) -> None:
    complete_host(host)
    version = host.cache / "VERSION"
    version.write_text(
        version.read_text()
        .replace("busybox_static_version=9.9-stub", "busybox_static_version=1.0-old")
        .replace("recipe_hash=", "recipe_hash=0")
    )
    proc = host.run("--check")
    assert proc.returncode == 1
    assert (
        "setup-host: guest image: OUT OF DATE: the guest image in "
        f"{host.cache} was built from another recipe (busybox-static 1.0-old -> 9.9-stub)\n"
        "  fix: tools/build-guest"
    ) in proc.stdout
    (host.cache / "initrd.gz").write_bytes(b"half")
    proc = host.run("--check")
    assert proc.returncode == 1
    assert "guest image: MISSING: the guest image in" in proc.stdout
    assert "fix: tools/build-guest --force" in proc.stdout
    os.unlink(host.cache / "vmlinuz")
    proc = host.run("--check")
    assert f"guest image: MISSING: no guest image in {host.cache} (absent: vmlinuz)" in proc.stdout


def test_missing_pip_and_python_packages_are_named_with_their_fix(host: Host) -> None:
    host.env.update(STUB_PYTHON_DEPS="missing", STUB_PIP="absent")
    pip_fix = f"cd {ROOT} && python3 -m pip install -e '.[test]'"
    proc = host.run("--check")
    assert proc.returncode == 1
    assert (
        "setup-host: python deps: MISSING (cannot import trio: No module named 'trio')\n"
        f"  fix: apt-get install -y python3-pip && {pip_fix}\n"
    ) in proc.stdout
    assert installs(host.calls()) == []
    # Installing: apt-get brings python3-pip; this stub's pip still does not run, and the
    # failure says so.
    host.env["STUB_APT_INSTALL"] = "ok"
    proc = host.run()
    assert proc.returncode == 1
    assert "unexpected error" not in proc.stdout + proc.stderr
    assert "apt-get install -y -qq python3-pip" in host.calls()
    assert (
        "setup-host: FAILED: python3 -m pip still does not run after installing "
        "python3-pip\n  fix: apt-get install -y python3-pip"
    ) in proc.stderr
    # With pip there, it runs pip install -e '.[test]' in the checkout; the packages still do
    # not import (the stub installs nothing), and the failure names the import and the fix.
    # On an externally managed python (Debian 12's, PEP 668) pip needs --break-system-packages.
    host.log.unlink()
    host.env.update(STUB_PIP="present", STUB_PIP_INSTALL="ok", STUB_EXTERNALLY_MANAGED="yes")
    proc = host.run()
    assert proc.returncode == 1
    assert "python3 -m pip install -q --break-system-packages -e .[test]" in host.calls()
    pip_fix = f"cd {ROOT} && python3 -m pip install --break-system-packages -e '.[test]'"
    assert (
        "setup-host: FAILED: python deps still do not import after pip install: cannot "
        f"import trio: No module named 'trio'\n  fix: {pip_fix}  (and read its errors)"
    ) in proc.stderr
    assert not [c for c in host.calls() if c.startswith("apt-get")]


def python_deps_probe() -> str:
    """The program setup-host feeds to `python3 - REPO` to decide whether the deps are there."""
    text = SETUP_HOST.read_text()
    start = text.index("<<'EOF'\n") + len("<<'EOF'\n")
    return text[start : text.index("\nEOF\n", start)]


@pytest.mark.parametrize("tool", ["ruff", "mypy"])
def test_python_deps_probe_requires_the_lint_tools(tmp_path: Path, tool: str) -> None:
    # tools/test runs the lint gate with this python's ruff and mypy: the probe that decides
    # whether pip install -e '.[test]' must run fails while one of them does not import.
    # A package of the tool's name that raises on import stands first on the path.
    shadow = tmp_path / tool
    shadow.mkdir()
    (shadow / "__init__.py").write_text(f"raise ImportError('{tool} shadowed by the test')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-", str(ROOT)],
        input=python_deps_probe(),
        capture_output=True,
        text=True,
        cwd="/",
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"cannot import {tool}: {tool} shadowed by the test"


def test_install_on_a_bare_machine_runs_every_step_to_done(host: Host) -> None:
    # Nothing installed; apt-get installs for real (as stubs). Only the guest image is cached:
    # building it downloads a kernel, which no test does.
    guest_image(host)
    host.env["STUB_APT_INSTALL"] = "works"
    proc = host.run()
    assert proc.returncode == 0, proc.stderr
    assert "FAILED" not in proc.stderr and "build-guest: up to date" in proc.stderr
    out = proc.stdout
    for line in (
        f"setup-host: apt: added {host.sources_dir / 'bookworm-backports.list'}",
        "setup-host: qemu: installed QEMU 10.0.2",
        "setup-host: busybox-static cpio: installed",
        "setup-host: chromium: installed",
        "setup-host: dpdk-dev: installed",
        f"setup-host: guest image: ok ({host.cache / 'vmlinuz'} {host.cache / 'initrd.gz'})",
        "setup-host: done",
    ):
        assert line in out.splitlines(), line
    apt = [c for c in host.calls() if c.startswith("apt-get")]
    assert apt == [
        "apt-get update -qq",
        "apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils",
        "apt-get install -y -qq busybox-static cpio",
        "apt-get install -y -qq chromium",
        "apt-get install -y -qq dpdk-dev",
    ]
    # and then --check finds everything
    proc = host.run("--check")
    assert proc.returncode == 0, proc.stdout
    assert "setup-host: check: everything is there" in proc.stdout


def test_dpdk_dev_step_checks_for_testpmd_and_installs_it(host: Host) -> None:
    complete_host(host)
    os.unlink(host.bin / "dpdk-testpmd")
    host.env["STUB_INSTALLED"] = "busybox-static cpio chromium"
    proc = host.run("--check")
    assert proc.returncode == 1
    assert (
        "setup-host: dpdk-dev: MISSING (not installed; the DPDK tests run dpdk-testpmd)\n"
        "  fix: apt-get install -y dpdk-dev\n"
    ) in proc.stdout
    assert "setup-host: check: 1 thing(s) missing" in proc.stdout
    assert installs(host.calls()) == []
    # The package without its program (a broken or partial install) is not "ok" either.
    host.env["STUB_INSTALLED"] = "busybox-static cpio chromium dpdk-dev"
    proc = host.run("--check")
    assert (
        "setup-host: dpdk-dev: MISSING (installed, but dpdk-testpmd is not on PATH; the DPDK "
        "tests run dpdk-testpmd)"
    ) in proc.stdout
    # Not root: installing names sudo and touches nothing.
    host.env.update(STUB_INSTALLED="busybox-static cpio chromium", STUB_UID="1000")
    proc = host.run()
    assert proc.returncode == 1
    assert (
        "setup-host: FAILED: installing dpdk-dev (not installed) needs root (apt-get)\n"
        f"  fix: sudo {SETUP_HOST}"
    ) in proc.stderr
    assert installs(host.calls()) == []
    # Root: apt-get installs it, and the step checks that testpmd is there afterwards.
    host.env.update(STUB_UID="0", STUB_APT_INSTALL="works", STUB_DPDK_TESTPMD="no")
    proc = host.run()
    assert proc.returncode == 1
    assert "apt-get install -y -qq dpdk-dev" in host.calls()
    assert (
        "setup-host: FAILED: dpdk-dev: installed, but dpdk-testpmd is not on PATH after "
        "installing it\n  fix: apt-get install --reinstall -y dpdk-dev"
    ) in proc.stderr
    host.env["STUB_DPDK_TESTPMD"] = "yes"
    proc = host.run()
    assert proc.returncode == 0, proc.stderr
    assert "setup-host: dpdk-dev: installed" in proc.stdout.splitlines()
    assert f"setup-host: dpdk-dev: ok (9.9-stub, {host.bin / 'dpdk-testpmd'})" in (
        host.run("--check").stdout
    )


def test_chromium_alone_missing_is_reported_then_installed(host: Host) -> None:
    complete_host(host)
    host.env["STUB_INSTALLED"] = "busybox-static cpio dpdk-dev"
    host.env["STUB_UID"] = "1000"
    proc = host.run("--check")
    assert proc.returncode == 1
    assert (
        "setup-host: chromium: MISSING (not installed; the timeline page's browser test "
        "needs it)\n  fix: sudo apt-get install -y chromium\n"
    ) in proc.stdout
    assert "setup-host: check: 1 thing(s) missing" in proc.stdout
    assert installs(host.calls()) == []
    # Not root: it stops there and says how.
    proc = host.run()
    assert proc.returncode == 1
    assert (
        f"setup-host: FAILED: installing chromium needs root (apt-get)\n  fix: sudo {SETUP_HOST}"
    ) in proc.stderr
    assert installs(host.calls()) == []
    # As root: one apt-get install, then everything is there.
    host.env["STUB_UID"] = "0"
    host.env["STUB_APT_INSTALL"] = "works"
    proc = host.run()
    assert proc.returncode == 0, proc.stderr
    assert "setup-host: chromium: installed" in proc.stdout.splitlines()
    assert [c for c in host.calls() if c.startswith("apt-get")] == [
        "apt-get update -qq",
        "apt-get install -y -qq chromium",
    ]
    proc = host.run("--check")
    assert proc.returncode == 0, proc.stdout
    assert "setup-host: chromium: ok (9.9-stub)" in proc.stdout
