"""Mapping failures and huge page shortfalls in words."""


from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Final, final

from vhostmem.errors import MappingError
from vhostmem.mapping.backing import (
    Backing,
)
from vhostmem.mapping.linux import (
    hugetlb_pool,
)
from vhostmem.regions import human_size

if TYPE_CHECKING:
    from vhostmem.mapping.mapper import Mapping


def _region_text(
    request: str, gpa: int, size: int, mmap_offset: int, uaddr: int | None = None
) -> str:
    """The request and the region: GPA start-end (inclusive), size, front-end address, offset.

    ``uaddr`` is None only for a Mapper used directly, without a front-end.
    """
    span = f"0x{gpa:x}-0x{gpa + size - 1:x}" if size > 0 else f"0x{gpa:x} (empty)"
    text = f"{request} gpa={span} size=0x{size:x} ({human_size(size)})"
    if uaddr is not None:
        text += f" uaddr=0x{uaddr:x}"
    return text + f" mmap_offset=0x{mmap_offset:x}"


def _pool_text(page_size: int) -> str:
    pool = hugetlb_pool(page_size)
    if pool is None:
        return f"no hugetlb pool for {human_size(page_size)} pages"
    return (f"hugetlb pool {page_size // 1024}kB: free {pool['free']}, resv {pool['resv']}, "
            f"total {pool['total']}, surplus {pool['surplus']} pages")


@final
class _Diagnosis:
    """Builds the one-message MappingError of a map() call: request, region, backing, fix."""

    # Everything is worked out only when a failure is built: a successful map() (the hot path,
    # QEMU waits for its ack) pays for none of the text.
    __slots__ = ("backing", "details", "fd", "gpa", "mmap_offset", "request", "size", "uaddr")

    def __init__(
        self, request: str, gpa: int, size: int, mmap_offset: int, fd: int, uaddr: int | None
    ) -> None:
        self.request, self.gpa, self.size, self.mmap_offset, self.fd, self.uaddr = (
            request, gpa, size, mmap_offset, fd, uaddr)
        self.backing: Backing | None = None
        self.details: dict[str, Any] = {}

    def set_backing(self, backing: Backing) -> None:
        self.backing = backing

    def fail(self, kind: str, what: str, fix: str, *, errno: int | None = None,
             **numbers: Any) -> MappingError:
        region = _region_text(self.request, self.gpa, self.size, self.mmap_offset, self.uaddr)
        details: dict[str, Any] = {
            "request": self.request, "gpa": self.gpa, "size": self.size, "uaddr": self.uaddr,
            "mmap_offset": self.mmap_offset, "fd": self.fd,
        }
        if self.backing is None:
            backing_text = f"not inspected (fd {self.fd})"
        else:
            backing_text = self.backing.describe()
            details["backing"] = self.backing.as_dict()
        return MappingError(
            f"{region}: {what}. Backing: {backing_text}. Fix: {fix}",
            errno=errno, kind=kind, details={**details, **self.details, **numbers},
        )


# --- huge page shortfalls ------------------------------------------------------------------------


def _pool_size_arg(page_size: int) -> str:
    """The ``--size`` argument of hugepages/setup.sh for a page size: ``2M``, ``1G``."""
    return f"{page_size >> 30}G" if page_size >= 1 << 30 else f"{page_size >> 20}M"


@final
@dataclass(frozen=True, slots=True)
class Shortfall:
    """A hugetlb region the huge page pool cannot back in full (see ``Mapper.shortfalls``).

    Counts are in huge pages of ``page_size``. ``file_pages`` covers the file's live regions
    counted once (their mapped ranges merged); ``held`` is what the file already has allocated
    (``st_blocks``); ``free`` includes ``resv`` (the kernel counts reserved pages as free);
    ``other_missing`` is what other hugetlb files of the same page size mapped by this process
    still lack. ``short = (file_pages - min(held, file_pages)) + other_missing - free`` > 0:
    the pages of this page size missing for the regions mapped here if every page is touched.
    """

    request: str
    gpa: int
    size: int
    uaddr: int | None
    mmap_offset: int
    kind: str
    file: str
    page_size: int
    region_pages: int
    file_regions: int
    file_pages: int
    held: int
    free: int
    resv: int
    total: int
    other_missing: int
    short: int
    #: The live mapping this is about (not part of the JSON).
    mapping: Mapping = field(repr=False, compare=False)

    def text(self) -> str:
        """The warning in words: the region, the numbers, who gets SIGBUS, the fix."""
        page = human_size(self.page_size)
        region = _region_text(self.request, self.gpa, self.size, self.mmap_offset, self.uaddr)
        missing = self.file_pages - min(self.held, self.file_pages)
        parts = [f"{region}: huge page shortfall: the region spans {self.region_pages} pages "
                 f"of {page} ({self.kind} {self.file!r})"]
        if self.file_regions > 1:
            parts.append(f"its file has {self.file_regions} regions mapped here, "
                         f"{self.file_pages} pages counted once")
        parts.append(f"the file holds {self.held} pages (allocated)")
        parts.append(f"the {page} pool has {self.free} free pages, {self.resv} of them reserved "
                     f"(of {self.total} in all)")
        if self.other_missing:
            parts.append(f"other hugetlb files of {page} pages mapped here still lack "
                         f"{self.other_missing} pages")
        wanted = self.total + self.short
        return (
            "; ".join(parts)
            + f": {missing + self.other_missing} pages still to allocate, {self.short} pages "
            f"short if every page is touched. Served anyway: mapped with MAP_NORESERVE and "
            f"nothing populated, so nothing fails now; whoever first touches a page the pool "
            f"cannot supply gets SIGBUS: QEMU (the guest's accesses run in QEMU's vCPU "
            f"threads, so the guest dies with QEMU), or vhostmem when --tap writes a guest "
            f"buffer there; vhostmem's peek does not touch such pages (it reads holes with "
            f"pread and reports faults). Fix: reserve {self.short} more pages of {page}: echo "
            f"{wanted} > /sys/kernel/mm/hugepages/hugepages-{self.page_size // 1024}kB/"
            f"nr_hugepages (or hugepages/setup.sh --size {_pool_size_arg(self.page_size)} "
            f"--pages {wanted}), or give the memory backend fewer pages"
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON, with the text."""
        doc = {name: getattr(self, name) for name in _SHORTFALL_FIELDS}
        doc["text"] = self.text()
        return doc


_SHORTFALL_FIELDS: Final = tuple(f.name for f in fields(Shortfall) if f.name != "mapping")


def _pages_in(ranges: list[tuple[int, int]], page: int) -> int:
    """Huge pages covered by the union of ``[start, end)`` byte ranges (page-aligned)."""
    total = 0
    reach = -1
    for start, end in sorted(ranges):
        start = max(start, reach)
        if end > start:
            total += end - start
            reach = end
    return total // page
