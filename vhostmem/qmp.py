"""What QEMU itself says about guest memory, over QMP (short connections, through qemu.qmp).

Used by ``vhostmem-ctl ... --qmp SOCKET`` to learn the unmergeable markers QEMU does not expose
directly (each virtio-mem ``memslot-N`` alias and each memory device's range) and to compare
vhostmem's table with QEMU's own view; the test harness uses the same parsers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, final

from qemu.qmp.legacy import QEMUMonitorProtocol

from vhostmem.qemu_model import ModelRegion, Section, vhost_regions
from vhostmem.regions import UnmergeableRange

__all__ = [
    "BoundedQMP",
    "MemslotAlias",
    "QemuMemory",
    "expected_regions",
    "flat_ram_sections",
    "memslot_aliases",
    "query_memory",
    "unmergeable_markers",
]


class MemslotAlias(NamedTuple):
    """One `alias memslot-N @memdev ...` line of `info mtree` (virtio-mem dynamic memslots)."""

    #: First guest physical address of the memslot.
    gpa_start: int
    #: One past the last guest physical address (QEMU prints the inclusive end; this is +1).
    gpa_end: int
    #: "memslot-N".
    name: str
    #: The backend's memory region name, e.g. "vmem0".
    memdev: str
    #: Offset of the memslot inside the backend (and so inside its memfd).
    offset: int

    @property
    def size(self) -> int:
        return self.gpa_end - self.gpa_start


# `  0000000100000000-000000013fffffff (prio 0, ram): alias memslot-0 @vmem0 0000000000000000-...`
_ALIAS_RE: Final = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, [^)]*\): "
    r"alias (memslot-\d+) @(\S+) ([0-9a-f]+)-[0-9a-f]+"
)


def memslot_aliases(mtree_text: str) -> list[MemslotAlias]:
    """Parses the virtio-mem memslot aliases out of HMP `info mtree` output, sorted by GPA.

    QEMU prints one tree per distinct root, each headed by the names of the address spaces that
    share it; the same memslot appears in several (memory, device-memory, CPU address spaces).
    Only the `address-space: device-memory` tree is read (QEMU 10 prints it), falling back to
    `address-space: memory` for QEMU versions without it, so each memslot is counted once.
    """
    trees: dict[str, list[MemslotAlias]] = {}
    heads: list[str] = []
    in_tree = False
    for line in mtree_text.splitlines():
        if line.startswith("address-space: "):
            if in_tree:  # a header after a tree starts a new group of names
                heads, in_tree = [], False
            heads.append(line.removeprefix("address-space: ").strip())
            continue
        if line.startswith("memory-region: "):  # the alias-target section: not an address space
            heads, in_tree = [], False
            continue
        if not line.strip():
            continue
        in_tree = True
        m = _ALIAS_RE.match(line)
        if m:
            alias = MemslotAlias(
                int(m.group(1), 16),
                int(m.group(2), 16) + 1,
                m.group(3),
                m.group(4),
                int(m.group(5), 16),
            )
            for head in heads:
                trees.setdefault(head, []).append(alias)
    found = trees.get("device-memory") or trees.get("memory") or []
    return sorted(set(found))


class BoundedQMP(QEMUMonitorProtocol):
    """QEMUMonitorProtocol whose connect has a deadline.

    legacy.connect() waits for QEMU's greeting without one, and QEMU sends no greeting while
    its main loop is blocked (e.g. in a vhost-user handshake with a back-end that went quiet).
    """

    def connect_within(self, timeout: float) -> None:
        self._qmp.await_greeting = True
        self._qmp.negotiate = True
        self._sync(self._qmp.connect(self._address), timeout)


@final
@dataclass(frozen=True, slots=True)
class QemuMemory:
    """QEMU's view of memory devices at one moment.

    Attributes:
        devices: QMP ``query-memory-devices`` (virtio-mem: ``memaddr``, ``size``,
            ``max-size``; DIMMs: ``addr``, ``size``).
        memslots: the virtio-mem memslot aliases mapped now (HMP ``info mtree``).
        mtree: the raw ``info mtree`` text.
    """

    devices: tuple[dict[str, Any], ...]
    memslots: tuple[MemslotAlias, ...]
    mtree: str
    flat: str = ""
    backends: tuple[str, ...] = ()


def query_memory(path: str, timeout: float = 10.0) -> QemuMemory:
    """Connect to QEMU's QMP socket, read its memory devices and memory tree, disconnect.

    Raises:
        OSError, qemu.qmp.QMPError: QEMU cannot be reached or answered an error.
    """
    qmp = BoundedQMP(path)
    try:
        qmp.connect_within(timeout)
        devices = qmp.cmd("query-memory-devices")
        mtree = qmp.cmd("human-monitor-command", **{"command-line": "info mtree"})
        flat = qmp.cmd("human-monitor-command", **{"command-line": "info mtree -f"})
        objects = qmp.cmd("qom-list", path="/objects")
    finally:
        qmp.close()
    assert isinstance(devices, list) and isinstance(mtree, str) and isinstance(flat, str)
    assert isinstance(objects, list)
    backends = tuple(
        o["name"] for o in objects if str(o.get("type", "")).startswith("child<memory-backend-")
    )
    return QemuMemory(tuple(devices), tuple(memslot_aliases(mtree)), mtree, flat, backends)


# `  0000000000100000-000000001fffffff (prio 0, ram): mem0 @0000000000100000`
_FLAT_RE: Final = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, (ram|rom)\): (\S+)(?: @([0-9a-f]+))?"
)


def flat_ram_sections(view: QemuMemory) -> list[Section]:
    """The sections of the ``memory`` address space's flat view that a vhost-user back-end gets.

    hw/virtio/vhost.c ``vhost_section`` keeps RAM that is not a ROM region and, for vhost-user,
    has an fd: here, sections of a memory backend object (``memory-backend-*``: only those can
    be shared). Read-only views of backend RAM (q35's PAM aliases, shown as ``rom``) count, as
    their region is the backend's RAM. Sections inside a virtio-mem memslot are unmergeable
    (QEMU 8.2 marks the memslot aliases so).
    """
    lines = view.flat.splitlines()
    sections: list[Section] = []
    in_memory = False
    for line in lines:
        if line.startswith("FlatView"):
            in_memory = False
            continue
        if line.startswith(' AS "'):
            in_memory = in_memory or line.startswith(' AS "memory"')
            continue
        if not in_memory:
            continue
        m = _FLAT_RE.match(line)
        if m is None or m.group(4) not in view.backends:
            continue
        start, end = int(m.group(1), 16), int(m.group(2), 16) + 1
        offset = int(m.group(5), 16) if m.group(5) else 0
        slot = any(a.gpa_start <= start < a.gpa_end for a in view.memslots)
        sections.append(
            Section(
                gpa=start,
                size=end - start,
                mr=m.group(4),
                offset_in_mr=offset,
                # QEMU's addresses are not shown; within one region they are base + offset,
                # which is all the merge rule needs.
                host_addr=offset,
                unmergeable=slot,
            )
        )
    return sections


def expected_regions(view: QemuMemory) -> list[ModelRegion]:
    """What QEMU should have sent: its flat view through the model of its vhost merging."""
    return vhost_regions(flat_ram_sections(view))


def unmergeable_markers(view: QemuMemory) -> list[UnmergeableRange]:
    """The ranges QEMU marks unmergeable, inferred from what QMP shows.

    QEMU does not report the flag (``MemoryRegion.unmergeable``, commit 533f5d6679); it sets it on
    every virtio-mem memslot alias (hw/virtio/virtio-mem.c ``virtio_mem_prepare_memslots``), and a
    memory device's own range never merges with its neighbours (a separate RAM block).
    """
    markers = [
        UnmergeableRange(alias.gpa_start, alias.gpa_end, f"qmp:{alias.name}@{alias.memdev}")
        for alias in view.memslots
    ]
    for device in view.devices:
        data = device.get("data", {})
        start = data.get("memaddr", data.get("addr"))
        size = data.get("max-size", data.get("size"))
        if isinstance(start, int) and isinstance(size, int) and size:
            name = data.get("id") or device.get("type", "device")
            source = f"qmp:{device.get('type')}:{name}"
            markers.append(UnmergeableRange(start, start + size, source))
    return markers
