"""storage/posix.py: the sink's batched writes (writev) and the FileOps seam they go through."""

from __future__ import annotations

import os
from pathlib import Path

from asyncckpt.storage import FileOps
from asyncckpt.storage.posix import FdSink


class ShortWritev(FileOps):
    """writev that writes at most 5 bytes a call, cutting buffers in the middle."""

    def __init__(self) -> None:
        self.calls = 0

    def writev(self, fd: int, buffers: list[memoryview | bytes]) -> int:  # type: ignore[override]
        self.calls += 1
        data = b"".join(bytes(b) for b in buffers)[:5]
        return os.write(fd, data)


class WriteOnly(FileOps):
    """A fault seam that only knows ``write`` (like the test doubles of asyncckpt.testing)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, fd: int, data: memoryview | bytes) -> int:
        self.writes.append(bytes(data))
        return super().write(fd, data)


def written(tmp_path: Path, ops: FileOps, buffers: list[bytes | memoryview]) -> bytes:
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        FdSink(fd, ops).writev(buffers)
    finally:
        os.close(fd)
    return path.read_bytes()


def test_writev_retries_short_writes_in_the_middle_of_a_buffer(tmp_path: Path) -> None:
    ops = ShortWritev()
    buffers: list[bytes | memoryview] = [b"abc", memoryview(b"defghij"), b"", b"klmnopqrstu"]
    assert written(tmp_path, ops, buffers) == b"abcdefghijklmnopqrstu"
    assert ops.calls == 5  # 21 bytes, 5 a call


def test_writev_of_more_buffers_than_the_system_takes_at_once(tmp_path: Path) -> None:
    buffers: list[bytes | memoryview] = [bytes([i % 256]) * 3 for i in range(5000)]
    assert written(tmp_path, FileOps(), buffers) == b"".join(bytes(b) for b in buffers)


def test_a_seam_that_overrides_only_write_sees_every_buffer(tmp_path: Path) -> None:
    ops = WriteOnly()
    assert written(tmp_path, ops, [b"ab", b"cd", b"ef"]) == b"abcdef"
    assert ops.writes == [b"ab", b"cd", b"ef"]  # its faults apply to each, as before batching
