"""Following QEMU's trace file (vhostmem.tracefile): lines as they are appended, half-written
lines, a file that appears late, a file replaced (new inode, truncated, rewritten past its old
size between two looks)."""

from __future__ import annotations

from pathlib import Path

from vhostmem.tracefile import TraceFollower

COMMIT = "7@1796218704.000001:vhost_commit Started: 1 Changed: 1\n"
WRITE = "7@1796218704.000002:vhost_user_write req:37 flags:0x9\n"
OTHER = "7@1796218704.000003:virtio_set_status vdev 0x1 val 15\n"


def fed(follower: TraceFollower) -> list[tuple[int, str]]:
    pairer = follower._pairers[0]
    return [(line.lineno, line.event) for line in pairer._lines]


def test_lines_are_fed_as_they_are_appended_whole(tmp_path: Path) -> None:
    path = tmp_path / "trace.log"
    path.write_text(OTHER)
    follower = TraceFollower(str(path))
    try:
        pairer = follower.attach()
        assert follower.exists and pairer.fallback is None
        with open(path, "a") as f:
            f.write(COMMIT + WRITE[:20])  # QEMU is half-way through a line
        follower.poll()
        assert fed(follower) == [(2, "commit")]
        with open(path, "a") as f:
            f.write(WRITE[20:] + OTHER)
        follower.poll()
        assert fed(follower) == [(2, "commit"), (3, "write")]
    finally:
        follower.close()


def test_a_file_that_appears_later_is_followed_but_not_by_earlier_connections(
    tmp_path: Path,
) -> None:
    path = tmp_path / "trace.log"
    follower = TraceFollower(str(path))
    try:
        early = follower.attach()
        assert not follower.exists
        path.write_text(COMMIT)
        late = follower.attach()
        assert follower.exists
        res = early.pair("ADD_MEM_REG", 1, arrived=0.0, replied=None, now=0.0)
        assert res is not None and res.fallback is not None and "did not exist" in res.fallback
        assert late.fallback is None
    finally:
        follower.close()


def replaced(path: Path, follower: TraceFollower, how: str) -> str:
    pairer = follower.attach()
    if how == "new inode":
        path.unlink()
        path.write_text(COMMIT)
    elif how == "truncated":
        path.write_text("")
    else:  # QEMU restarted, truncated it and wrote more than before, between two looks
        path.write_text(WRITE * 4)
    follower.poll()
    res = pairer.pair("ADD_MEM_REG", 1, arrived=0.0, replied=None, now=0.0)
    assert res is not None and res.fallback is not None
    return res.fallback


def test_a_replaced_file_ends_pairing_and_is_followed_from_its_start(tmp_path: Path) -> None:
    for how, words in [
        ("new inode", "inode"),
        ("truncated", "truncated from"),
        ("rewritten", "rewritten from its start"),
    ]:
        path = tmp_path / f"{how}.log"
        path.write_text(COMMIT + OTHER)
        follower = TraceFollower(str(path))
        try:
            reason = replaced(path, follower, how)
            assert f"the trace file {path} was replaced ({words}" in reason, reason
            fresh = follower.attach()  # the next connection follows the new file
            with open(path, "a") as f:
                f.write(COMMIT)
            follower.poll()
            assert fresh.last_lineno == len(path.read_text().splitlines())
        finally:
            follower.close()
        assert not follower.exists
