"""Twenty plug/unplug cycles against a real guest leave vhostmem exactly as they found it, while
a misbehaving front-end hammers a second socket of the same process."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

from .conftest import MakeRig, MiB, Rig

PLUG = 128 * MiB  # one 1 GiB memslot mapped per plug; the guest unplugs 128 MiB quickly


def hammer(path: str, stop: threading.Event, counts: dict[str, Any]) -> None:
    """Connect, send garbage (a header with an impossible size, random bytes), repeat.

    Runs in a thread, where a failed assert would only end the thread: what vhostmem must not
    do (answer the garbage) is recorded in ``counts["bad_replies"]`` for the test to check."""
    while not stop.is_set():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(path)
                sock.sendall(b"\x01\x00\x00\x00\x01\x00\x00\x00\xff\xff\xff\x7f" + os.urandom(64))
                sock.settimeout(2)
                # vhostmem closes the connection (framing cannot be trusted); with our garbage
                # still unread on its side the close arrives as a reset
                reply = sock.recv(64)
                if reply != b"":
                    counts["bad_replies"].append(reply)
                counts["rounds"] += 1
            except ConnectionResetError:
                counts["rounds"] += 1
            except OSError:
                counts["errors"] += 1
            except Exception as err:  # anything else ends the thread: say so, do not vanish
                counts["crashed"].append(repr(err))
                raise


def test_twenty_cycles_leave_nothing_behind(make_rig: MakeRig, tmp_path: Path) -> None:
    bad = str(tmp_path / "bad.sock")
    rig: Rig = make_rig(vhostmem_args=("--socket", bad))
    before = rig.backend.stats()
    stop = threading.Event()
    counts: dict[str, Any] = {"rounds": 0, "errors": 0, "bad_replies": [], "crashed": []}
    thread = threading.Thread(target=hammer, args=(bad, stop, counts), daemon=True)
    thread.start()
    try:
        for cycle in range(20):
            rig.guest.plug(PLUG, 60)
            assert len(rig.wait_table_matches_qemu()) == 1, cycle
            rig.guest.plug(0, 60)
            rig.wait_table_matches_qemu()
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive(), "the hammer thread did not stop within 10 s"
    assert counts["bad_replies"] == [], f"vhostmem answered garbage: {counts['bad_replies']}"
    assert counts["crashed"] == [], counts["crashed"]
    assert counts["rounds"] > 0 and counts["errors"] == 0, counts
    assert rig.backend.violations() == []
    events = [e for e in rig.backend.memory_events() if e["region"]["gpa"] != 0]
    assert [e["request"] for e in events] == ["ADD_MEM_REG", "REM_MEM_REG"] * 20
    assert all(e["result"] == "ok" for e in events)
    # the misbehaving socket's connections are all gone; counts are back where they were
    rig.backend.wait_for(
        lambda: rig.backend.stats()["connections_live"] == 1, 10, "the bad connections to close"
    )
    after = rig.backend.stats()
    for key in (
        "process_fds",
        "process_shared_maps",
        "maps",
        "mapping_fds",
        "mapped_bytes",
        "regions",
    ):
        assert after[key] == before[key], (key, before[key], after[key])
