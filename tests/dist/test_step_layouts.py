"""The last multi-rank save's layout (asyncckpt.dist.layouts) is reused while the split state
keeps its shape, and planned afresh after any change of it: keys, shapes, a tensor replaced,
DTensor placements; each save restores right after it, whole. A save leaves no per-item records
alive behind it."""

from __future__ import annotations

from pathlib import Path

import layout_workers as lw
import pytest
from dist_harness import RankResult, run_world

pytestmark = pytest.mark.timeout(180)

# After each save of layout_follows_changes (step 1 missed): the cache's hits and misses.
EXPECTED = [
    ("same", (1, 1)),
    ("in place", (2, 1)),
    ("tensor replaced", (2, 2)),
    ("again", (3, 2)),
    ("shape", (3, 3)),
    ("again", (4, 3)),
    ("keys", (4, 4)),
    ("again", (5, 4)),
    ("placements", (5, 5)),
    ("again", (6, 5)),
]


def values(results: list[RankResult]) -> list[dict]:
    for result in results:
        assert result.ok, f"rank {result.rank} (exit {result.exitcode}): {result.error}: {result.message}"
    return [result.value for result in results]


@pytest.mark.parametrize("world", [1, 2])
def test_a_changed_structure_is_planned_afresh_and_restores(tmp_path: Path, world: int) -> None:
    for rank in values(run_world(lw.layout_follows_changes, world, str(tmp_path), deadline=150)):
        assert [(save["change"], save["counts"]) for save in rank["saves"]] == EXPECTED
        for step, save in enumerate(rank["saves"], start=2):
            assert save["step"] == step, save
            assert save["differences"] == [], save


@pytest.mark.parametrize("world", [1, 2])
def test_no_item_locations_outlive_a_save(tmp_path: Path, world: int) -> None:
    # DCP's plan cache keeps the step's Metadata until the next save; the commit record holds the
    # item locations, so they must not stay on it (40 records per save would reach the old
    # generation of the collector).
    for rank in values(run_world(lw.item_records_left, world, str(tmp_path), deadline=120)):
        assert rank["left"] == 0


@pytest.mark.parametrize("world", [1, 2])
def test_a_state_that_changes_on_every_save_rests_the_fingerprint(tmp_path: Path, world: int) -> None:
    for rank in values(run_world(lw.rng_every_save, world, str(tmp_path), deadline=150)):
        # Step 1 has no layout; steps 2 and 3 differ from it: steps 4-10 plan without a
        # fingerprint, step 11 tries again (and differs), step 12 rests.
        assert rank["counts"] == (0, 4, 8)
        assert rank["step"] == 12 and rank["differences"] == []


@pytest.mark.parametrize("world", [1, 2])
def test_a_state_whose_numbers_change_restores_each_save(tmp_path: Path, world: int) -> None:
    # The single-process structure cache keeps a structure whose tree holds the numbers of the
    # save it was laid out from; the multi-rank layout (keyed on this save's numbers) must not
    # reuse that tree, nor the DTensors' watch drop this save's own.
    for rank in values(run_world(lw.changing_numbers, world, str(tmp_path), deadline=150)):
        for save in rank["saves"]:
            assert save["restored"] == save["saved"], rank["saves"]
            assert save["differences"] == [], save
