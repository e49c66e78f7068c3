"""Many kill -9s of one rank at random points of multi-rank saves (run with -m stress): the
blocking ``save_step`` at world size 2, and the AsyncCheckpointer's background saves at world
sizes 2 and 4. After each kill every committed step is intact, the survivors ended in an error
(not a hang), and every rank resumes from the newest committed step.

The ranks run through tests/dist's harness (processes of one forkserver, each world bounded by
a deadline); its directory goes on ``sys.path`` here, as pytest puts it there for tests/dist.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))

import ckpt_workers as cw  # noqa: E402
import dist_workers as workers  # noqa: E402
from dist_harness import RankResult, run_world  # noqa: E402

from asyncckpt import dist as adist  # noqa: E402
from asyncckpt.storage import PosixStorage  # noqa: E402

pytestmark = [pytest.mark.stress, pytest.mark.timeout(1200)]
SEED_SAVE_STEP = 20240613
SEED_CHECKPOINTER = 20240614


def check_after_kill(root: Path, results: list[RankResult], victim: int, faults: Counter[str]) -> bool:
    """Every committed step intact and every rank resuming from the newest; whether the victim
    died (it may also have finished before its kill point)."""
    world = len(results)
    assert results[victim].exitcode == -9 or results[victim].ok
    committed = [info.step for info in adist.committed_steps(PosixStorage(root))]
    for step in committed:
        assert adist.check_step(root, step) == [], step
    if committed:
        restored = run_world(cw.restore_only, world, str(root))
        assert all(r.ok for r in restored), [r.message for r in restored]
        assert {r.value["step"] for r in restored} == {committed[-1]}
    killed = results[victim].exitcode == -9
    faults[f"multi-rank kill -9: world {world}, one rank killed"] += killed
    return killed


def test_kill_one_rank_at_random_points_of_saves(tmp_path: Path, faults: Counter[str]) -> None:
    rng = random.Random(SEED_SAVE_STEP)
    first, killed, kills = 1, 0, 12
    for _ in range(kills):
        victim, ops = rng.randrange(2), rng.randrange(1, 60)
        results = run_world(workers.save_loop_and_die, 2, str(tmp_path), victim, ops, first)
        # (run_world fails on a rank still running at its deadline: the survivor raised or saved)
        killed += check_after_kill(tmp_path, results, victim, faults)
        adist.remove_uncommitted(tmp_path)
        first += 4
    assert killed >= kills // 2


@pytest.mark.parametrize(("world", "kills"), [(2, 12), (4, 6)])
def test_kill_one_rank_at_random_points_of_background_saves(
    tmp_path: Path, world: int, kills: int, faults: Counter[str]
) -> None:
    rng = random.Random(SEED_CHECKPOINTER + world)
    first, killed = 1, 0
    for _ in range(kills):
        victim, ops = rng.randrange(world), rng.randrange(1, 25)  # a rank does ~7 file ops a step
        results = run_world(cw.save_loop_killed, world, str(tmp_path), victim, ops, first, deadline=120)
        for result in results:
            if result.rank != victim:
                assert result.ok, result.message  # an error is returned, the rank did not hang
        killed += check_after_kill(tmp_path, results, victim, faults)
        first += 4
    assert killed >= kills // 2
