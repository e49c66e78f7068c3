"""Many kill -9s of one rank at random points of the AsyncCheckpointer's background multi-rank
saves (run with -m stress): after each, every committed step is intact, the survivors ended in
an error (not a hang), and every rank resumes from the newest committed step."""

from __future__ import annotations

import random
from pathlib import Path

import ckpt_workers as cw
import pytest
from dist_harness import run_world

from asyncckpt import dist as adist
from asyncckpt.storage import PosixStorage

pytestmark = [pytest.mark.stress, pytest.mark.timeout(1200)]
SEED = 20240614


@pytest.mark.parametrize(("world", "kills"), [(2, 12), (4, 6)])
def test_kill_one_rank_at_random_points_of_background_saves(tmp_path: Path, world: int, kills: int) -> None:
    rng = random.Random(SEED + world)
    first, killed = 1, 0
    for _ in range(kills):
        victim, ops = rng.randrange(world), rng.randrange(1, 25)  # a rank does ~7 file ops a step
        results = run_world(cw.save_loop_killed, world, str(tmp_path), victim, ops, first, deadline=120)
        assert results[victim].exitcode == -9 or results[victim].ok
        killed += results[victim].exitcode == -9
        for result in results:
            if result.rank != victim:
                assert result.ok, result.message  # an error is returned, the rank did not hang
        committed = [info.step for info in adist.committed_steps(PosixStorage(tmp_path))]
        for step in committed:
            assert adist.check_step(tmp_path, step) == [], step
        if committed:
            restored = run_world(cw.restore_only, world, str(tmp_path))
            assert all(r.ok for r in restored), [r.message for r in restored]
            assert {r.value["step"] for r in restored} == {committed[-1]}
        first += 4
    assert killed >= kills // 2
