"""Imports point downward only (HACKING.md): checked by walking every module's imports.

The way trio's ``_tests/test_exports.py`` turns API rules into a test: read the source with
``ast`` rather than importing, so a forbidden import inside a function is caught too.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Layers from the bottom up; a module may import modules of its own layer or below.
LAYERS: list[set[str]] = [
    {"vhostmem.protocol"},
    {"vhostmem.errors", "vhostmem.receive_buffer"},
    {"vhostmem.regions", "vhostmem.events"},
    {"vhostmem.faults"},
    {
        "vhostmem.atomicity",
        "vhostmem.qemu_model",
        "vhostmem.session",
        "vhostmem.device",
        "vhostmem.virtqueue",
        "vhostmem.qemu_trace",
        "vhostmem.journal",
    },
    {
        "vhostmem.mapping",
        "vhostmem.transport",
        "vhostmem.report",
        "vhostmem.sockets",
        "vhostmem.datapath",
        "vhostmem.tap",
        "vhostmem.tracefile",
        "vhostmem.timeline",
    },
    {"vhostmem.booking"},
    {"vhostmem.control", "vhostmem.qmp"},
    {"vhostmem.server"},
    {"vhostmem.cli", "vhostmem.ctl", "vhostmem.__main__"},
    {"vhostmem.testing"},
]

#: Inside the mapping package (its docstring): a module may import modules of a layer below its
#: own only, so diagnosis and peek, side by side, do not import each other.
MAPPING_LAYERS: list[set[str]] = [
    {"vhostmem.mapping.linux"},
    {"vhostmem.mapping.backing"},
    {"vhostmem.mapping.diagnosis", "vhostmem.mapping.peek"},
    {"vhostmem.mapping.mapper"},
    {"vhostmem.mapping"},
]

#: Who may import the modules that reach mmap, munmap and mincore (HACKING.md: the mapping
#: package is the only one that calls them; ctypes stays in its Linux calls module).
SYSCALL_MODULES: dict[str, tuple[str, ...]] = {
    "mmap": ("vhostmem.mapping.",),
    "ctypes": ("vhostmem.mapping.linux",),
}

#: The pure core may use none of these (STYLE.md section 1).
IMPURE = {"os", "trio", "socket", "mmap", "logging", "ctypes", "time", "subprocess", "signal"}
PURE = {
    "vhostmem.protocol",
    "vhostmem.errors",
    "vhostmem.receive_buffer",
    "vhostmem.events",
    "vhostmem.regions",
    "vhostmem.session",
    "vhostmem.device",
    "vhostmem.atomicity",
    "vhostmem.qemu_model",
    "vhostmem.faults",
    "vhostmem.virtqueue",
    "vhostmem.qemu_trace",
    "vhostmem.journal",
}


#: The checkout's protocol/ folder installs as this package (pyproject.toml, package-dir).
PROTOCOL = "vhostmem.protocol"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "protocol":
        parts[0] = PROTOCOL
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
    if name == PROTOCOL or name.startswith(PROTOCOL + "."):
        name = name.removeprefix("vhostmem.")
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def resolve_relative(
    importer: str, is_package: bool, level: int, module: str | None, names: list[str]
) -> set[str]:
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
            found |= resolve_relative(
                me, is_package, node.level, node.module, [alias.name for alias in node.names]
            )
    return found


def imports(path: Path) -> set[str]:
    return imports_of(path.read_text(), module_name(path), path.name == "__init__.py", str(path))


def check_imports(me: str, targets: set[str]) -> None:
    """Every import of ``me`` points down (or sideways), and the pure core stays pure."""
    my_layer = layer_of(me)
    for target in targets:
        top = target.split(".")[0]
        assert top != "protocol", f"{me} imports {target}: import {PROTOCOL}, not the bare name"
        if top != "vhostmem":
            if any(me == p or me.startswith(p + ".") for p in PURE):
                assert top not in IMPURE, f"{me} is pure but imports {target}"
            continue
        if me == PROTOCOL or me.startswith(PROTOCOL + "."):
            assert target == PROTOCOL or target.startswith(PROTOCOL + "."), (
                f"{PROTOCOL} must not import {target}"
            )
        if target == "vhostmem":
            continue  # the package's own __version__
        assert layer_of(target) <= my_layer, (
            f"{me} (layer {my_layer}) imports {target} (layer {layer_of(target)})"
        )


def check_mapping_imports(me: str, targets: set[str]) -> None:
    """A module of the mapping package imports only modules of the package's lower layers."""
    layer = {name: i for i, names in enumerate(MAPPING_LAYERS) for name in names}
    if me not in layer:
        return
    for target in targets:
        if target.startswith("vhostmem.mapping.") and target != me:
            assert target in layer, f"{target} is in no layer: add it to MAPPING_LAYERS"
            assert layer[target] < layer[me], (
                f"{me} (mapping layer {layer[me]}) imports {target} (mapping layer {layer[target]})"
            )


def check_syscall_imports(me: str, targets: set[str]) -> None:
    """Only the modules SYSCALL_MODULES names import mmap and ctypes."""
    for target in targets:
        allowed = SYSCALL_MODULES.get(target)
        if allowed is not None:
            assert any(me == a or (a.endswith(".") and me.startswith(a)) for a in allowed), (
                f"{me} imports {target}: only {', '.join(allowed)} may"
            )


#: The package's sources, each once: vhostmem/protocol is the symlink to protocol/.
SOURCES = sorted(
    p
    for pkg in ("protocol", "vhostmem")
    for p in (ROOT / pkg).rglob("*.py")
    if ROOT / "vhostmem" / "protocol" not in p.parents
)

#: Python files of the checkout outside the package: tests, tools (by shebang), hugepages.
SCRIPTS = sorted(
    [
        *(p for d in ("tests", "hugepages") for p in (ROOT / d).rglob("*.py")),
        *(
            p
            for p in (ROOT / "tools").iterdir()
            if p.is_file()
            and p.read_bytes().startswith(b"#!")
            and b"python" in p.read_bytes().split(b"\n", 1)[0]
        ),
    ]
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_point_down(path: Path) -> None:
    check_imports(module_name(path), imports(path))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_script_imports_the_bare_protocol_name(path: Path) -> None:
    found = imports_of(path.read_text(), module_name(path), path.name == "__init__.py", str(path))
    bare = sorted(name for name in found if name.split(".")[0] == "protocol")
    assert not bare, f"{path.relative_to(ROOT)} imports {bare}: import {PROTOCOL} instead"


def test_the_checkout_folder_refuses_the_bare_name() -> None:
    # what a checkout's top folder on sys.path would do for ``import protocol``
    spec = importlib.util.spec_from_file_location("protocol", ROOT / "protocol" / "__init__.py")
    assert spec is not None and spec.loader is not None
    with pytest.raises(ImportError, match=r"as 'protocol': import vhostmem\.protocol instead"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_the_package_and_its_symlink_are_one_folder() -> None:
    assert (ROOT / "vhostmem" / "protocol").resolve() == (ROOT / "protocol").resolve()
    assert module_name(ROOT / "protocol" / "codec.py") == "vhostmem.protocol.codec"
    assert is_module("vhostmem.protocol.codec") and not is_module("vhostmem.protocol.nothing")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_only_the_mapping_package_reaches_mmap(path: Path) -> None:
    me, found = module_name(path), imports(path)
    check_syscall_imports(me, found)
    check_mapping_imports(me, found)


def test_every_mapping_module_has_a_layer() -> None:
    modules = {module_name(p) for p in (ROOT / "vhostmem" / "mapping").glob("*.py")}
    assert modules == set().union(*MAPPING_LAYERS)


def test_a_mapping_import_that_points_up_or_sideways_is_caught() -> None:
    with pytest.raises(AssertionError, match=r"linux \(mapping layer 0\) imports .*mapper"):
        check_mapping_imports("vhostmem.mapping.linux", {"vhostmem.mapping.mapper"})
    with pytest.raises(AssertionError, match=r"peek \(mapping layer 2\) imports .*diagnosis"):
        check_mapping_imports("vhostmem.mapping.peek", {"vhostmem.mapping.diagnosis"})
    check_mapping_imports(
        "vhostmem.mapping.mapper",
        {"vhostmem.mapping.peek", "vhostmem.mapping.linux", "vhostmem.errors"},
    )


def test_mmap_outside_the_mapping_package_is_caught() -> None:
    with pytest.raises(AssertionError, match=r"vhostmem\.server imports mmap"):
        check_syscall_imports("vhostmem.server", {"mmap", "trio"})
    with pytest.raises(AssertionError, match=r"vhostmem\.mapping\.mapper imports ctypes"):
        check_syscall_imports("vhostmem.mapping.mapper", {"ctypes"})
    check_syscall_imports("vhostmem.mapping.mapper", {"mmap", "os"})
    check_syscall_imports("vhostmem.mapping.linux", {"mmap", "ctypes"})


def test_relative_imports_are_resolved() -> None:
    # the package's own module and submodules, one and two levels up
    assert resolve_relative("vhostmem.server", False, 1, "errors", ["MappingError"]) == {
        "vhostmem.errors"
    }
    assert resolve_relative("vhostmem.server", False, 1, None, ["session"]) == {"vhostmem.session"}
    assert resolve_relative("vhostmem.testing.plugin", False, 2, "server", ["run"]) == {
        "vhostmem.server"
    }
    assert resolve_relative("vhostmem.testing", True, 1, "backend", ["start_backend"]) == {
        "vhostmem.testing.backend"
    }
    assert resolve_relative("vhostmem", True, 1, None, ["__version__"]) == {"vhostmem"}
    assert resolve_relative("vhostmem.protocol.codec", False, 1, "codes", ["Request"]) == {
        "vhostmem.protocol.codes"
    }
    with pytest.raises(AssertionError, match="beyond the top-level package"):
        resolve_relative("vhostmem.protocol.codec", False, 3, None, ["x"])


def test_a_relative_import_that_points_up_is_caught() -> None:
    source = "from .server import run\nfrom . import errors\n"
    found = imports_of(source, "vhostmem.regions", is_package=False)
    assert found == {"vhostmem.server", "vhostmem.errors"}
    with pytest.raises(
        AssertionError, match=r"vhostmem.regions \(layer 2\) imports vhostmem.server"
    ):
        check_imports("vhostmem.regions", found)
    check_imports(
        "vhostmem.regions",
        imports_of("from . import errors\n", "vhostmem.regions", is_package=False),
    )


def test_protocol_importing_the_rest_of_vhostmem_is_caught() -> None:
    for source in (
        "from vhostmem.errors import VhostMemError\n",
        "from .. import errors\n",
        "from vhostmem import __version__\n",
    ):
        found = imports_of(source, "vhostmem.protocol.codec", is_package=False)
        with pytest.raises(AssertionError, match=r"vhostmem\.protocol must not import vhostmem"):
            check_imports("vhostmem.protocol.codec", found)
    bare = r"imports protocol\.codes: import vhostmem\.protocol, not the bare name"
    with pytest.raises(AssertionError, match=bare):
        check_imports("vhostmem.session", {"protocol.codes"})
    check_imports(
        "vhostmem.protocol.codec",
        imports_of(
            "from . import structs\nfrom vhostmem.protocol.codes import Request\n",
            "vhostmem.protocol.codec",
            is_package=False,
        ),
    )


def type_imports_of(path: Path) -> set[str]:
    """Modules of vhostmem that ``path`` imports only for annotations (``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip and isinstance(node, ast.ImportFrom) and node.level == 0:
            assert node.module is not None
            found.add(node.module)
    return {name for name in found if name.startswith("vhostmem.")}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_annotations_point_down_too(path: Path) -> None:
    # An upward import kept for annotations only is still a circle a reader has to follow (the
    # control socket once named the server's classes): depend on an interface below instead.
    me = module_name(path)
    for target in type_imports_of(path):
        assert layer_of(target) <= layer_of(me), (
            f"{me} (layer {layer_of(me)}) names {target} (layer {layer_of(target)}) for types"
        )


def _top_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    "name", ["tests/unit/helpers/fakes.py", "tests/unit/test_session_table.py"]
)
def test_pure_session_tests_need_no_sockets(name: str) -> None:
    # The sans-IO session is tested as bytes and fds in, events out (h11 tests/test_io.py):
    # the fake host and the table tests reach neither sockets nor trio nor the shell.
    shell = {"socket", "trio", "vhostmem.server", "vhostmem.transport", "vhostmem.mapping"}
    assert _top_imports(ROOT / name) & shell == set()
