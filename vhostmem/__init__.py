"""vhostmem: a vhost-user back-end that maps, tracks and explains the guest memory table."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
