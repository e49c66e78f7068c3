"""The checks of ``AsyncCheckpointer``'s options, before anything is opened."""

from __future__ import annotations

from typing import Literal

from ..errors import UsageError

WhenBusy = Literal["wait", "skip"]  # what save() does when every staging slot is busy


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
