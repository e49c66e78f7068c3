"""tail: complete lines only, across appends by another process, truncation and replacement."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncckpt.tail import LineFollower, follow_lines, read_lines

# A writer process driven over stdin, one command per line; it answers "ok" once the bytes are
# in the file, so the test knows exactly what a reader can see (no sleeping, no guessing).
WRITER = r"""
import os, sys
path = sys.argv[1]
for command in sys.stdin:
    op, _, text = command.rstrip("\n").partition(" ")
    data = text.encode().decode("unicode_escape").encode()
    if op == "append":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(fd, data)
        os.close(fd)
    elif op == "truncate":  # truncate in place (same inode), then write
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(data)
    elif op == "replace":  # a new file renamed over the old name (new inode)
        with open(path + ".new", "wb") as f:
            f.write(data)
        os.replace(path + ".new", path)
    print("ok", flush=True)
"""


class Writer:
    """Another process appending to, truncating and replacing one file on command."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def do(self, op: str, text: str = "") -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        escaped = text.encode("unicode_escape").decode()
        self.process.stdin.write(f"{op} {escaped}\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline() == "ok\n", "the writer process died"

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(timeout=30) == 0


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Writer]:
    w = Writer(tmp_path / "events.jsonl")
    yield w
    w.close()


def poll_until(follower: LineFollower, count: int, timeout: float = 30.0) -> list[str]:
    """Poll until ``count`` lines came (the writer has already acked, so one poll usually does)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while len(lines) < count:
        assert time.monotonic() < deadline, f"only {lines!r} after {timeout} s"
        lines += follower.poll()
    return lines


def test_poll_waits_for_a_file_that_does_not_exist_yet(tmp_path: Path, writer: Writer) -> None:
    with LineFollower(tmp_path / "events.jsonl") as follower:
        assert follower.poll() == []
        writer.do("append", "first\n")
        assert follower.poll() == ["first"]


def test_half_written_line_from_another_process_is_held_back(tmp_path: Path, writer: Writer) -> None:
    with LineFollower(tmp_path / "events.jsonl") as follower:
        writer.do("append", "one\ntw")
        assert follower.poll() == ["one"]
        assert follower.poll() == []  # "tw" is in the file, but its newline is not
        writer.do("append", "o\nthr")
        assert follower.poll() == ["two"]
        writer.do("append", "ee\n")
        assert follower.poll() == ["three"]


def test_truncation_starts_again_from_the_top(tmp_path: Path, writer: Writer) -> None:
    with LineFollower(tmp_path / "events.jsonl") as follower:
        writer.do("append", "a long first line\na long second line\n")
        assert follower.poll() == ["a long first line", "a long second line"]
        writer.do("truncate", "short\n")
        assert follower.poll() == ["short"]


def test_truncation_drops_a_pending_half_line(tmp_path: Path, writer: Writer) -> None:
    with LineFollower(tmp_path / "events.jsonl") as follower:
        writer.do("append", "complete line\nhalf of a line that will be lost")
        assert follower.poll() == ["complete line"]
        writer.do("truncate", "new\n")
        assert follower.poll() == ["new"]


def test_replaced_file_is_drained_then_followed_from_the_top(tmp_path: Path, writer: Writer) -> None:
    path = tmp_path / "events.jsonl"
    with LineFollower(path) as follower:
        writer.do("append", "old 1\n")
        assert follower.poll() == ["old 1"]
        old_fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # a writer that still has the old file open
        writer.do("replace", "new 1\nnew 2\n")
        os.write(old_fd, b"old 2\n")
        os.close(old_fd)
        assert follower.poll() == ["old 2", "new 1", "new 2"]
        writer.do("append", "new 3\n")
        assert follower.poll() == ["new 3"]


def test_removed_file_is_waited_for(tmp_path: Path, writer: Writer) -> None:
    path = tmp_path / "events.jsonl"
    with LineFollower(path) as follower:
        writer.do("append", "before\n")
        assert follower.poll() == ["before"]
        path.unlink()
        assert follower.poll() == []
        writer.do("append", "after\n")
        assert poll_until(follower, 1) == ["after"]


def test_crlf_and_invalid_utf8_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"windows\r\n\xff\xfe\n")
    assert read_lines(path) == ["windows", "\ufffd\ufffd"]


def test_read_lines_leaves_out_the_half_written_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("one\ntwo\nthr")
    assert read_lines(path) == ["one", "two"]


def test_read_lines_of_a_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_lines(tmp_path / "missing.jsonl")


def test_follow_lines_ends_on_idle_timeout(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("a\nb\n")
    assert list(follow_lines(path, poll_interval=0.01, idle_timeout=0.05)) == ["a", "b"]


def test_follow_lines_ends_when_stop_says_so(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("a\n")
    polls = []

    def stop() -> bool:
        polls.append(1)
        return len(polls) >= 3

    assert list(follow_lines(path, poll_interval=0.001, stop=stop)) == ["a"]
    assert len(polls) == 3


def test_follow_lines_yields_lines_another_process_appends(tmp_path: Path, writer: Writer) -> None:
    path = tmp_path / "events.jsonl"
    writer.do("append", "first\n")
    lines = follow_lines(path, poll_interval=0.01, idle_timeout=30)
    assert next(lines) == "first"
    writer.do("append", "second\nthi")
    assert next(lines) == "second"
    writer.do("append", "rd\n")
    assert next(lines) == "third"
    lines.close()  # closing the generator closes the file


def test_unreadable_path_raises(tmp_path: Path) -> None:
    with LineFollower(tmp_path) as follower, pytest.raises(IsADirectoryError):
        follower.poll()
