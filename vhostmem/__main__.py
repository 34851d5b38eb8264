"""``python -m vhostmem``: the back-end."""

from __future__ import annotations

import sys

from vhostmem.cli import main

sys.exit(main())
