"""The receive buffer alone: a batch of fds goes with the message holding its chunk's first byte."""

from __future__ import annotations

from vhostmem.receive_buffer import ReceiveBuffer


def test_fds_go_with_the_message_that_holds_their_chunks_first_byte() -> None:
    buffer = ReceiveBuffer()
    buffer.feed(b"aaaa", [3])  # message 1 starts here, with its fd
    buffer.feed(b"aabb", [4])  # ends message 1, starts message 2: fd 4 is message 1's
    buffer.feed(b"bb", [5])  # inside message 2
    buffer.feed(b"cc", [6])  # message 3
    assert buffer.peek(2) == b"aa" and len(buffer) == 12
    assert buffer.extract(6) == (b"aaaaaa", [3, 4])
    assert buffer.held_fds() == [5, 6]
    assert buffer.extract(4, skip=1) == (b"bbb", [5])
    assert buffer.extract(2, skip=2) == (b"", [6])
    assert len(buffer) == 0 and buffer.held_fds() == []


def test_clear_hands_back_every_fd_still_held() -> None:
    buffer = ReceiveBuffer()
    buffer.feed(b"x" * 12, [7, 8])
    buffer.feed(b"y", [9])
    assert buffer.extract(12) == (b"x" * 12, [7, 8])
    assert buffer.clear() == [9]
    assert len(buffer) == 0 and buffer.clear() == []
