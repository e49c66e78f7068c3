"""The checks of ``AsyncCheckpointer``'s options, before anything is opened."""

from __future__ import annotations

from typing import Literal

from ..errors import UsageError

WhenBusy = Literal["wait", "skip"]  # what save() does when every staging slot is busy

# Nice levels the writer's threads run below the trainer's. 0 (off) until a benefit is measured:
# on the loaded 2-core VM, 10 tripled the time to durable and no change in training speed could
# be told from the noise (docs/OPERATIONS.md, "The writer's CPU priority").
DEFAULT_BACKGROUND_NICE = 0
MAX_BACKGROUND_NICE = 19


def check_options(
    when_busy: str,
    verify: str,
    keep_last: int | None,
    keep_every: int | None,
    max_pending: int,
    close_timeout: float | None,
) -> None:
    """Raise :class:`UsageError` for the first bad option."""
    if when_busy not in ("wait", "skip"):
        raise UsageError(f"when_busy must be 'wait' or 'skip', got {when_busy!r}")
    if verify not in ("full", "structure", "none"):
        raise UsageError(f"verify must be 'full', 'structure' or 'none', got {verify!r}")
    if keep_last is not None and keep_last < 1:
        raise UsageError(f"keep_last must be >= 1 or None, got {keep_last}")
    if keep_every is not None and keep_every < 1:
        raise UsageError(f"keep_every must be >= 1 or None, got {keep_every}")
    if max_pending < 1:
        raise UsageError(f"max_pending must be >= 1, got {max_pending}")
    if close_timeout is not None and not close_timeout >= 0:
        raise UsageError(f"close_timeout must be >= 0 or None, got {close_timeout}")


def check_background_nice(background_nice: object) -> int:
    """``background_nice`` as an int from 0 to 19; else raise :class:`UsageError`."""
    if (
        isinstance(background_nice, bool)
        or not isinstance(background_nice, int)
        or not 0 <= background_nice <= MAX_BACKGROUND_NICE
    ):
        raise UsageError(
            f"background_nice must be an int from 0 (leave the writer's threads as they are) to "
            f"{MAX_BACKGROUND_NICE} (lowest priority), got {background_nice!r}; a negative value "
            "would raise their priority above the trainer's, which asyncckpt never does"
        )
    return background_nice
