"""Test support for vhostmem: a real-QEMU guest harness (`qemu`, `guest`) and the pytest plugin.

Import the submodules directly (`from vhostmem.testing.qemu import Guest`); this package does
not import them so that loading the pytest plugin never requires QEMU's Python bindings.
"""

from __future__ import annotations
