"""save/retention.py: which committed checkpoints retention may delete."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncckpt.catalog import CheckpointInfo, checkpoint_name
from asyncckpt.errors import UsageError
from asyncckpt.saving.retention import prunable

ROOT = Path("/run")


def infos(*steps: int) -> list[CheckpointInfo]:
    return [CheckpointInfo(step, ROOT / checkpoint_name(step), 100, datetime.now(UTC)) for step in steps]


def steps_of(checkpoints: list[CheckpointInfo]) -> list[int]:
    return [c.step for c in checkpoints]


def test_keeps_the_last_and_every_nth_and_returns_the_rest_oldest_first() -> None:
    doomed = prunable(infos(9, 1, 4, 10, 2, 8), keep_last=2, keep_every=4, protect=ROOT / checkpoint_name(10))
    assert steps_of(doomed) == [1, 2]


def test_keeps_the_just_committed_checkpoint_even_when_it_is_not_among_the_newest() -> None:
    doomed = prunable(infos(410, 500), keep_last=1, keep_every=None, protect=ROOT / checkpoint_name(410))
    assert doomed == []


def test_never_deletes_the_newest() -> None:
    checkpoints = infos(1, 2, 3)
    doomed = prunable(checkpoints, keep_last=0, keep_every=None, protect=ROOT / checkpoint_name(1))
    assert steps_of(doomed) == [2]


def test_nothing_to_prune() -> None:
    assert prunable([], keep_last=1, keep_every=None, protect=ROOT / checkpoint_name(1)) == []


def test_negative_keep_last_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="keep_last must be >= 0"):
        prunable(infos(1), keep_last=-1, keep_every=None, protect=ROOT / checkpoint_name(1))


@given(
    steps=st.sets(st.integers(0, 60), max_size=20),
    keep_last=st.integers(0, 5),
    keep_every=st.none() | st.integers(1, 7),
    protect=st.integers(0, 60),
)
def test_what_is_deleted_is_exactly_what_no_rule_keeps(
    steps: set[int], keep_last: int, keep_every: int | None, protect: int
) -> None:
    checkpoints = infos(*steps)
    doomed = prunable(
        checkpoints, keep_last=keep_last, keep_every=keep_every, protect=ROOT / checkpoint_name(protect)
    )

    ordered = sorted(steps)
    kept_last = set(ordered[-max(keep_last, 1) :]) if ordered else set()
    expected = [
        s for s in ordered if s not in kept_last and s != protect and not (keep_every and s % keep_every == 0)
    ]
    assert steps_of(doomed) == expected
    if ordered:
        assert ordered[-1] not in steps_of(doomed)  # the newest always stays
