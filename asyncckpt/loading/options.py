"""The load side's options, one vocabulary everywhere: ``verify``, ``on_corrupt``, ``map_location``.

``verify="full"`` checks what a resume checks: the structure and every checksum (every tensor
blob's CRC32C; legacy files through their own checksums where they have them).
``verify="structure"`` checks the prelude, trailer and header (with their checksums) and every
length against the file size, but not the tensor data. ``verify="none"`` reads the same way as
``"structure"``: a file has to be decoded to be loaded, so its structure is always checked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch

from ..errors import UsageError

Verify = Literal["full", "structure", "none"]
Check = Literal["full", "structure"]  # check_candidates: only what says something about the bytes
OnCorrupt = Literal["fallback", "fail"]
MapLocation = str | torch.device
Log = Callable[..., None]

VERIFY_MODES: tuple[Verify, ...] = ("full", "structure", "none")
CHECK_MODES: tuple[Check, ...] = ("full", "structure")
ON_CORRUPT_MODES: tuple[OnCorrupt, ...] = ("fallback", "fail")

Mode = TypeVar("Mode", bound=str)


def one_of(name: str, value: Any, allowed: tuple[Mode, ...]) -> Mode:
    """``value`` when it is one of ``allowed``; else :class:`UsageError` naming the option."""
    for mode in allowed:
        if value == mode:
            return mode
    choices = " or ".join(repr(mode) for mode in allowed)
    raise UsageError(f"{name} must be {choices}, got {value!r}")
