"""Which committed checkpoints to keep."""

from __future__ import annotations

from collections.abc import Sequence

from ..catalog import CheckpointInfo
from ..errors import UsageError
from ..storage import CheckpointPath


def prunable(
    checkpoints: Sequence[CheckpointInfo],
    *,
    keep_last: int,
    keep_every: int | None,
    protect: CheckpointPath,
) -> list[CheckpointInfo]:
    """The checkpoints retention may delete, oldest first.

    Kept: the ``keep_last`` newest steps (never fewer than the newest one), every step divisible
    by ``keep_every``, and ``protect`` (the checkpoint just committed, which is the newest valid
    one whatever else the directory holds). Raises :class:`asyncckpt.errors.UsageError` for a
    negative ``keep_last``.
    """
    if keep_last < 0:
        raise UsageError(f"keep_last must be >= 0, got {keep_last}")
    ordered = sorted(checkpoints, key=lambda c: c.step)
    newest = {c.path for c in ordered[-max(keep_last, 1) :]}
    return [
        c
        for c in ordered
        if c.path not in newest and c.path != protect and not (keep_every and c.step % keep_every == 0)
    ]
