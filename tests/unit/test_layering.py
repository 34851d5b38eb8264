"""Imports point downward only (HACKING.md): checked by walking every module's imports.

The way trio's ``_tests/test_exports.py`` turns API rules into a test: read the source with
``ast`` rather than importing, so a forbidden import inside a function is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Layers from the bottom up; a module may import modules of its own layer or below.
LAYERS: list[set[str]] = [
    {"protocol"},
    {"vhostmem.errors"},
    {"vhostmem.regions", "vhostmem.events"},
    {"vhostmem.faults"},
    {"vhostmem.atomicity", "vhostmem.qemu_model", "vhostmem.session", "vhostmem.virtqueue"},
    {"vhostmem.mapping", "vhostmem.transport", "vhostmem.report", "vhostmem.sockets",
     "vhostmem.datapath", "vhostmem.tap"},
    {"vhostmem.control", "vhostmem.qmp"},
    {"vhostmem.server"},
    {"vhostmem.cli", "vhostmem.__main__"},
    {"vhostmem.testing"},
]

#: The pure core may use none of these (STYLE.md section 1).
IMPURE = {"os", "trio", "socket", "mmap", "logging", "ctypes", "time", "subprocess", "signal"}
PURE = {"protocol", "vhostmem.errors", "vhostmem.events", "vhostmem.regions", "vhostmem.session",
        "vhostmem.atomicity", "vhostmem.qemu_model", "vhostmem.faults", "vhostmem.virtqueue"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> int:
    if name == "vhostmem":
        return 0  # the package __init__: only __version__
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if name == prefix or name.startswith(prefix + "."):
                return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def _type_only(tree: ast.Module) -> set[int]:
    """ids of nodes under ``if TYPE_CHECKING:``: annotations, not runtime dependencies."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_only(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


SOURCES = sorted(p for pkg in ("protocol", "vhostmem") for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_point_down(path: Path) -> None:
    me = module_name(path)
    my_layer = layer_of(me)
    for target in imports(path):
        top = target.split(".")[0]
        if top not in ("protocol", "vhostmem"):
            if any(me == p or me.startswith(p + ".") for p in PURE):
                assert top not in IMPURE, f"{me} is pure but imports {target}"
            continue
        if target == "vhostmem":
            continue  # the package's own __version__
        assert layer_of(target) <= my_layer, f"{me} (layer {my_layer}) imports {target} (layer {layer_of(target)})"
        if me.startswith("protocol"):
            assert top == "protocol", f"protocol must not import {target}"
