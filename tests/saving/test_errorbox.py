"""save/errorbox.py: background failures wait, oldest first, until the trainer sees them."""

from __future__ import annotations

import pytest

from asyncckpt.errors import CheckpointWriteError
from asyncckpt.saving.errorbox import ErrorBox


def test_an_empty_box_raises_nothing() -> None:
    ErrorBox().raise_first()


def test_the_oldest_failure_is_raised_with_the_others_as_notes_in_order() -> None:
    box = ErrorBox()
    first, second, third = (CheckpointWriteError(f"step {s} failed", step=s) for s in (1, 2, 3))
    for error in (first, second, third):
        box.put(error)

    with pytest.raises(CheckpointWriteError) as info:
        box.raise_first()

    assert info.value is first
    assert first.__notes__ == ["also failed: step 2 failed", "also failed: step 3 failed"]
    box.raise_first()  # all were cleared


def test_discard_forgets_exactly_the_error_seen_through_its_handle() -> None:
    box = ErrorBox()
    seen, twin, other = CheckpointWriteError("same"), CheckpointWriteError("same"), CheckpointWriteError("x")
    for error in (seen, twin, other):
        box.put(error)

    box.discard(seen)

    with pytest.raises(CheckpointWriteError) as info:
        box.raise_first()
    assert info.value is twin and twin.__notes__ == ["also failed: x"]
