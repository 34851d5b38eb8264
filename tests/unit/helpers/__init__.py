"""Shared helpers for unit tests, one kind a module.

- ``fakes``: a fake host for the sans-IO session and device (no sockets, no mappings);
- ``memslots``: virtio-mem memslots as never-mapped regions, for history and trace tests;
- ``leaks``: the process's fds and shared mappings, and ``no_leaks()`` around a block;
- ``tools``: a script under tools/ loaded as a module (``load_tool``);
- ``waiting``: trio helpers (a blocking call in a thread, polling with a deadline);
- ``wire``: a back-end with QEMU-like fake front-ends over socketpairs, for the tests where
  sockets matter (stalls, killed peers, modes).
"""
