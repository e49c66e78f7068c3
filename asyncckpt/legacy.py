"""Read-only loading of pre-versioned ``torch.save`` files (format "0.x").

They are unpickled with ``weights_only=True`` only: a pickle that tries to run code is refused
with a :class:`CorruptedCheckpointError` and nothing in it runs. They are never written or converted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .errors import CorruptedCheckpointError

LEGACY_VERSION = "0.x"
LEGACY_SUFFIXES = (".pt", ".pth")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"
_NUMBER = re.compile(r"(\d+)")


def is_zip_torch_save(head: bytes) -> bool:
    """Whether the first bytes are those of a zip ``torch.save`` file (the only kind ``mmap`` reads)."""
    return head.startswith(_ZIP_MAGIC)


def looks_like_torch_save(head: bytes) -> bool:
    """Whether the first bytes of a file are those of a ``torch.save`` file (zip or raw pickle)."""
    return head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)


def load_legacy(path: Path, *, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """Unpickle a ``torch.save`` file with ``weights_only=True``; refuse anything else.

    ``mmap=True`` (zip files only) maps the tensor data instead of reading it: a cheap way to
    read the pickled structure, e.g. for :func:`legacy_step`.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptedCheckpointError(
            f"{path}: legacy torch.save file refused (weights_only=True): {reason}"
        ) from None


def legacy_step(state: Any, path: Path) -> int | None:
    """The step of a legacy checkpoint: its ``step`` / ``global_step`` entry, else the last
    number in its file name; None when neither says."""
    if isinstance(state, dict):
        for key in ("step", "global_step"):
            value = state.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
                return int(value.item())
    numbers = _NUMBER.findall(path.stem)
    return int(numbers[-1]) if numbers else None
