"""The scripts under tools/ loaded as modules, so that tests can call their functions."""

from __future__ import annotations

import sys
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path
from types import ModuleType

import pytest

TOOLS = Path(__file__).resolve().parents[3] / "tools"


def load_tool(name: str, monkeypatch: pytest.MonkeyPatch | None = None) -> ModuleType:
    """``tools/NAME`` as a module (named NAME, ``-`` read as ``_``).

    With ``monkeypatch``, what loading it changes is undone after the test: ``sys.path`` (the
    scripts put their checkout first) and ``sys.modules``, where the module sits while it runs
    (dataclasses look their module up there while a class is made).
    """
    module_name = name.replace("-", "_")
    loader = SourceFileLoader(module_name, str(TOOLS / name))
    spec = spec_from_loader(module_name, loader)
    assert spec is not None
    module = module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.setattr(sys, "path", list(sys.path))
        monkeypatch.setitem(sys.modules, module_name, module)
    loader.exec_module(module)
    return module
