"""tools/test runs the lint gate (tools/lint: ruff format --check, ruff check, mypy --strict)
after tools/setup-host and before pytest; a finding fails the run with the tool's output and
pytest never starts.

The real tools/test and tools/lint run in a copy of their layout in a tmp directory, on a small
package of their own: tools/setup-host there is a stub (the real one would install), and
``python3`` on PATH records each call, answers ``-m pytest`` itself and runs everything else in
this interpreter, so ruff and mypy are the installed ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PYPROJECT = """\
[tool.ruff]
line-length = 100
target-version = "py311"

[tool.ruff.lint]
select = ["E", "F", "W", "I"]

[tool.mypy]
strict = true
python_version = "3.11"
files = ["pkg"]
"""
CLEAN = '''"""A module every check passes."""

from __future__ import annotations


def double(x: int) -> int:
    return 2 * x
'''
STUB_SETUP_HOST = """#!/usr/bin/env bash
echo "setup-host $*" >> "$STUB_LOG"
"""
STUB_PYTHON = """#!/usr/bin/env bash
echo "python3 $*" >> "$STUB_LOG"
if [ "${1:-}" = -m ] && [ "${2:-}" = pytest ]; then exit 0; fi
exec @PYTHON@ "$@"
"""


@dataclass
class Checkout:
    root: Path
    log: Path
    env: dict[str, str]

    def calls(self) -> list[str]:
        """The commands run, by their first words: setup-host, python3 -m ruff format, ..."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [" ".join(line.split()[:4]) for line in lines]

    def test(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.root / "tools" / "test"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=self.root,
        )
        print(f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}--- calls\n{self.calls()}")
        return proc


@pytest.fixture
def checkout(tmp_path: Path) -> Checkout:
    root = tmp_path / "repo"
    (root / "tools").mkdir(parents=True)
    (root / "pkg").mkdir()
    for name in ("test", "lint"):
        shutil.copy2(ROOT / "tools" / name, root / "tools" / name)
    setup = root / "tools" / "setup-host"
    setup.write_text(STUB_SETUP_HOST)
    setup.chmod(0o755)
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "pkg" / "__init__.py").write_text(CLEAN)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    python.write_text(STUB_PYTHON.replace("@PYTHON@", sys.executable))
    python.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "STUB_LOG": str(log),
        "MYPY_CACHE_DIR": str(tmp_path / "mypy-cache"),
        "RUFF_CACHE_DIR": str(tmp_path / "ruff-cache"),
    }
    env.pop("PYTHON", None)
    return Checkout(root, log, env)


LINT = ["python3 -m ruff format", "python3 -m ruff check", "python3 -m mypy --strict"]


def test_lint_runs_after_setup_and_before_pytest_which_gets_the_arguments(
    checkout: Checkout,
) -> None:
    proc = checkout.test("-m", "not qemu")
    assert proc.returncode == 0
    assert checkout.calls() == ["setup-host", *LINT, "python3 -m pytest -m"]
    assert checkout.log.read_text().splitlines()[-1] == "python3 -m pytest -m not qemu"
    assert "lint: ok" in proc.stdout


@pytest.mark.parametrize(
    "source,tool,output",
    [
        (CLEAN.replace("annotations\n", "annotations\n\nimport os\n"), "ruff check", "F401"),
        (CLEAN.replace("2 * x", "2*x"), "ruff format --check", "-     return 2*x"),
        (CLEAN.replace("return 2 * x", 'return "2"'), "mypy --strict", "[return-value]"),
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_a_finding_fails_the_run_with_the_tools_output_and_pytest_never_starts(
    checkout: Checkout, source: str, tool: str, output: str
) -> None:
    (checkout.root / "pkg" / "__init__.py").write_text(source)
    proc = checkout.test("-m", "not qemu")
    assert proc.returncode == 1
    assert output in proc.stdout + proc.stderr
    assert f"lint: FAILED: {tool} (findings above)" in proc.stderr
    # Every check ran (all findings at once), and pytest did not.
    assert checkout.calls() == ["setup-host", *LINT]
