"""A model of QEMU's side: which vhost-user regions a memory map gives, and which messages follow.

Theory of operation
-------------------
QEMU's vhost memory listener sees the guest's flat memory view as *sections*, in GPA order: a
piece of a RAM memory region mapped at some guest address (an alias such as virtio-mem's
``memslot-3`` shows up as a section of the memory region it points into). For every commit,
``vhost_region_add_section`` (qemu/qemu:hw/virtio/vhost.c) folds the sections into the region
list it sends, merging a section into the previous one when both belong to the same memory region
and are contiguous in QEMU's address space, unless either is marked *unmergeable* (QEMU 8.2,
commit 533f5d6679). :func:`vhost_regions` mirrors that, with a switch for QEMU before 8.2.

``scrub_shadow_regions`` and ``vhost_user_add_remove_regions`` (hw/virtio/vhost-user.c) then
compare the new list with the *shadow* of what the back-end already has, on (gpa, uaddr, size),
and send REM_MEM_REG for what went (last inserted first) and ADD_MEM_REG for what came (in GPA
order). :func:`message_sequence` mirrors that; :func:`shadow_after` gives the shadow afterwards.

What is not modelled: ``vhost_section`` filtering (ROM, fd-less RAM, dirty-logging sections are
expected to be left out by the caller), postcopy, SET_MEM_TABLE (no CONFIGURE_MEM_SLOTS), and
``vhost_commit`` sending nothing while the device is stopped.

:func:`explain` runs a list of virtio-mem plug states through both QEMU variants and the
atomicity history (:mod:`vhostmem.atomicity`); it backs ``vhostmem-ctl explain``.

Pure: integers in, integers out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, final

from vhostmem.atomicity import ADD_MEM_REG, REM_MEM_REG, History

__all__ = [
    "DEFAULT_BOOT_RAM",
    "ModelRegion",
    "Section",
    "explain",
    "message_sequence",
    "shadow_after",
    "vhost_regions",
    "virtio_mem_layout",
]

GiB: Final = 1 << 30
MiB: Final = 1 << 20

# The virtio-mem device of the recorded QEMU 10.0.2 run
# (tests/vectors/qemu-10.0.2-virtio-mem-memslots.jsonl): explain's defaults.
_TRACE_VMEM_GPA: Final = 0x100000000
_TRACE_VMEM_SIZE: Final = 4 * GiB
_TRACE_VMEM_HOST: Final = 0x7F2113FFE000


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@final
@dataclass(frozen=True, slots=True)
class Section:
    """One section of QEMU's flat memory view (``MemoryRegionSection``), RAM backed by an fd.

    Attributes:
        gpa: guest physical address of the first byte (``offset_within_address_space``).
        size: length in bytes.
        mr: the RAM memory region's name (for an alias, the region it points into, e.g. "mem2").
        offset_in_mr: offset of the first byte in that region (``offset_within_region``).
        host_addr: QEMU's virtual address of the first byte
            (``memory_region_get_ram_ptr(mr) + offset_within_region``).
        page_size: the RAMBlock's page size (``qemu_ram_pagesize``).
        unmergeable: ``MemoryRegionSection.unmergeable`` (QEMU 8.2, memory-device aliases).
        fd_offset: the RAMBlock's offset in its file (``ram_block->fd_offset``).
    """

    gpa: int
    size: int
    mr: str
    offset_in_mr: int
    host_addr: int
    page_size: int = 4096
    unmergeable: bool = False
    fd_offset: int = 0

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"section of {self.mr!r} at gpa 0x{self.gpa:x} has size {self.size}")
        if not _is_power_of_two(self.page_size):
            raise ValueError(f"section of {self.mr!r}: page size {self.page_size} is no power of 2")

    @property
    def ram_base(self) -> int:
        """QEMU's address of the memory region's first byte."""
        return self.host_addr - self.offset_in_mr


#: The recorded run's boot RAM: a 512 MiB memfd at gpa 0.
DEFAULT_BOOT_RAM: Final = Section(
    gpa=0, size=512 * MiB, mr="mem0", offset_in_mr=0, host_addr=0x7F2213FFF000
)


@final
@dataclass(frozen=True, slots=True)
class ModelRegion:
    """One entry of QEMU's vhost region list (``struct vhost_memory_region`` + what ADD sends).

    Attributes:
        gpa: ``guest_phys_addr``.
        size: ``memory_size``.
        uaddr: ``userspace_addr``.
        mmap_offset: what ADD_MEM_REG sends: offset in the RAMBlock plus its ``fd_offset``
            (``vhost_user_get_mr_data``).
        mr: the memory region's name.
    """

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int
    mr: str

    @property
    def gpa_end(self) -> int:
        """One past the last guest physical address."""
        return self.gpa + self.size

    @property
    def key(self) -> tuple[int, int, int]:
        """What QEMU's ``reg_equal`` compares: (gpa, uaddr, size), never the offset."""
        return (self.gpa, self.uaddr, self.size)

    def wire(self, kind: str) -> dict[str, int]:
        """The region fields as QEMU puts them in the message.

        Args:
            kind: ``"add"`` or ``"rem"``; REM_MEM_REG carries mmap_offset 0
                (``vhost_user_fill_msg_region(&region_buffer, shadow_reg, 0)``).

        Returns:
            ``{"gpa", "size", "uaddr", "mmap_offset"}``.
        """
        return {
            "gpa": self.gpa,
            "size": self.size,
            "uaddr": self.uaddr,
            "mmap_offset": self.mmap_offset if kind == "add" else 0,
        }


@dataclass(slots=True)
class _Pending:
    """A ``dev->tmp_sections`` entry while sections are folded (mutable: merges widen it)."""

    gpa: int
    size: int
    host: int
    section: Section


def vhost_regions(
    sections: Iterable[Section], *, unmergeable_supported: bool = True
) -> list[ModelRegion]:
    """The region list a vhost-user device gets for a flat view, as QEMU builds it.

    Mirrors hw/virtio/vhost.c ``vhost_region_add_section`` for ``VHOST_BACKEND_TYPE_USER``:
    the section is rounded to its RAMBlock's page size (start down, size up) and the rounded
    numbers decide whether it extends the previous entry; an entry that is not merged is stored
    unrounded. Merging needs the same memory region, ``prev host start + (gpa - prev gpa) ==
    host start``, and neither side unmergeable.

    Args:
        sections: the flat view's RAM sections (sorted by GPA here, as the flat view is).
        unmergeable_supported: ``False`` ignores the unmergeable flag, as QEMU before 8.2 (commit
            533f5d6679) did.

    Returns:
        The regions in GPA order (``dev->mem`` order).

    Raises:
        ValueError: QEMU's own two errors ("Section '%s' rounded to %x prior to previous '%s'
            %x", "Overlapping but not coherent sections at %x"), or one memory region given two
            different host bases.
    """
    pending: list[_Pending] = []
    bases: dict[str, int] = {}
    for sec in sorted(sections, key=lambda s: s.gpa):
        if bases.setdefault(sec.mr, sec.ram_base) != sec.ram_base:
            raise ValueError(
                f"memory region {sec.mr!r}: section at gpa 0x{sec.gpa:x} puts its first byte at "
                f"0x{sec.ram_base:x}, another section at 0x{bases[sec.mr]:x}"
            )
        gpa, size, host = sec.gpa, sec.size, sec.host_addr
        # Round to the page size; vhost-user back-ends mmap whole (huge) pages (c1ece84e7c).
        alignage = host & (sec.page_size - 1)
        host, size, gpa = host - alignage, size + alignage, gpa - alignage
        if size & (sec.page_size - 1):
            size += sec.page_size - (size & (sec.page_size - 1))
        unmergeable = sec.unmergeable and unmergeable_supported
        if pending and not unmergeable:
            prev = pending[-1]
            prev_unmergeable = prev.section.unmergeable and unmergeable_supported
            if gpa <= prev.gpa + prev.size:  # overlapping or adjoining after rounding
                if gpa < prev.gpa:
                    raise ValueError(
                        f"Section '{sec.mr}' rounded to {gpa:x} prior to previous "
                        f"'{prev.section.mr}' {prev.gpa:x}"
                    )
                if (
                    prev.host + (gpa - prev.gpa) == host
                    and sec.mr == prev.section.mr
                    and not prev_unmergeable
                ):
                    # QEMU takes MAX(prev_host_end, host + size) with an inclusive prev end;
                    # both ends are exclusive here. They differ only for a section lying wholly
                    # inside the previous one, which a flat view does not produce.
                    end = max(prev.host + prev.size, host + size)
                    start = min(prev.host, host)
                    prev.gpa, prev.host, prev.size = min(prev.gpa, gpa), start, end - start
                    continue
                if gpa != prev.gpa + prev.size:
                    raise ValueError(f"Overlapping but not coherent sections at {gpa:x}")
        pending.append(_Pending(sec.gpa, sec.size, sec.host_addr, sec))
    return [
        ModelRegion(
            gpa=p.gpa,
            size=p.size,
            uaddr=p.host,
            mmap_offset=p.host - p.section.ram_base + p.section.fd_offset,
            mr=p.section.mr,
        )
        for p in pending
    ]


def message_sequence(
    before: Sequence[ModelRegion], after: Sequence[ModelRegion]
) -> list[tuple[str, ModelRegion]]:
    """The ADD/REM_MEM_REG messages QEMU sends to go from ``before`` to ``after``.

    Mirrors hw/virtio/vhost-user.c ``scrub_shadow_regions`` (equality is ``reg_equal``: gpa,
    userspace_addr and memory_size) and ``vhost_user_add_remove_regions``: all removes first,
    walked backwards through the shadow (``send_remove_regions``), then all adds in ``dev->mem``
    order (``send_add_regions``).

    Args:
        before: QEMU's shadow table, in its insertion order (see :func:`shadow_after`).
        after: the new region list (:func:`vhost_regions`, GPA order).

    Returns:
        ``("rem", region)`` then ``("add", region)`` pairs, in sending order; a REM carries the
        shadow entry (send it with :meth:`ModelRegion.wire`, which zeroes its mmap_offset).
    """
    new_keys = {r.key for r in after}
    old_keys = {r.key for r in before}
    removes = [r for r in before if r.key not in new_keys]
    adds = [r for r in after if r.key not in old_keys]
    return [("rem", r) for r in reversed(removes)] + [("add", r) for r in adds]


def shadow_after(before: Sequence[ModelRegion], after: Sequence[ModelRegion]) -> list[ModelRegion]:
    """QEMU's shadow table once :func:`message_sequence` has been sent and acked.

    Removed entries are memmoved out (order kept) and added ones appended, so the shadow stays in
    insertion order, which is why removals arrive last-plugged first.

    Args:
        before: the shadow before.
        after: the new region list.

    Returns:
        The shadow after.
    """
    new_keys = {r.key for r in after}
    old_keys = {r.key for r in before}
    return [r for r in before if r.key in new_keys] + [r for r in after if r.key not in old_keys]


def virtio_mem_layout(
    *,
    base_gpa: int,
    region_size: int,
    memslot_size: int,
    host_base: int,
    plugged_memslots: Iterable[int],
    mr: str = "vmem0",
    unmergeable: bool = True,
    page_size: int = 4096,
    fd_offset: int = 0,
) -> list[Section]:
    """The sections of a virtio-mem device with ``dynamic-memslots=on``.

    Mirrors hw/virtio/virtio-mem.c ``virtio_mem_prepare_memslots``: alias ``memslot-i`` maps
    ``[i * memslot_size, +memslot_size)`` of the memory backend (the last one may be shorter) at
    ``base_gpa + i * memslot_size`` and is marked unmergeable; only active memslots are mapped.

    Args:
        base_gpa: the device's ``memaddr``.
        region_size: the memory backend's size.
        memslot_size: the size of one memslot (1 GiB at least in QEMU).
        host_base: QEMU's address of the backend's first byte.
        plugged_memslots: indices of the active memslots.
        mr: the memory backend's memory region name.
        unmergeable: the aliases' flag (QEMU 8.2 always sets it).
        page_size: the backend's page size.
        fd_offset: the RAMBlock's offset in its file.

    Returns:
        One section per active memslot, in GPA order.

    Raises:
        ValueError: a memslot index outside the device.
    """
    count = -(-region_size // memslot_size)
    out: list[Section] = []
    for i in sorted(set(plugged_memslots)):
        if not 0 <= i < count:
            raise ValueError(f"memslot {i} is outside the device's {count} memslots")
        offset = i * memslot_size
        out.append(
            Section(
                gpa=base_gpa + offset,
                size=min(memslot_size, region_size - offset),
                mr=mr,
                offset_in_mr=offset,
                host_addr=host_base + offset,
                page_size=page_size,
                unmergeable=unmergeable,
                fd_offset=fd_offset,
            )
        )
    return out


#: The two QEMU behaviours ``explain`` compares: (name, unmergeable_supported, title).
_VARIANTS: Final = (
    ("8.2+", True, "QEMU >= 8.2 (memslots unmergeable)"),
    ("pre-8.2", False, "QEMU < 8.2 (memslots merged)"),
)


def explain(
    steps: Sequence[Iterable[int]],
    *,
    boot_ram: Section | None = DEFAULT_BOOT_RAM,
    base_gpa: int = _TRACE_VMEM_GPA,
    region_size: int = _TRACE_VMEM_SIZE,
    memslot_size: int = GiB,
    host_base: int = _TRACE_VMEM_HOST,
    mr: str = "vmem0",
    page_size: int = 4096,
) -> dict[str, Any]:
    """What QEMU sends for a sequence of virtio-mem plug states, with and without unmergeable.

    Step 0 is the device start (boot RAM, no memslot: the first ADDs from ``vhost_dev_start``);
    each given step is the set of active memslots after one commit. Each step's messages run
    through :class:`~vhostmem.atomicity.History` as one batch, so non-atomic messages carry the
    violation exactly as a live run would report it.

    Args:
        steps: active memslot indices after each commit.
        boot_ram: the boot RAM section, or ``None``. Defaults to the recorded QEMU 10.0.2 run.
        base_gpa: the virtio-mem device's ``memaddr``.
        region_size: its memory backend's size.
        memslot_size: the memslot size.
        host_base: QEMU's address of the backend's first byte.
        mr: the backend's memory region name.
        page_size: the backend's page size.

    Returns:
        ``{"version": 1, "layout", "variants", "steps", "totals"}``; each step has, per variant
        name, the regions after it and the messages (request, region fields as on the wire,
        classification, violation or ``None``).
    """
    plans: list[tuple[str, list[int]]] = [("start", [])]
    plans += [(f"step {n}", sorted(set(s))) for n, s in enumerate(steps, 1)]
    step_docs: list[dict[str, Any]] = [
        {"step": n, "label": label, "plugged": plugged, "variants": {}}
        for n, (label, plugged) in enumerate(plans)
    ]
    totals: dict[str, dict[str, int]] = {}
    for name, supported, _title in _VARIANTS:
        history = History()
        shadow: list[ModelRegion] = []
        total = {"messages": 0, "violations": 0}
        for n, (_label, plugged) in enumerate(plans):
            sections = virtio_mem_layout(
                base_gpa=base_gpa,
                region_size=region_size,
                memslot_size=memslot_size,
                host_base=host_base,
                plugged_memslots=plugged,
                mr=mr,
                page_size=page_size,
            )
            if boot_ram is not None:
                sections.insert(0, boot_ram)
            regions = vhost_regions(sections, unmergeable_supported=supported)
            messages = []
            # Steps a second apart, messages of one step at the same instant: one batch each.
            when = float(n)
            for kind, region in message_sequence(shadow, regions):
                rec = history.record(
                    socket="model",
                    conn=0,
                    request=ADD_MEM_REG if kind == "add" else REM_MEM_REG,
                    ok=True,
                    removed=[region] if kind == "rem" else [],
                    added=[region] if kind == "add" else [],
                    arrived=when,
                    replied=when,
                    peer="qemu-system-x86_64",  # a model of QEMU: explanations speak of QEMU
                )
                violation = rec.violation
                messages.append(
                    {
                        "request": rec.request,
                        **region.wire(kind),
                        "mr": region.mr,
                        "classification": rec.classification,
                        "violation": violation.as_json() if violation else None,
                    }
                )
            shadow = shadow_after(shadow, regions)
            total["messages"] += len(messages)
            total["violations"] += sum(1 for m in messages if m["violation"])
            step_docs[n]["variants"][name] = {
                "regions": [{**r.wire("add"), "mr": r.mr} for r in regions],
                "messages": messages,
            }
        totals[name] = total
    return {
        "version": 1,
        "layout": {
            "boot_ram": None
            if boot_ram is None
            else {"gpa": boot_ram.gpa, "size": boot_ram.size, "mr": boot_ram.mr},
            "virtio_mem": {
                "base_gpa": base_gpa,
                "region_size": region_size,
                "memslot_size": memslot_size,
                "memslots": -(-region_size // memslot_size),
                "host_base": host_base,
                "mr": mr,
            },
        },
        "variants": [{"name": n, "unmergeable": s, "title": t} for n, s, t in _VARIANTS],
        "steps": step_docs,
        "totals": totals,
    }
