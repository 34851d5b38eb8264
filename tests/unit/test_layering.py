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
    {"vhostmem.atomicity", "vhostmem.qemu_model", "vhostmem.session", "vhostmem.virtqueue",
     "vhostmem.journal"},
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
        "vhostmem.atomicity", "vhostmem.qemu_model", "vhostmem.faults", "vhostmem.virtqueue",
        "vhostmem.journal"}


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


def is_module(name: str) -> bool:
    """``name`` is a module or package of this checkout."""
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def resolve_relative(importer: str, is_package: bool, level: int, module: str | None,
                     names: list[str]) -> set[str]:
    """The absolute modules ``from <level dots><module> import <names>`` in ``importer`` means.

    ``from . import x`` imports the submodule ``x`` when there is one, else a name of the
    package itself.
    """
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    if level - 1 >= len(package):
        raise AssertionError(f"{importer}: relative import beyond the top-level package")
    base = package[: len(package) - (level - 1)]
    target = ".".join([*base, module] if module else base)
    subs = {f"{target}.{n}" for n in names if n != "*" and is_module(f"{target}.{n}")}
    return subs if subs and len(subs) == len(names) else {target} | subs


def imports_of(source: str, me: str, is_package: bool, filename: str = "<source>") -> set[str]:
    """Absolute names of the modules ``source`` (module ``me``) imports at run time."""
    tree = ast.parse(source, filename)
    skip = _type_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            assert node.module is not None  # "from import x" is not Python
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom):
            found |= resolve_relative(me, is_package, node.level, node.module,
                                      [alias.name for alias in node.names])
    return found


def imports(path: Path) -> set[str]:
    return imports_of(path.read_text(), module_name(path), path.name == "__init__.py", str(path))


def check_imports(me: str, targets: set[str]) -> None:
    """Every import of ``me`` points down (or sideways), and the pure core stays pure."""
    my_layer = layer_of(me)
    for target in targets:
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


SOURCES = sorted(p for pkg in ("protocol", "vhostmem") for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_point_down(path: Path) -> None:
    check_imports(module_name(path), imports(path))


def test_relative_imports_are_resolved() -> None:
    # the package's own module and submodules, one and two levels up
    assert resolve_relative("vhostmem.server", False, 1, "errors", ["MappingError"]) == {
        "vhostmem.errors"}
    assert resolve_relative("vhostmem.server", False, 1, None, ["session"]) == {
        "vhostmem.session"}
    assert resolve_relative("vhostmem.testing.plugin", False, 2, "server", ["run"]) == {
        "vhostmem.server"}
    assert resolve_relative("vhostmem.testing", True, 1, "backend", ["start_backend"]) == {
        "vhostmem.testing.backend"}
    assert resolve_relative("vhostmem", True, 1, None, ["__version__"]) == {"vhostmem"}
    with pytest.raises(AssertionError, match="beyond the top-level package"):
        resolve_relative("protocol.codec", False, 2, None, ["x"])


def test_a_relative_import_that_points_up_is_caught() -> None:
    source = "from .server import run\nfrom . import errors\n"
    found = imports_of(source, "vhostmem.regions", is_package=False)
    assert found == {"vhostmem.server", "vhostmem.errors"}
    with pytest.raises(AssertionError, match=r"vhostmem.regions \(layer 2\) imports vhostmem.server"):
        check_imports("vhostmem.regions", found)
    check_imports("vhostmem.regions", imports_of("from . import errors\n", "vhostmem.regions",
                                                 is_package=False))
