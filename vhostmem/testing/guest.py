"""Where the test guest lives and what it promises.

`tools/build-guest` builds the guest (a Debian 6.1 kernel and a busybox initramfs) into a cache
directory; this module finds it and checks it is complete and built by the build script in this
checkout. It never builds anything itself: building needs apt and root, which is
`tools/setup-host`'s job, and a test that silently downloaded 70 MB would hide a broken setup.

What the guest's /init promises (the recipe is in tools/build-guest):

- memory hot-plugged later comes online by itself as ZONE_MOVABLE (so virtio-mem can unplug it);
- virtio-net and virtio-mem drivers are loaded; eth0, if present, is up with 192.0.2.2/24;
- the console (ttyS0) prints `READY_MARKER` once per boot, then a shell reads ttyS0 forever.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["READY_MARKER", "GuestImage", "GuestImageError", "cache_dir", "find_image"]

#: Printed by the guest's /init on the serial console when the drivers are loaded and the
#: shell is about to start (followed by the kernel release on the same line).
READY_MARKER: Final = "VHOSTMEM-GUEST-READY"

_SETUP_HINT: Final = "run tools/setup-host (it installs QEMU and builds the guest image)"


class GuestImageError(RuntimeError):
    """The guest image is missing, incomplete or stale; the message says which command fixes it."""


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A built guest: the kernel, the initramfs and the VERSION record of how they were built."""

    kernel: Path
    initrd: Path
    #: key=value pairs from `<cache>/VERSION` (kernel_release, kernel_package_version,
    #: recipe_hash, content_sha256, ...).
    version: dict[str, str]

    @property
    def kernel_release(self) -> str:
        return self.version.get("kernel_release", "?")


def cache_dir() -> Path:
    """The image cache: `$VHOSTMEM_CACHE`, else `~/.cache/vhostmem/guest` (as build-guest)."""
    env = os.environ.get("VHOSTMEM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vhostmem" / "guest"


def _build_script() -> Path | None:
    # In a source checkout the builder sits at <repo>/tools/build-guest; an installed wheel has
    # none, and then the image cannot be checked for staleness (only for completeness).
    script = Path(__file__).resolve().parents[2] / "tools" / "build-guest"
    return script if script.is_file() else None


def find_image(cache: Path | None = None) -> GuestImage:
    """Finds the built guest image.

    Args:
        cache: the cache directory; default `cache_dir()`.

    Returns:
        The image, complete and (in a checkout) built by this checkout's tools/build-guest.

    Raises:
        GuestImageError: missing, incomplete, or built by another version of the recipe.
    """
    where = cache if cache is not None else cache_dir()
    kernel, initrd, version_file = where / "vmlinuz", where / "initrd.gz", where / "VERSION"
    missing = [p.name for p in (kernel, initrd, version_file) if not p.is_file()]
    if missing:
        raise GuestImageError(
            f"guest image in {where} is missing {', '.join(missing)}: {_SETUP_HINT}"
        )
    version = dict(
        line.split("=", 1) for line in version_file.read_text().splitlines() if "=" in line
    )
    script = _build_script()
    if script is not None:
        want = hashlib.sha256(script.read_bytes()).hexdigest()
        if version.get("script_sha256") != want:
            raise GuestImageError(
                f"guest image in {where} was built by another version of {script}: "
                f"run tools/build-guest (or tools/setup-host) to rebuild it"
            )
    return GuestImage(kernel=kernel, initrd=initrd, version=version)
