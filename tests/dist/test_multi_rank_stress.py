"""Many kill -9s of one rank at random points of multi-rank saves (run with -m stress): after
each, every committed step is intact and every rank resumes from the newest one."""

from __future__ import annotations

import random
from pathlib import Path

import dist_workers as workers
import pytest
from dist_harness import run_world

from asyncckpt import dist as adist
from asyncckpt.storage import PosixStorage

pytestmark = [pytest.mark.stress, pytest.mark.timeout(900)]
SEED = 20240613
KILLS = 12


def test_kill_one_rank_at_random_points_of_saves(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    first, killed = 1, 0
    for _ in range(KILLS):
        victim, ops = rng.randrange(2), rng.randrange(1, 60)
        results = run_world(workers.save_loop_and_die, 2, str(tmp_path), victim, ops, first)
        assert results[victim].exitcode == -9 or results[victim].ok
        killed += results[victim].exitcode == -9
        committed = [info.step for info in adist.committed_steps(PosixStorage(tmp_path))]
        for step in committed:
            assert adist.check_step(tmp_path, step) == [], step
        if committed:
            restored = run_world(workers.restore_fsdp, 2, str(tmp_path))
            assert all(r.ok for r in restored) and {r.value["step"] for r in restored} == {committed[-1]}
        adist.remove_uncommitted(tmp_path)
        first += 4
    assert killed >= KILLS // 2
