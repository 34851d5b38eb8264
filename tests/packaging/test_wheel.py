"""The built wheel, installed into a fresh venv next to the index's ``protocol`` distribution.

vhostmem goes into other projects' CI environments (its pytest plugin is a ``pytest11`` entry
point for that). What an editable checkout cannot show is checked here on the wheel itself: it
installs no top-level ``protocol`` (``protocol`` 0.37 on the index owns that name), its programs
and plugin run from the install, and it carries every package data file.

Needs the package index (the wheel build's setuptools, ``protocol``, vhostmem's dependencies):
without it the test fails and says so. Deselect it with ``-m "not packaging"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

import vhostmem

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[2]

#: The unrelated distribution that owns the top-level name ``protocol`` on the index.
OTHER_PROTOCOL = "protocol==0.37"

#: Per subprocess: a venv, a wheel build, an install from the index, one program run.
TIMEOUT = 180

#: Left out of the copy the wheel is built from: VCS data, caches, earlier build output.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
)

#: Run inside the venv from an empty directory: who provides each name, and every data file of
#: the installed vhostmem read the way the code reads it (importlib.resources).
PROBE = r"""
import hashlib, importlib, importlib.metadata as md, importlib.resources, json, sys
from pathlib import Path

import vhostmem
import vhostmem.protocol
from vhostmem.protocol import Request

# by name, so that the sed which renamed the imports (commit "Import protocol as
# vhostmem.protocol everywhere") leaves this line to the other distribution
protocol = importlib.import_module("protocol")

def owner(module):
    path = Path(module.__file__).resolve()
    for dist in ("protocol", "vhostmem"):
        if any(Path(f.locate()).resolve() == path for f in md.files(dist) or ()):
            return dist
    return None

data = {}
for f in md.files("vhostmem") or ():
    parts = f.parts
    if parts[0] != "vhostmem" or f.suffix in (".py", ".pyc") or "__pycache__" in parts:
        continue
    resource = importlib.resources.files(".".join(parts[:-1])).joinpath(parts[-1])
    data["/".join(parts)] = hashlib.sha256(resource.read_bytes()).hexdigest()

print(json.dumps({
    "protocol": {"file": protocol.__file__, "version": protocol.__version__,
                 "dist_version": md.version("protocol"), "owner": owner(protocol),
                 "has_BaseProtocol": hasattr(protocol, "BaseProtocol")},
    "vhostmem.protocol": {"file": vhostmem.protocol.__file__, "owner": owner(vhostmem.protocol),
                          "SET_MEM_TABLE": int(Request.SET_MEM_TABLE),
                          "is_protocol": vhostmem.protocol is protocol},
    "vhostmem": {"file": vhostmem.__file__, "version": vhostmem.__version__,
                 "dist_version": md.version("vhostmem")},
    "data": data,
}))
"""


def clean_env() -> dict[str, str]:
    """This environment minus what would let the venv see the checkout or this pytest run."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "PYTHONPATH",
            "PYTHONHOME",
            "PYTHONSTARTUP",
            "VIRTUAL_ENV",
            "PYTEST_ADDOPTS",
            "PYTEST_PLUGINS",
            "PIP_REQUIRE_VIRTUALENV",
        )
    }
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(argv: Sequence[str | Path], cwd: Path, why: str = "") -> str:
    """stdout of ``argv``; a failure or timeout fails the test with the command and its output."""
    cmd = " ".join(map(str, argv))
    try:
        done = subprocess.run(
            [str(a) for a in argv],
            cwd=cwd,
            env=clean_env(),
            timeout=TIMEOUT,
            capture_output=True,
            text=True,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        output = err.stderr if isinstance(err.stderr, str) else ""  # text=True: str or None
        pytest.fail(f"{cmd} did not finish in {TIMEOUT} s{why}\n{output}")
    if done.returncode != 0:
        pytest.fail(
            f"{cmd} exited {done.returncode}{why}\n--- stdout\n{done.stdout[-3000:]}"
            f"\n--- stderr\n{done.stderr[-3000:]}"
        )
    return done.stdout


NEEDS_INDEX = (
    "\nThis test needs the package index (PyPI or the configured mirror) for the "
    f"build's setuptools, {OTHER_PROTOCOL} and vhostmem's dependencies; CI has it. "
    'Without it, deselect the test explicitly: -m "not packaging".'
)


@dataclass(frozen=True)
class Installed:
    venv: Path
    site: Path  # the venv's site-packages
    cwd: Path  # an empty directory: nothing of the checkout is importable from it
    wheel: Path
    probe: dict[str, dict[str, object]]

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=NOT_SOURCE)
    wheels = tmp / "wheels"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, src],
        tmp,
        NEEDS_INDEX,
    )
    (wheel,) = wheels.glob("vhostmem-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", venv], tmp)
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", f"{wheel}[test]", OTHER_PROTOCOL], tmp, NEEDS_INDEX)
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (tmp / "probe.py").write_text(PROBE)
    probe = json.loads(run([python, tmp / "probe.py"], cwd))
    yield Installed(venv, site, cwd, wheel, probe)


def test_the_other_protocol_and_ours_import_side_by_side(installed: Installed) -> None:
    other, ours = installed.probe["protocol"], installed.probe["vhostmem.protocol"]
    print(json.dumps({k: v for k, v in installed.probe.items() if k != "data"}, indent=2))
    assert other["owner"] == "protocol" and other["dist_version"] == "0.37", other
    assert other["file"] == str(installed.site / "protocol" / "__init__.py"), other
    assert other["has_BaseProtocol"], other  # the neuroscience framework's API, not ours
    assert ours["owner"] == "vhostmem", ours
    assert ours["file"] == str(installed.site / "vhostmem" / "protocol" / "__init__.py"), ours
    assert ours["SET_MEM_TABLE"] == 5 and ours["is_protocol"] is False, ours
    assert installed.probe["vhostmem"]["version"] == vhostmem.__version__


def test_the_wheel_installs_no_top_level_but_vhostmem(installed: Installed) -> None:
    from zipfile import ZipFile

    with ZipFile(installed.wheel) as whl:
        names = whl.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"vhostmem"}, sorted(names)
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    with ZipFile(installed.wheel) as whl:
        assert whl.read(top_level).decode().split() == ["vhostmem"]


def test_the_programs_run_from_the_install(installed: Installed) -> None:
    assert run([installed.bin("vhostmem"), "--version"], installed.cwd).split() == [
        "vhostmem",
        vhostmem.__version__,
    ]
    caps = json.loads(run([installed.bin("vhostmem"), "--print-capabilities"], installed.cwd))
    assert caps == {"type": "net"}
    explained = run([installed.bin("vhostmem-ctl"), "explain"], installed.cwd)
    assert "QEMU >= 8.2 (memslots unmergeable)" in explained, explained
    assert "7 messages, 2 non-atomic" in explained, explained


def test_pytest_lists_the_plugin_fixtures(installed: Installed) -> None:
    listed = run(
        [installed.bin("python"), "-m", "pytest", "--fixtures", "-p", "no:cacheprovider"],
        installed.cwd,
    )
    section = listed.split("fixtures defined from vhostmem.testing.plugin", 1)
    assert len(section) == 2, f"no fixtures from vhostmem.testing.plugin in:\n{listed}"
    names = {line.split(" -- ")[0] for line in section[1].splitlines() if " -- " in line}
    plugin_file = installed.site / "vhostmem" / "testing" / "plugin.py"
    assert {"vhostmem_backend", "vhostmem_factory"} <= names, section[1]
    assert f"{os.path.relpath(plugin_file, installed.cwd)}:" in section[1], section[1]


def package_data_in_checkout() -> dict[str, Path]:
    """Installed path -> source file, for every data file the wheel must carry.

    Both what pyproject.toml's package-data globs match and every non-Python file in a package's
    folder (a file added there without a glob is data the wheel would silently lack).
    """
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools.get("package-dir", {})
    folders = {
        pkg: ROOT / package_dir.get(pkg, pkg.replace(".", "/")) for pkg in setuptools["packages"]
    }
    wanted: dict[str, Path] = {}

    def want(pkg: str, path: Path) -> None:
        wanted["/".join([*pkg.split("."), *path.relative_to(folders[pkg]).parts])] = path

    for pkg, globs in setuptools.get("package-data", {}).items():
        for pattern in globs:
            matched = [p for p in folders[pkg].glob(pattern) if p.is_file()]
            assert matched, f"package-data {pkg!r}: {pattern!r} matches nothing in {folders[pkg]}"
            for path in matched:
                want(pkg, path)
    for pkg, folder in folders.items():
        for path in folder.rglob("*"):
            inner = path.relative_to(folder).parts
            if any(
                (folder.joinpath(*inner[:i]) / "__init__.py").exists()
                or folder.joinpath(*inner[:i]).is_symlink()
                for i in range(1, len(inner))
            ):
                continue  # a subpackage's own file (its folder has its own entry)
            if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in inner:
                want(pkg, path)
    return wanted


def test_every_package_data_file_is_installed(installed: Installed) -> None:
    wanted = package_data_in_checkout()
    got = installed.probe["data"]
    assert {"vhostmem/py.typed", "vhostmem/protocol/py.typed"} <= wanted.keys()
    missing = sorted(wanted.keys() - got.keys())
    assert not missing, (
        f"the installed wheel lacks {missing}: add them to [tool.setuptools.package-data] in "
        "pyproject.toml"
    )
    assert sorted(got.keys() - wanted.keys()) == []
    for name, source in wanted.items():
        assert got[name] == hashlib.sha256(source.read_bytes()).hexdigest(), name
