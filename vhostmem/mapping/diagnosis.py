"""Mapping failures and huge page shortfalls in words.

Every ``MappingError`` of a map or an unmap is built here, so one place holds the rule of the
messages (DESIGN.md section 7: every error message names the region, the fd's backing, the
numbers involved and what to change): the request, the region (GPA start-end, size, front-end
address, offset), the backing, the numbers that bear on the cause, the cause and the fix, in
one line; the same facts go to ``MappingError.details`` for JSON.

* ``Diagnosis``: one per ``Mapper.map`` call; a refusal before mmap (closed Mapper, bad fd, an
  fd that cannot be mapped read-write, numbers that do not fit, the ``max_mapped`` cap) or an
  mmap failure, worded per errno (mmap(2)) with the limits that bear on it.
* ``views_in_use``, ``munmap_failed``: the two ways an unmap fails.
* ``Shortfall``: a hugetlb region the huge page pool cannot back in full, a warning rather
  than a failure (MAP_NORESERVE maps it anyway; the first touch of a missing page is SIGBUS).

A rule here never names a cause the numbers rule out; an injected errno says it was injected.

``Shortfall`` names the live ``Mapping`` it is about; that import is for type checking only,
at run time nothing here imports ``mapper``.
"""

from __future__ import annotations

import errno as errno_mod
import os
import resource
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Final, NoReturn, final

from vhostmem.errors import MappingError
from vhostmem.mapping.backing import Backing
from vhostmem.mapping.linux import hugetlb_pool, max_map_count, process_map_count
from vhostmem.regions import U64_LIMIT, end_fits_u64, human_size

if TYPE_CHECKING:
    from vhostmem.mapping.mapper import Mapping


def region_text(
    request: str, gpa: int, size: int, mmap_offset: int, uaddr: int | None = None
) -> str:
    """The request and the region: GPA start-end (inclusive), size, front-end address, offset.

    ``uaddr`` is None only for a Mapper used directly, without a front-end. The dirty log of
    SET_LOG_BASE is no guest memory: it has a size and an offset, no GPA or front-end address.
    """
    if request == "SET_LOG_BASE":
        return (
            f"{request} dirty log size=0x{size:x} ({human_size(size)}) "
            f"mmap_offset=0x{mmap_offset:x}"
        )
    span = f"0x{gpa:x}-0x{gpa + size - 1:x}" if size > 0 else f"0x{gpa:x} (empty)"
    text = f"{request} gpa={span} size=0x{size:x} ({human_size(size)})"
    if uaddr is not None:
        text += f" uaddr=0x{uaddr:x}"
    return text + f" mmap_offset=0x{mmap_offset:x}"


def _pool_text(page_size: int) -> str:
    """One page size's huge page pool in words, for ENOMEM messages."""
    pool = hugetlb_pool(page_size)
    if pool is None:
        return f"no hugetlb pool for {human_size(page_size)} pages"
    return (
        f"hugetlb pool {page_size // 1024}kB: free {pool['free']}, resv {pool['resv']}, "
        f"total {pool['total']}, surplus {pool['surplus']} pages"
    )


@final
class Diagnosis:
    """Builds the one-message MappingError of a map() call: request, region, backing, fix."""

    # Everything is worked out only when a failure is built: a successful map() (the hot path,
    # QEMU waits for its ack) pays for none of the text.
    __slots__ = ("backing", "details", "fd", "gpa", "mmap_offset", "request", "size", "uaddr")

    def __init__(
        self, request: str, gpa: int, size: int, mmap_offset: int, fd: int, uaddr: int | None
    ) -> None:
        self.request, self.gpa, self.size, self.mmap_offset, self.fd, self.uaddr = (
            request,
            gpa,
            size,
            mmap_offset,
            fd,
            uaddr,
        )
        self.backing: Backing | None = None
        self.details: dict[str, Any] = {}

    def set_backing(self, backing: Backing) -> None:
        self.backing = backing

    def fail(
        self, kind: str, what: str, fix: str, *, errno: int | None = None, **numbers: Any
    ) -> MappingError:
        region = region_text(self.request, self.gpa, self.size, self.mmap_offset, self.uaddr)
        details: dict[str, Any] = {
            "request": self.request,
            "gpa": self.gpa,
            "size": self.size,
            "uaddr": self.uaddr,
            "mmap_offset": self.mmap_offset,
            "fd": self.fd,
        }
        if self.backing is None:
            backing_text = f"not inspected (fd {self.fd})"
        else:
            backing_text = self.backing.describe()
            details["backing"] = self.backing.as_dict()
        return MappingError(
            f"{region}: {what}. Backing: {backing_text}. Fix: {fix}",
            errno=errno,
            kind=kind,
            details={**details, **self.details, **numbers},
        )

    def closed(self) -> MappingError:
        return self.fail("closed", "the Mapper is closed", "map regions before Mapper.close()")

    def bad_fd(self, err: OSError) -> MappingError:
        return self.fail(
            "bad-fd",
            f"cannot inspect fd {self.fd}: {err.strerror}",
            "pass the fd received with the message (SCM_RIGHTS), still open",
            errno=err.errno,
        )

    def max_mapped(
        self, length: int, max_mapped: int, maps: int, mapped_bytes: int
    ) -> MappingError:
        return self.fail(
            "max-mapped",
            f"mapping {length:#x} ({human_size(length)}) more would exceed "
            f"max_mapped {max_mapped:#x} ({human_size(max_mapped)}): already mapped "
            f"{mapped_bytes:#x} ({human_size(mapped_bytes)}) in {maps} regions",
            "raise the max_mapped cap, or unplug memory first",
            max_mapped=max_mapped,
            mapped_bytes=mapped_bytes,
            maps=maps,
        )

    def mmap_refused(
        self, err: ValueError | OverflowError, fd_offset: int, length: int, page: int
    ) -> MappingError:
        return self.fail(
            "mmap-refused",
            f"Python's mmap refused: {err} (fd_offset {fd_offset:#x}, length "
            f"{length:#x}, page {page:#x})",
            "report this as a vhostmem bug with these numbers",
        )

    def refuse_unmappable(self, backing: Backing) -> None:
        """Refuse a backing that can never be mapped read-write and shared.

        Rule: mmap(2) with ``MAP_SHARED`` and ``PROT_WRITE`` fails with ENODEV on a file type
        that has no mmap, EACCES on an fd not opened read-write, EPERM on a memfd with a write
        seal (memfd_create(2), ``F_SEAL_WRITE`` / ``F_SEAL_FUTURE_WRITE``).
        """
        fail = self.fail
        if not backing.mappable:
            raise fail(
                "not-mappable",
                f"a {backing.kind} cannot be mmapped",
                "pass a memory backend with share=on (memfd or a file), e.g. "
                "-object memory-backend-memfd,id=mem0,size=...,share=on",
            )
        if not backing.writable:
            raise fail(
                "read-only",
                f"the fd is opened {backing.access}; vhostmem maps guest memory "
                "read-write (PROT_READ|PROT_WRITE, MAP_SHARED) and the kernel would "
                "refuse with EACCES",
                "give the back-end an fd opened O_RDWR (QEMU: a memory backend with "
                "share=on and without readonly=on)",
            )
        write_seals = [s for s in backing.seals if s in ("F_SEAL_WRITE", "F_SEAL_FUTURE_WRITE")]
        if write_seals:
            raise fail(
                "sealed",
                f"the memfd is sealed with {'|'.join(write_seals)}; vhostmem maps guest "
                "memory read-write (PROT_READ|PROT_WRITE, MAP_SHARED) and the kernel "
                "would refuse with EPERM",
                "do not seal guest memory against writes (F_SEAL_WRITE / "
                "F_SEAL_FUTURE_WRITE); QEMU's own seal=on only adds GROW/SHRINK",
            )

    def refuse_numbers(self, backing: Backing) -> NoReturn:
        """Word why the mapper's one-line numbers check refused; called only when it did.

        Rule: each number is a u64 (the wire format, vhost-user.rst "Memory region
        description"), the region is not empty, neither ``mmap_offset + size`` nor ``gpa +
        size`` reaches 2^64, and the file holds the whole region (a page past EOF is a SIGBUS
        when touched, mmap(2)).
        """
        fail = self.fail
        gpa, size, mmap_offset = self.gpa, self.size, self.mmap_offset
        for name, value in (("gpa", gpa), ("size", size), ("mmap_offset", mmap_offset)):
            if not 0 <= value < U64_LIMIT:
                raise fail(
                    "bad-region",
                    f"{name}={value:#x} is not a u64",
                    "the front-end sent a corrupt region",
                )
        if size == 0:
            raise fail(
                "empty",
                "the region is empty (size 0)",
                "the front-end sent a zero-sized region (a front-end bug): "
                "check the memory table it sends",
            )
        if not end_fits_u64(mmap_offset, size):
            raise fail(
                "overflow",
                f"mmap_offset + size = {mmap_offset + size:#x} overflows 2^64",
                "the front-end sent a corrupt region (mmap_offset + size must fit in 64 bits)",
                end=mmap_offset + size,
            )
        if not end_fits_u64(gpa, size):
            raise fail(
                "overflow",
                f"gpa + size = {gpa + size:#x} overflows 2^64",
                "the front-end sent a corrupt region (gpa + size must fit in 64 bits)",
                end=gpa + size,
            )
        end = mmap_offset + size
        if backing.st_size < end:
            raise fail(
                "past-eof",
                f"the region ends past the end of the file: file size "
                f"{backing.st_size:#x} ({human_size(backing.st_size)}) < mmap_offset + size "
                f"= {end:#x} ({human_size(end)}), short by {end - backing.st_size:#x}; "
                "touching the tail would SIGBUS",
                "make the memory backend at least mmap_offset + size bytes (size=), and "
                "check nothing truncated the file",
                st_size=backing.st_size,
                end=end,
            )
        raise AssertionError(
            f"_map refused numbers that refuse_numbers accepts: gpa "
            f"{gpa:#x} size {size:#x} mmap_offset {mmap_offset:#x}"
        )

    def mmap_failed(
        self,
        err: OSError,
        backing: Backing,
        layout: dict[str, int],
        *,
        injected: bool,
        maps: int,
        mapped_bytes: int,
    ) -> MappingError:
        """Word an mmap failure: what the kernel said (or that the errno was injected), the
        numbers that bear on that errno, and the fix.

        Rule: the words never name a cause the numbers rule out. An injected errno did not
        come from the kernel (mmap was not called), so the message says so, shows the numbers
        as context only, and its fix is to remove the rule.
        """
        self.details.update(layout)
        fd_offset, remainder, length = layout["fd_offset"], layout["remainder"], layout["length"]
        layout_text = (
            f"fd_offset {fd_offset:#x}, remainder {remainder:#x}, length {length:#x} "
            f"({human_size(length)}), page {layout['page_size']:#x}"
        )
        fail = self.fail
        code = err.errno or 0
        name = errno_mod.errorcode.get(code, str(code))
        reported = f"{name} ({os.strerror(code)})"
        if injected:
            said = (
                f"mmap was not called: a fault rule (errno={name}) made it fail as if the "
                f"kernel had returned {reported} [injected fault]"
            )
        else:
            said = f"mmap failed: the kernel returned {reported}"
        numbers: dict[str, Any] = {"injected": injected, "errno_name": name}

        def result(kind: str, text: str, fix: str, **more: Any) -> MappingError:
            if injected:
                fix = (
                    f"nothing to change in the set-up: this {name} was injected; remove the "
                    f"rule (vhostmem-ctl inject --clear) to map normally. Were the kernel to "
                    f"return it: {fix}"
                )
            return fail(kind, text, fix, errno=code, **numbers, **more, **layout)

        if code == errno_mod.ENOMEM:
            limit = max_map_count()
            current = process_map_count()
            soft_as, _ = resource.getrlimit(resource.RLIMIT_AS)
            as_text = "unlimited" if soft_as == resource.RLIM_INFINITY else f"{soft_as:#x}"
            parts = [
                f"{said}; {layout_text}",
                f"/proc/sys/vm/max_map_count {limit}, this process has {current} mappings "
                f"(/proc/self/maps lines)",
                f"this Mapper maps {maps} regions, {mapped_bytes:#x} ({human_size(mapped_bytes)})",
                f"RLIMIT_AS {as_text}",
            ]
            numbers.update(
                max_map_count=limit,
                process_maps=current,
                mapper_maps=maps,
                mapper_bytes=mapped_bytes,
            )
            if backing.hugetlb:
                parts.append(_pool_text(backing.page_size))
                numbers["hugetlb_pool"] = hugetlb_pool(backing.page_size)
            fix = (
                "raise vm.max_map_count (sysctl -w vm.max_map_count=N) if the process is near "
                "it, raise RLIMIT_AS, or map fewer/smaller regions"
            )
            if backing.hugetlb:
                fix += (
                    "; for hugetlb, reserve pages: echo N > /proc/sys/vm/nr_hugepages "
                    "(MAP_NORESERVE takes them on first touch)"
                )
            return result("enomem", "; ".join(parts), fix)
        if code == errno_mod.EINVAL and backing.hugetlb:
            page = backing.page_size
            off_mod, len_mod = fd_offset % page, length % page
            rule = (
                f"hugetlbfs needs the file offset and the length to be multiples of the huge "
                f"page size {page:#x} ({human_size(page)})"
            )
            if off_mod or len_mod:
                wrong = [
                    f"{what} {value:#x} is not a multiple (mod page = {rest:#x})"
                    for what, value, rest in (
                        ("fd_offset", fd_offset, off_mod),
                        ("length", length, len_mod),
                    )
                    if rest
                ]
                text = f"{said}; {layout_text}; {rule}: {', '.join(wrong)}"
                fix = (
                    "check the page size of the backend (hugetlbsize=) matches the mount; "
                    "report these numbers as a vhostmem bug (it aligns both)"
                )
            else:
                text = (
                    f"{said}; {layout_text}; fd_offset {fd_offset:#x} and length "
                    f"{length:#x} are both multiples of the huge page size {page:#x} "
                    f"({human_size(page)}), so alignment is not the cause"
                )
                fix = (
                    "check that the backend's hugetlbsize= matches the page size of the file "
                    "(st_blksize); otherwise report these numbers as a vhostmem bug"
                )
            return result("einval", text, fix)
        if code in (errno_mod.EMFILE, errno_mod.ENFILE):
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            open_fds = len(os.listdir("/proc/self/fd"))
            text = (
                f"{said}; {layout_text}; stdlib mmap duplicates the fd per region: "
                f"{open_fds} fds open, RLIMIT_NOFILE soft {soft} hard {hard}"
            )
            numbers.update(open_fds=open_fds, nofile_soft=soft, nofile_hard=hard)
            return result(
                name.lower(), text, "raise the fd limit (raise_nofile_limit(), ulimit -n)"
            )
        hints = {
            errno_mod.EACCES: "the fd must be opened O_RDWR on a filesystem that allows shared "
            "writable mappings",
            errno_mod.EPERM: "remove write seals from the memfd (F_SEAL_WRITE / "
            "F_SEAL_FUTURE_WRITE)",
            errno_mod.ENODEV: "the filesystem does not support mmap: use memfd, tmpfs or hugetlbfs",
        }
        return result(
            name.lower(),
            f"{said}; {layout_text}",
            hints.get(code, "see mmap(2) for this errno; the numbers are above"),
        )


# --- unmap failures ------------------------------------------------------------------------------


def views_in_use(
    text: str, backing: Backing, err: BufferError, details: dict[str, Any]
) -> MappingError:
    """A mapping that cannot be unmapped because a view derived from ``Mapping.view()`` lives.

    Rule: ``mmap.close()`` raises BufferError while a buffer export of the map exists (CPython
    ``mmapmodule.c``); unmapping under it would leave the view pointing at nothing.
    """
    return MappingError(
        f"cannot unmap {text}"
        f" ({backing.kind}): a memoryview derived from Mapping.view() is still in use"
        f" ({err}). Fix: release derived views (memoryview.release()) before closing.",
        errno=errno_mod.EBUSY,
        kind="views-in-use",
        details=details,
    )


def munmap_failed(
    text: str, backing: Backing, map_base: int, span: int, err: int, details: dict[str, Any]
) -> MappingError:
    """The kernel refused to unmap ``[map_base, map_base + span)``: the mapping leaks.

    Rule (munmap(2)): ENOMEM when the unmap would split a mapping and the process is at
    ``vm.max_map_count``; anything else is a vhostmem bug (it passes whole pages).
    """
    end = map_base + span
    cause = "Fix: report this as a vhostmem bug with these numbers."
    if err == errno_mod.ENOMEM:
        cause = (
            f"The unmap splits a mapping and this process has {process_map_count()} "
            f"mappings of vm.max_map_count {max_map_count()}. Fix: raise "
            f"vm.max_map_count (sysctl) or map fewer regions."
        )
    return MappingError(
        f"munmap failed for {text}"
        f": backing {backing.describe()}; {map_base:#x}-{end:#x} is still mapped "
        f"after mmap.close(); munmap({map_base:#x}, {span:#x}) -> "
        f"{errno_mod.errorcode.get(err, '?')} ({os.strerror(err)}). The mapping leaks until "
        f"the process exits. {cause}",
        errno=err,
        kind="munmap-failed",
        details=details,
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
        region = region_text(self.request, self.gpa, self.size, self.mmap_offset, self.uaddr)
        missing = self.file_pages - min(self.held, self.file_pages)
        parts = [
            f"{region}: huge page shortfall: the region spans {self.region_pages} pages "
            f"of {page} ({self.kind} {self.file!r})"
        ]
        if self.file_regions > 1:
            parts.append(
                f"its file has {self.file_regions} regions mapped here, "
                f"{self.file_pages} pages counted once"
            )
        parts.append(f"the file holds {self.held} pages (allocated)")
        parts.append(
            f"the {page} pool has {self.free} free pages, {self.resv} of them reserved "
            f"(of {self.total} in all)"
        )
        if self.other_missing:
            parts.append(
                f"other hugetlb files of {page} pages mapped here still lack "
                f"{self.other_missing} pages"
            )
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


def pages_in(ranges: list[tuple[int, int]], page: int) -> int:
    """Huge pages covered by the union of ``[start, end)`` byte ranges (page-aligned)."""
    total = 0
    reach = -1
    for start, end in sorted(ranges):
        start = max(start, reach)
        if end > start:
            total += end - start
            reach = end
    return total // page
