"""tools/run-guest's command line: --migrate and what it needs."""

from __future__ import annotations

from types import ModuleType

import pytest

from .helpers.tools import load_tool


def load_run_guest(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_tool("run-guest", monkeypatch)


def test_migrate_with_start_vhostmem_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    run_guest = load_run_guest(monkeypatch)
    args = run_guest.parse_args(["--start-vhostmem", "--plug", "3G", "--migrate"])
    assert args.migrate and args.start_vhostmem and args.plug == "3G"
    assert not run_guest.parse_args(["--start-vhostmem"]).migrate


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--migrate"], "--migrate needs --start-vhostmem"),
        (
            ["--start-vhostmem", "--migrate", "--hot-add-dimm", "1G"],
            "--migrate does not go with --hot-add-dimm",
        ),
    ],
)
def test_migrate_refuses_what_it_cannot_pair(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    run_guest = load_run_guest(monkeypatch)
    with pytest.raises(SystemExit) as caught:
        run_guest.parse_args(argv)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err
