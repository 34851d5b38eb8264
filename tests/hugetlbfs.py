"""A test's own hugetlbfs mount (unit and integration tests): mounted, then unmounted.

Reserving the pages is separate (``/proc/sys/vm/nr_hugepages``; each suite restores it).
A mount that fails (no root, no hugetlbfs) fails the test with the reason; it never skips.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def hugetlbfs_mount(where: Path) -> Iterator[Path]:
    """Mount a 2 MiB hugetlbfs on ``where`` (created), unmount it afterwards."""
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount hugetlbfs on {where} (needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
