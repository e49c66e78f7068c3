"""The one place that knows names: checkpoint identity (step) ⇄ object names, file kinds, order.

A committed single-file step is ``step-0000000300.ckpt`` (its rename was the commit). A file a
caller named itself (``AsyncCheckpointer.save(..., name="last.ckpt")``, any other ``*.ckpt``) is
a checkpoint whose step is read from its header. Legacy ``torch.save`` files (``*.pt``,
``*.pth``) are candidates too, read-only. Newest-first order puts a higher step first and, for one
step, an asyncckpt file before a legacy one, then the later write first.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from .errors import UsageError
from .storage import Storage, StoredObject, is_temp_name, open_storage

CHECKPOINT_SUFFIX = ".ckpt"
LEGACY_SUFFIXES = (".pt", ".pth")
FAILED_LOG_NAME = "failed_checkpoints.txt"
MAX_STEP = 2**63 - 1
_CHECKPOINT_NAME = re.compile(r"^step-(\d{1,19})\.ckpt$")

Kind = Literal["checkpoint", "named", "legacy", "temp"]


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint found in a directory: its step, file, size and modification time."""

    step: int
    path: Path
    size: int
    created: datetime


def checkpoint_name(step: int) -> str:
    """The object name of ``step``'s checkpoint: ``step-0000000300.ckpt``.

    Raises :class:`asyncckpt.UsageError` for a step outside ``[0, 2**63 - 1]``.
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise UsageError(f"step must be an int in [0, 2**63 - 1], got {step!r}")
    return f"step-{step:010d}{CHECKPOINT_SUFFIX}"


def check_name(name: str) -> str:
    """``name`` when a caller may save a checkpoint under it: a plain file name ending in
    ``.ckpt``, not hidden (temp files are) and not a path.

    Raises :class:`asyncckpt.UsageError` otherwise.
    """
    if (
        not isinstance(name, str)
        or not name.endswith(CHECKPOINT_SUFFIX)
        or name == CHECKPOINT_SUFFIX
        or name.startswith(".")
        or any(bad in name for bad in ("/", "\\", "\0"))
    ):
        raise UsageError(f"a checkpoint name must be a plain file name ending in '.ckpt', got {name!r}")
    return name


def parse_checkpoint_name(name: str) -> int | None:
    """The step of a checkpoint name, or None when ``name`` is not one."""
    match = _CHECKPOINT_NAME.match(name.rpartition("/")[2])
    if match is None:
        return None
    step = int(match[1])
    return step if step <= MAX_STEP else None


def kind_of(name: str) -> Kind | None:
    """What a directory entry is to asyncckpt, by name alone (None: not ours)."""
    base = name.rpartition("/")[2]
    if is_temp_name(base):
        return "temp"
    if parse_checkpoint_name(base) is not None:
        return "checkpoint"
    if base.endswith(CHECKPOINT_SUFFIX) and not base.startswith("."):
        return "named"
    if base.endswith(LEGACY_SUFFIXES):
        return "legacy"
    return None


def temp_step(name: str) -> int | None:
    """The step a writer's temp file was for (``.step-0000000300.ckpt.tmp-1a2b3c4d``)."""
    return parse_checkpoint_name(name.rpartition("/")[2][1:].partition(".tmp-")[0])


def committed(storage: Storage) -> list[CheckpointInfo]:
    """Committed asyncckpt checkpoints of ``storage``'s root, oldest step first."""
    found = [
        CheckpointInfo(step, Path(storage.where(obj.name)), obj.size, obj.modified)
        for obj in storage.ls()
        if obj.kind == "file" and (step := parse_checkpoint_name(obj.name)) is not None
    ]
    return sorted(found, key=lambda c: c.step)


def legacy_files(storage: Storage) -> list[StoredObject]:
    """Legacy ``torch.save`` files of ``storage``'s root, by name."""
    return [obj for obj in storage.ls() if obj.kind == "file" and kind_of(obj.name) == "legacy"]


def newest_first_key(step: int | None, name: str) -> tuple[bool, int, bool, str]:
    """Sort key of the loader's order: known steps newest first, an asyncckpt file before a
    legacy one of the same step, then by name; unknown steps last."""
    return (step is None, -(step or 0), not name.endswith(CHECKPOINT_SUFFIX), name.rpartition("/")[2])


def list_checkpoints(directory: str | os.PathLike[str] | Storage) -> list[CheckpointInfo]:
    """Committed checkpoints in ``directory``, oldest step first (newest last).

    Temp files, symlinks and other non-regular files are never listed. A missing directory has
    no checkpoints.
    """
    return committed(open_storage(directory))
