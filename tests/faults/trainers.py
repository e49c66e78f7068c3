"""The parent's side of the crash tests: drive crash_child.py's trainers, check what they left."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncckpt
from asyncckpt import AsyncCheckpointer
from asyncckpt.catalog import checkpoint_name, parse_checkpoint_name
from asyncckpt.loading import load_latest
from asyncckpt.storage import is_temp_name
from asyncckpt.testing import states_equal, temp_files

CHILD = Path(__file__).with_name("crash_child.py")
LINE_TIMEOUT = 60.0
HANG_TIMEOUT = 30.0  # a trainer not gone this long after its signal is hung
PROBE_STEP = 10**9  # restart_removes_temp_files saves it (past every trainer step), then deletes it


def quiet(*_: object, **__: object) -> None:
    """A ``log`` for load_latest that drops the summary."""


class Zygote:
    """The parent's side of crash_child.py's protocol."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).parents[2],
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._in = self.process.stdin
        self._out = self.process.stdout.fileno()
        self._buffer = b""
        assert self.line() == "ready"

    def line(self) -> str:
        deadline = time.monotonic() + LINE_TIMEOUT
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._out], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"no line from the trainer in {LINE_TIMEOUT} s")
            chunk = os.read(self._out, 65536)
            if not chunk:
                raise EOFError("the zygote exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def send(self, command: str) -> None:
        self._in.write((command + "\n").encode())
        self._in.flush()

    def reap(self, pid: int, on_committed: Callable[[int], None]) -> int:
        """Wait for trainer ``pid`` to exit; return its wait status. ``committed`` lines it wrote
        before it died go to ``on_committed``; a trainer still alive after HANG_TIMEOUT fails."""
        self.send(f"reap {pid} {HANG_TIMEOUT}")
        while True:
            kind, _, value = self.line().partition(" ")
            if kind == "committed":
                on_committed(int(value))
            elif kind == "hung":
                raise AssertionError(f"trainer {pid} did not exit within {HANG_TIMEOUT} s of its signal")
            elif kind == "reaped":
                reaped, status = map(int, value.split())
                assert reaped == pid
                return status

    def close(self) -> None:
        self._in.close()
        self.process.wait(timeout=30)


def check_after_kill(
    directory: Path, expected: Callable[[int], Any], committed: int | None, first: int
) -> int | None:
    """The resume promise after a kill; returns the step resumed from (None: nothing yet).

    ``expected(step)`` is the state the trainer saved at ``step``; ``committed`` the newest step
    it reported committed; ``first`` the step it started at."""
    on_disk = asyncckpt.list_checkpoints(directory)
    for info in on_disk:  # every file under a final name is complete and exact
        assert states_equal(asyncckpt.load(info.path).state, expected(info.step)), info.path
    if not on_disk:
        assert committed is None and first == 0, "a committed checkpoint is missing"
        return None
    result = load_latest(directory, log=quiet)
    assert parse_checkpoint_name(result.path.name) == result.step and not is_temp_name(result.path.name)
    assert result.diagnostics == [], result.summary
    if committed is not None:
        assert result.step >= committed, f"resumed from {result.step}, {committed} was committed"
    assert states_equal(result.state, expected(result.step))
    return result.step


def restart_removes_temp_files(directory: Path) -> int:
    """A restarted run removes the temp files left behind at its first save (and opening it
    removes nothing). The probe step it saves for that is deleted again."""
    leftovers = temp_files(directory)
    before = asyncckpt.list_checkpoints(directory)
    probe = checkpoint_name(PROBE_STEP)
    with AsyncCheckpointer(directory, keep_last=None) as ckpt:
        assert temp_files(directory) == leftovers
        ckpt.save(PROBE_STEP, {"probe": PROBE_STEP}).result(timeout=60)
        assert temp_files(directory) == []
        ckpt.delete(probe)
    assert asyncckpt.list_checkpoints(directory) == before
    return len(leftovers)
