"""Crash at a random instant: SIGKILL a trainer that saves in a loop, then resume.

After each kill: ``load_latest`` returns the newest step the trainer reported committed (or a
newer one it finished in between), bit for bit; every file under a final name is complete; no
temp file is loaded; the next start removes the temp files. The kill instant is random: after a
random number of the trainer's announced file operations (so kills land in every phase of the
protocol: writing, fsync, rename, directory fsync, retention), in a random lineage of runs.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import asyncckpt
from asyncckpt import AsyncCheckpointer
from asyncckpt.loader import load_latest
from asyncckpt.storage import is_temp_name, parse_checkpoint_name, temp_files
from asyncckpt.testing import deterministic_state, states_equal

CHILD = Path(__file__).with_name("crash_child.py")
SEED = 20240607
LINE_TIMEOUT = 60.0
SIZES = (256, 4096, 65536)  # numel per tensor: 4 KiB to 1 MiB files


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

    def close(self) -> None:
        self._in.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    spawner = Zygote()
    yield spawner
    spawner.close()


@dataclass
class Kill:
    """What the parent saw of one trainer before killing it."""

    committed: int | None = None
    ops: Counter[str] = field(default_factory=Counter)
    last_op: str = "start"


def run_and_kill(zygote: Zygote, directory: Path, first: int, numel: int, ops_before_kill: int) -> Kill:
    zygote.send(f"spawn {directory} {first} {numel}")
    seen = Kill()
    pid: int | None = None
    while pid is None or sum(seen.ops.values()) < ops_before_kill:
        kind, _, value = zygote.line().partition(" ")
        if kind == "pid":
            pid = int(value)
        elif kind == "op":
            seen.ops[value] += 1
            seen.last_op = value
        elif kind == "committed":
            seen.committed = int(value)
    os.kill(pid, signal.SIGKILL)
    zygote.send(f"reap {pid}")
    while True:
        kind, _, value = zygote.line().partition(" ")
        if kind == "committed":  # reported before the kill landed
            seen.committed = int(value)
        elif kind == "reaped":
            reaped, status = map(int, value.split())
            assert reaped == pid
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
            return seen


def check_after_kill(directory: Path, numel: int, committed: int | None, first: int) -> int | None:
    """The resume promise after a kill; returns the step resumed from (None: nothing yet)."""
    on_disk = asyncckpt.list_checkpoints(directory)
    for info in on_disk:  # every file under a final name is complete and exact
        assert states_equal(asyncckpt.load(info.path).state, deterministic_state(info.step, numel=numel))
    if not on_disk:
        assert committed is None and first == 0, "a committed checkpoint is missing"
        return None
    result = load_latest(directory, log=quiet)
    assert parse_checkpoint_name(result.path.name) == result.step and not is_temp_name(result.path.name)
    assert result.diagnostics == [], result.summary
    if committed is not None:
        assert result.step >= committed, f"resumed from {result.step}, {committed} was committed"
    assert states_equal(result.state, deterministic_state(result.step, numel=numel))
    return result.step


def restart_removes_temp_files(directory: Path) -> int:
    leftovers = temp_files(directory)
    before = asyncckpt.list_checkpoints(directory)
    with AsyncCheckpointer(directory):
        assert temp_files(directory) == []
    assert asyncckpt.list_checkpoints(directory) == before
    return len(leftovers)


def kill_many(zygote: Zygote, root: Path, kills: int, faults: Counter[str], seed: int) -> None:
    rng = random.Random(seed)
    lineages = [(root / f"run{i}", SIZES[i % len(SIZES)]) for i in range(max(1, kills // 8))]
    resume: dict[Path, int | None] = {}
    for number in range(kills):
        directory, numel = rng.choice(lineages)
        directory.mkdir(exist_ok=True)
        previous = resume.get(directory)
        first = 0 if previous is None else previous + 1
        ops_before_kill = rng.randrange(0, 40)
        seen = run_and_kill(zygote, directory, first, numel, ops_before_kill)
        context = f"kill {number} (seed {seed}) in {directory.name} after op {seen.last_op}"
        resumed = check_after_kill(directory, numel, seen.committed, first)
        if resumed is None:
            resumed = previous
        assert resumed is None or previous is None or resumed >= previous, context
        faults["kill -9: trainer killed"] += 1
        faults[f"kill -9: killed after op {seen.last_op}"] += 1
        left = restart_removes_temp_files(directory)
        faults["kill -9: temp files left behind (removed at restart)"] += left
        resume[directory] = resumed


def test_kill9_at_random_instants_resumes_from_the_newest_committed(
    zygote: Zygote, tmp_path: Path, faults: Counter[str]
) -> None:
    kill_many(zygote, tmp_path, 25, faults, SEED)


@pytest.mark.stress
def test_kill9_stress(zygote: Zygote, tmp_path: Path, faults: Counter[str]) -> None:
    kill_many(zygote, tmp_path, 500, faults, SEED + 1)
