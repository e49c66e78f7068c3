"""Which committed checkpoints to keep."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..catalog import CheckpointInfo


def prunable(
    checkpoints: Sequence[CheckpointInfo],
    *,
    keep_last: int,
    keep_every: int | None,
    protect: Path,
) -> list[CheckpointInfo]:
    """The checkpoints retention may delete, oldest first.

    Kept: the ``keep_last`` newest steps, every step divisible by ``keep_every``, and ``protect``
    (the checkpoint just committed, which is the newest valid one whatever else the directory holds).
    """
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    ordered = sorted(checkpoints, key=lambda c: c.step)
    newest = {c.path for c in ordered[max(len(ordered) - keep_last, 0) :]} if keep_last else set()
    return [
        c
        for c in ordered
        if c.path not in newest and c.path != protect and not (keep_every and c.step % keep_every == 0)
    ]
