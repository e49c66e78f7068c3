"""Replicated (DDP) state in distributed mode: each rank stages and writes only its share of
the replicated tensors, the step stays complete, and every rank restores all of it."""

from __future__ import annotations

from pathlib import Path

import pytest
import share_workers as sw
from dist_harness import RankResult, run_world

import asyncckpt
from asyncckpt import dist as adist
from asyncckpt.dist.share import spread
from asyncckpt.testing import states_equal

pytestmark = pytest.mark.timeout(180)


def values(results: list[RankResult]) -> list[dict]:
    for result in results:
        assert result.ok, f"rank {result.rank} (exit {result.exitcode}): {result.error}: {result.message}"
    return [result.value for result in results]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_rank_stages_its_share_and_every_rank_restores_all(tmp_path: Path, world: int) -> None:
    ranks = values(run_world(sw.ddp_saves_its_share, world, str(tmp_path), deadline=120))

    replicated = {r["stats"]["replicated_bytes"] for r in ranks}
    assert len(replicated) == 1 and replicated.pop() > 0
    total = ranks[0]["stats"]["replicated_bytes"]
    staged = [r["stats"]["staged_bytes"] for r in ranks]
    assert sum(staged) == total  # each replicated tensor staged by exactly one rank
    assert max(staged) <= total / world + ranks[0]["largest"]  # ~1/world each
    assert all(r["decisions"] == min(world - 1, 1) for r in ranks)  # decided once (none alone), reused
    # The steps are complete and verify; every rank restored step 2 whole, bit for bit.
    assert [info.step for info in adist.committed_steps(tmp_path)] == [1, 2]
    assert adist.check_step(tmp_path, 1) == [] and adist.check_step(tmp_path, 2) == []
    assert all(r["restored"] == 2 for r in ranks)
    for r in ranks:
        assert states_equal(r["state"], ranks[0]["saved"])
    whole = asyncckpt.load_latest(tmp_path)
    saved_model = {k.removeprefix("module."): v for k, v in ranks[0]["saved"]["model"].items()}
    assert sorted(whole.state["model"]) == sorted(saved_model)  # (in the order the shards hold them)
    assert all(states_equal(whole.state["model"][key], saved_model[key]) for key in saved_model)


def test_replicated_tensors_that_differ_between_ranks_fail_the_step_everywhere(tmp_path: Path) -> None:
    ranks = values(run_world(sw.replicas_differ, 2, str(tmp_path)))

    for r in ranks:
        assert r["error"] is not None and "replicated tensors" in r["error"], r
        assert r["rank"] == 1 and r["step"] == 1
    assert adist.committed_steps(tmp_path) == []


def test_spread_is_balanced_and_deterministic() -> None:
    sizes = [100, 1, 100, 50, 50, 0, 100]
    owners = spread(sizes, 3)
    assert owners == spread(list(sizes), 3)
    loads = [sum(s for s, o in zip(sizes, owners, strict=True) if o == rank) for rank in range(3)]
    assert max(loads) - min(loads) <= max(sizes)
    assert spread(sizes, 1) == [0] * len(sizes)
