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
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from crash_child import stepped_state
from trainers import Zygote, check_after_kill, restart_removes_temp_files

from asyncckpt.testing import deterministic_state

SEED = 20240607
SIZES = (256, 4096, 65536)  # numel per tensor: 4 KiB to 1 MiB files


@dataclass
class Kill:
    """What the parent saw of one trainer before killing it."""

    committed: int | None = None
    ops: Counter[str] = field(default_factory=Counter)
    last_op: str = "start"

    def note_committed(self, step: int) -> None:
        self.committed = step


def expected_with(numel: int) -> Callable[[int], Any]:
    """What a crash_child.py ``kill`` trainer saves at each step."""
    return lambda step: deterministic_state(step, numel=numel)


def expected_stepped(numel: int) -> Callable[[int], Any]:
    """What a crash_child.py ``stepped`` trainer saves at each step: the parameters it had then."""
    return lambda step: stepped_state(step, numel)


def run_and_kill(
    zygote: Zygote, directory: Path, first: int, numel: int, ops_before_kill: int, trainer: str = "kill"
) -> Kill:
    zygote.send(f"spawn {trainer} {directory} {first} {numel}")
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
    status = zygote.reap(pid, seen.note_committed)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    return seen


def kill_many(
    zygote: Zygote, root: Path, kills: int, faults: Counter[str], seed: int, trainer: str = "kill"
) -> None:
    expected_for = expected_stepped if trainer == "stepped" else expected_with
    rng = random.Random(seed)
    lineages = [(root / f"run{i}", SIZES[i % len(SIZES)]) for i in range(max(1, kills // 8))]
    resume: dict[Path, int | None] = {}
    for number in range(kills):
        directory, numel = rng.choice(lineages)
        directory.mkdir(exist_ok=True)
        previous = resume.get(directory)
        first = 0 if previous is None else previous + 1
        ops_before_kill = rng.randrange(0, 40)
        seen = run_and_kill(zygote, directory, first, numel, ops_before_kill, trainer)
        context = f"kill {number} (seed {seed}) in {directory.name} after op {seen.last_op}"
        resumed = check_after_kill(directory, expected_for(numel), seen.committed, first)
        if resumed is None:
            resumed = previous
        assert resumed is None or previous is None or resumed >= previous, context
        who = "trainer with an optimizer (overlapped staging)" if trainer == "stepped" else "trainer"
        faults[f"kill -9: {who} killed"] += 1
        faults[f"kill -9: killed after op {seen.last_op}"] += 1
        left = restart_removes_temp_files(directory)
        faults["kill -9: temp files left behind (removed at restart)"] += left
        resume[directory] = resumed


def test_kill9_at_random_instants_resumes_from_the_newest_committed(
    zygote: Zygote, tmp_path: Path, faults: Counter[str]
) -> None:
    kill_many(zygote, tmp_path, 25, faults, SEED)


def test_kill9_while_staging_overlaps_the_optimizer_step(
    zygote: Zygote, tmp_path: Path, faults: Counter[str]
) -> None:
    kill_many(zygote, tmp_path, 16, faults, SEED + 2, trainer="stepped")


@pytest.mark.stress
def test_kill9_stress_while_staging_overlaps(zygote: Zygote, tmp_path: Path, faults: Counter[str]) -> None:
    kill_many(zygote, tmp_path, 200, faults, SEED + 3, trainer="stepped")


@pytest.mark.stress
def test_kill9_stress(zygote: Zygote, tmp_path: Path, faults: Counter[str]) -> None:
    kill_many(zygote, tmp_path, 500, faults, SEED + 1)
