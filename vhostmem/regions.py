"""The region table: what guest memory the front-end has given us, sorted by guest address.

Theory of operation
-------------------
A :class:`Region` is one entry of the vhost-user memory table as the front-end sent it: guest
physical address (GPA), size, the front-end's own virtual address for it (``uaddr``, QEMU's
``userspace_addr``) and the offset into the file descriptor it came with. The table keeps each
region exactly as received, because REM_MEM_REG names regions exactly as they were added
(libvhost-user ``vu_rem_mem_reg`` matches on gpa + uaddr + size). Merging is only ever a *view*
(:func:`merged_view`), never a change of what is mapped.

Rules the table enforces, each as a :class:`~vhostmem.errors.TableError` with the numbers:

1. No two regions overlap in GPA (libvhost-user panics on it; QEMU never sends it).
2. No two regions overlap in front-end address: a ring address (SET_VRING_ADDR carries front-end
   addresses) must translate to exactly one region.
3. At most ``max_slots`` regions; a slot freed by REM_MEM_REG is free again at once.

Look-ups are ``bisect`` over parallel lists of start addresses, so translation costs O(log n)
and an insert or removal one list move (done in C), which stays flat up to QEMU's 512 slots.

The table is pure: it holds the shell's mapping object as each region's ``handle`` and never
maps, unmaps or closes anything itself. Both are generic over the handle's type, so whoever
reads a handle reads it as the shell's type: ``RegionTable[Mapping]`` in the server,
``RegionTable[int]`` over the unit tests' fake host, ``Region[None]`` for a region that was
never mapped (a model, a scratch table). A reader that never looks at the handle takes
``Region[object]``: ``Region`` is covariant in it, because a handle is set once, when the region
is built, and never replaced.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Generic, TypeVar, final

from vhostmem.errors import TableError

__all__ = [
    "MergedRegion",
    "Region",
    "RegionTable",
    "UnmergeableRange",
    "describe",
    "human_size",
    "merged_view",
]

#: The shell's mapping handle held by a table (vhostmem.mapping.Mapping in the server).
H = TypeVar("H")
#: The same, for :class:`Region`, which only hands its handle out (see the module docstring).
H_co = TypeVar("H_co", covariant=True)

#: Every wire number is a u64 (vhost-user.rst "Memory region description").
U64_LIMIT = 1 << 64


def end_fits_u64(start: int, size: int) -> bool:
    """Whether ``[start, start + size)`` ends inside the u64 space: ``start + size < 2**64``.

    The one wrap rule, for every address space of a region (gpa, uaddr, mmap_offset). The
    exclusive end must itself be a u64: rust-vmm's ``VhostUserMemoryRegion::is_valid``
    (vhost/src/vhost_user/message.rs) refuses a region whose ``checked_add(memory_size)``
    overflows, and libvhost-user computes ``gpa + size`` in a ``uint64_t`` (``vu_gpa_to_va``),
    where an end of exactly 2**64 wraps to 0 and no address would fall inside the region.
    """
    return start + size < U64_LIMIT


def describe(gpa: int, size: int, uaddr: int | None = None, mmap_offset: int | None = None) -> str:
    """Name a region the same way in every message: ``gpa=0x... size=0x... (N MiB) ...``."""
    text = f"gpa=0x{gpa:x} size=0x{size:x} ({human_size(size)})"
    if uaddr is not None:
        text += f" uaddr=0x{uaddr:x}"
    if mmap_offset is not None:
        text += f" mmap_offset=0x{mmap_offset:x}"
    return text


def human_size(size: int) -> str:
    """``512 MiB``, ``1 GiB``, ``1.50 MiB``: a size as people read it in every message."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            value = size / (1 << shift)
            return f"{value:g} {unit}" if value == int(value) else f"{value:.2f} {unit}"
    return f"{size} B"


# Not frozen: one is built per mapped region on the path QEMU waits on, and a frozen dataclass
# costs more per construction (see vhostmem.events). The only assignment after construction is
# the session's to ``unmap_failed``.
@final
@dataclass(slots=True, eq=False)
class Region(Generic[H_co]):
    """One region as the front-end sent it, plus what the shell learned mapping it.

    Attributes:
        gpa: guest physical address of the first byte.
        size: length in bytes.
        uaddr: the front-end's virtual address of the first byte (QEMU ``userspace_addr``).
        mmap_offset: offset of the first byte in the file descriptor that came with it.
        handle: the shell's mapping object (``None`` for a region never mapped).
        file_id: ``(st_dev, st_ino)`` of that file, so an unchanged SET_MEM_TABLE entry can keep
            its mapping; ``None`` when unknown.
        info: what the shell reports about the backing (kind, page size, ...), for people.
        seq: insertion number within the session, for ordering in reports.
        unmap_failed: why the last attempt to unmap the region failed (the diagnosis), while
            it stays mapped; ``None`` otherwise. A region with it set is still in the process's
            address space, so the table keeps it (:attr:`RegionTable.unreleased` when the
            front-end has dropped it already).
    """

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int
    handle: H_co
    file_id: tuple[int, int] | None = None
    info: Mapping[str, Any] = field(default_factory=dict)
    seq: int = 0
    unmap_failed: str | None = None

    @property
    def gpa_end(self) -> int:
        """One past the last guest physical address."""
        return self.gpa + self.size

    @property
    def uaddr_end(self) -> int:
        """One past the last front-end address."""
        return self.uaddr + self.size

    @property
    def key(self) -> tuple[int, int, int]:
        """What REM_MEM_REG matches on: (gpa, uaddr, size)."""
        return (self.gpa, self.uaddr, self.size)

    @property
    def identity(self) -> Identity:
        """What makes a SET_MEM_TABLE entry 'unchanged': numbers and backing file."""
        return identity(self.gpa, self.size, self.uaddr, self.mmap_offset, self.file_id)

    def describe(self) -> str:
        """The region's numbers in the project's one wording."""
        return describe(self.gpa, self.size, self.uaddr, self.mmap_offset)

    def as_json(self) -> dict[str, Any]:
        """The JSON shape of a region (DESIGN.md section 3)."""
        doc: dict[str, Any] = {
            "gpa": self.gpa,
            "size": self.size,
            "uaddr": self.uaddr,
            "mmap_offset": self.mmap_offset,
        }
        doc.update(self.info)
        if self.unmap_failed is not None:
            doc["unmap_failed"] = self.unmap_failed
        return doc


Identity = tuple[int, int, int, int, tuple[int, int] | None]


def identity(
    gpa: int, size: int, uaddr: int, mmap_offset: int, file_id: tuple[int, int] | None
) -> Identity:
    """A region's identity (:attr:`Region.identity`) from its numbers and backing file."""
    return (gpa, size, uaddr, mmap_offset, file_id)


def validate_numbers(gpa: int, size: int, uaddr: int, mmap_offset: int) -> None:
    """Refuse regions that are empty or reach 2**64 in any of their three address spaces
    (:func:`end_fits_u64`)."""
    if size and end_fits_u64(max(gpa, uaddr, mmap_offset), size):
        return  # the common case, in one test; the rest only words the refusal
    if size == 0:
        raise TableError(
            f"region {describe(gpa, size, uaddr, mmap_offset)} has size 0",
            kind="bad-region",
            details={"gpa": gpa, "size": size},
        )
    for name, start in (("gpa", gpa), ("uaddr", uaddr), ("mmap_offset", mmap_offset)):
        if not end_fits_u64(start, size):
            raise TableError(
                f"region {describe(gpa, size, uaddr, mmap_offset)}: {name} 0x{start:x} + size "
                f"0x{size:x} reaches 2^64 (the end must fit in a u64)",
                kind="bad-region",
                details={"field": name, "start": start, "size": size},
            )


@final
class RegionTable(Generic[H]):
    """Regions sorted by GPA, with a second index by front-end address.

    Args:
        max_slots: how many regions the table holds at most (GET_MAX_MEM_SLOTS answer).
    """

    def __init__(self, max_slots: int) -> None:
        self.max_slots = max_slots
        self._by_gpa: list[Region[H]] = []
        self._gpa_starts: list[int] = []
        self._by_uaddr: list[Region[H]] = []
        self._uaddr_starts: list[int] = []
        self._unreleased: list[Region[H]] = []

    def __len__(self) -> int:
        return len(self._by_gpa)

    def __iter__(self) -> Iterator[Region[H]]:
        return iter(self._by_gpa)

    @property
    def regions(self) -> tuple[Region[H], ...]:
        """All regions, by GPA."""
        return tuple(self._by_gpa)

    @property
    def unreleased(self) -> tuple[Region[H], ...]:
        """Regions the front-end's table no longer has whose unmap failed: still mapped, each
        marked (:attr:`Region.unmap_failed`). They take no part in translation, overlap or slot
        checks (the front-end may already reuse their addresses), only in :attr:`mapped`."""
        return tuple(self._unreleased)

    @property
    def mapped(self) -> tuple[Region[H], ...]:
        """Every region still mapped: the table and :attr:`unreleased`, by GPA."""
        if not self._unreleased:
            return tuple(self._by_gpa)
        return tuple(sorted(self._by_gpa + self._unreleased, key=lambda r: (r.gpa, r.seq)))

    def set_unreleased(self, regions: Iterable[Region[H]]) -> None:
        """Make ``regions`` the whole of :attr:`unreleased`."""
        self._unreleased[:] = regions

    @property
    def free_slots(self) -> int:
        """Slots left before the limit."""
        return self.max_slots - len(self._by_gpa)

    # -- checks ---------------------------------------------------------------------------

    def check_add(self, gpa: int, size: int, uaddr: int, mmap_offset: int) -> None:
        """Raise :class:`TableError` if a region with these numbers could not be added."""
        validate_numbers(gpa, size, uaddr, mmap_offset)
        used = len(self._by_gpa)
        if used >= self.max_slots:
            raise TableError(
                f"no free memory slot for {describe(gpa, size, uaddr, mmap_offset)}: all "
                f"{self.max_slots} slots are used (--max-slots {self.max_slots}); remove a region "
                "first or start vhostmem with a larger --max-slots",
                kind="slot-limit",
                details={"max_slots": self.max_slots, "used": used},
            )
        other = self._overlap(self._by_gpa, self._gpa_starts, gpa, size, "gpa")
        if other is not None:
            raise TableError(
                f"region {describe(gpa, size, uaddr, mmap_offset)} overlaps the guest physical "
                f"range of region {other.describe()}",
                kind="overlap-gpa",
                details={"other": other.as_json()},
            )
        other = self._overlap(self._by_uaddr, self._uaddr_starts, uaddr, size, "uaddr")
        if other is not None:
            raise TableError(
                f"region {describe(gpa, size, uaddr, mmap_offset)} overlaps the front-end address "
                f"range 0x{other.uaddr:x}-0x{other.uaddr_end - 1:x} of region {other.describe()}",
                kind="overlap-uaddr",
                details={"other": other.as_json()},
            )

    def check_table(self, entries: list[tuple[int, int, int, int]]) -> None:
        """Raise :class:`TableError` if ``(gpa, size, uaddr, mmap_offset)`` entries could not
        form a table on their own (SET_MEM_TABLE replaces the whole table).

        Two sorts and a scan find any problem; only then are the entries added one by one to a
        scratch table, whose refusal names the regions the way :meth:`check_add` does.
        """
        if self._table_fits(entries):
            return
        scratch: RegionTable[None] = RegionTable(self.max_slots)
        for gpa, size, uaddr, mmap_offset in entries:
            scratch.add(Region(gpa, size, uaddr, mmap_offset, handle=None))
        raise AssertionError(f"check_table found a problem scratch.add did not: {entries}")

    def _table_fits(self, entries: list[tuple[int, int, int, int]]) -> bool:
        if len(entries) > self.max_slots:
            return False
        try:
            for entry in entries:
                validate_numbers(*entry)
        except TableError:
            return False  # check_table lets the scratch table say it, in entry order
        for index in (0, 2):  # gpa, then uaddr: sorted neighbours must not overlap
            ordered = sorted(entries, key=lambda e: e[index])
            for before, after in pairwise(ordered):
                if before[index] + before[1] > after[index]:
                    return False
        return True

    def replace(self, regions: Iterable[Region[H]]) -> None:
        """Make ``regions`` the whole table (checked by :meth:`check_table`)."""
        by_gpa = sorted(regions, key=lambda r: r.gpa)
        self._by_gpa[:] = by_gpa
        self._gpa_starts[:] = [r.gpa for r in by_gpa]
        by_uaddr = sorted(by_gpa, key=lambda r: r.uaddr)
        self._by_uaddr[:] = by_uaddr
        self._uaddr_starts[:] = [r.uaddr for r in by_uaddr]

    @staticmethod
    def _overlap(
        ordered: list[Region[H]],
        starts: list[int],
        start: int,
        size: int,
        attr: str,
    ) -> Region[H] | None:
        # Regions do not overlap each other, so only the last one starting before our end can
        # reach into us.
        i = bisect_left(starts, start + size) - 1
        if i >= 0:
            candidate = ordered[i]
            if getattr(candidate, attr) + candidate.size > start:
                return candidate
        return None

    # -- changes --------------------------------------------------------------------------

    def add(self, region: Region[H]) -> None:
        """Check and insert a region (:class:`TableError` if :meth:`check_add` refuses it)."""
        self.check_add(region.gpa, region.size, region.uaddr, region.mmap_offset)
        self.insert(region)

    def insert(self, region: Region[H]) -> None:
        """Insert a region :meth:`check_add` has just passed (the caller mapped it since)."""
        i = bisect_right(self._gpa_starts, region.gpa)
        self._gpa_starts.insert(i, region.gpa)
        self._by_gpa.insert(i, region)
        j = bisect_right(self._uaddr_starts, region.uaddr)
        self._uaddr_starts.insert(j, region.uaddr)
        self._by_uaddr.insert(j, region)

    def find(self, gpa: int, uaddr: int, size: int) -> Region[H] | None:
        """The region REM_MEM_REG means by (gpa, uaddr, size), or ``None``."""
        i = bisect_left(self._gpa_starts, gpa)
        if i < len(self._by_gpa):
            region = self._by_gpa[i]
            if region.key == (gpa, uaddr, size):
                return region
        return None

    def find_or_refuse(self, gpa: int, uaddr: int, size: int) -> Region[H]:
        """:meth:`find`, or :class:`TableError` ``not-found`` naming the nearest regions."""
        region = self.find(gpa, uaddr, size)
        if region is None:
            raise TableError(
                f"no region matches {describe(gpa, size, uaddr)} (REM_MEM_REG matches gpa, "
                f"uaddr and size; {self.neighbours(gpa)})",
                kind="not-found",
                details={"gpa": gpa, "size": size, "uaddr": uaddr},
            )
        return region

    def remove(self, region: Region[H]) -> None:
        """Take a region out of the table (it must be in it)."""
        i = self._index(self._by_gpa, self._gpa_starts, region.gpa, region)
        del self._by_gpa[i]
        del self._gpa_starts[i]
        j = self._index(self._by_uaddr, self._uaddr_starts, region.uaddr, region)
        del self._by_uaddr[j]
        del self._uaddr_starts[j]

    @staticmethod
    def _index(
        ordered: Sequence[Region[object]], starts: list[int], start: int, region: Region[object]
    ) -> int:
        i = bisect_left(starts, start)
        while i < len(ordered) and starts[i] == start:
            if ordered[i] is region:
                return i
            i += 1
        raise KeyError(region.describe())

    def clear(self) -> tuple[Region[H], ...]:
        """Empty the table and return what was in it, :attr:`unreleased` last (the shell
        unmaps them)."""
        gone = tuple(self._by_gpa) + tuple(self._unreleased)
        self._unreleased.clear()
        self._by_gpa.clear()
        self._gpa_starts.clear()
        self._by_uaddr.clear()
        self._uaddr_starts.clear()
        return gone

    # -- translation ----------------------------------------------------------------------

    def lookup_gpa(self, gpa: int) -> Region[H] | None:
        """The region holding guest physical address ``gpa``, or ``None`` (a hole)."""
        i = bisect_right(self._gpa_starts, gpa) - 1
        if i >= 0:
            region = self._by_gpa[i]
            if gpa < region.gpa_end:
                return region
        return None

    def lookup_uaddr(self, uaddr: int) -> Region[H] | None:
        """The region holding front-end address ``uaddr``, or ``None``."""
        i = bisect_right(self._uaddr_starts, uaddr) - 1
        if i >= 0:
            region = self._by_uaddr[i]
            if uaddr < region.uaddr_end:
                return region
        return None

    def neighbours(self, gpa: int) -> str:
        """Words naming the regions just below and above ``gpa``, for error messages."""
        i = bisect_right(self._gpa_starts, gpa)
        parts = []
        if i > 0:
            below = self._by_gpa[i - 1]
            parts.append(f"below: 0x{below.gpa:x}-0x{below.gpa_end - 1:x}")
        if i < len(self._by_gpa):
            above = self._by_gpa[i]
            parts.append(f"above: 0x{above.gpa:x}-0x{above.gpa_end - 1:x}")
        return "; ".join(parts) if parts else "the table is empty"


# -- merged view ------------------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class UnmergeableRange:
    """A GPA range whose edges no merge may cross (a memslot, a memory device).

    Attributes:
        start: first GPA.
        end: one past the last GPA.
        source: where the marker came from (``--unmergeable``, ``qmp:memslot-3``, ...).
    """

    start: int
    end: int
    source: str

    def splits(self, boundary: int) -> bool:
        """Whether a merge across ``boundary`` would cross this range's edge."""
        return boundary in (self.start, self.end)


@final
@dataclass(frozen=True, slots=True)
class MergedRegion:
    """Adjacent received regions shown as one, and why the next boundary was kept.

    Attributes:
        parts: the received regions, in GPA order.
        boundary_after: why this merged region ends where it does: ``None`` for the last region,
            otherwise a reason (``"gap"``, ``"not contiguous in front-end address"``,
            ``"different backing"``, ``"not contiguous in file offset"``, ``"unmergeable: SOURCE"``,
            ``"merging disabled"``).
    """

    parts: tuple[Region[object], ...]
    boundary_after: str | None

    @property
    def gpa(self) -> int:
        return self.parts[0].gpa

    @property
    def size(self) -> int:
        return self.parts[-1].gpa_end - self.parts[0].gpa

    @property
    def uaddr(self) -> int:
        return self.parts[0].uaddr

    @property
    def mmap_offset(self) -> int:
        return self.parts[0].mmap_offset


def merge_obstacle(
    left: Region[object], right: Region[object], unmergeable: Iterable[UnmergeableRange]
) -> str | None:
    """Why ``left`` and ``right`` cannot be shown as one region, or ``None`` if they can.

    Mirrors QEMU's merge rule for vhost (hw/virtio/vhost.c ``vhost_region_add_section``: same
    memory region, contiguous host address, neither section unmergeable) and the flat view's
    ``can_merge`` (system/memory.c), expressed on what the back-end can see: GPA, front-end
    address and file offset contiguous on the same file.
    """
    if left.gpa_end != right.gpa:
        return "gap"
    if left.uaddr_end != right.uaddr:
        return "not contiguous in front-end address"
    if left.file_id is None or left.file_id != right.file_id:
        return "different backing"
    if left.mmap_offset + left.size != right.mmap_offset:
        return "not contiguous in file offset"
    for marker in unmergeable:
        if marker.splits(right.gpa):
            return f"unmergeable: {marker.source}"
    return None


def merged_view(
    regions: Iterable[Region[object]],
    unmergeable: Iterable[UnmergeableRange] = (),
    *,
    merge: bool = True,
) -> list[MergedRegion]:
    """Coalesce adjacent regions for display, honouring unmergeable markers.

    Args:
        regions: regions in GPA order.
        unmergeable: ranges whose edges keep regions apart.
        merge: ``False`` shows every received region on its own ("merging disabled").
    """
    markers = tuple(unmergeable)
    out: list[MergedRegion] = []
    group: list[Region[object]] = []
    for region in regions:
        if group:
            reason = merge_obstacle(group[-1], region, markers) if merge else "merging disabled"
            if reason is not None:
                out.append(MergedRegion(tuple(group), reason))
                group = []
        group.append(region)
    if group:
        out.append(MergedRegion(tuple(group), None))
    return out
