"""The one place that knows names: checkpoint identity (step) ⇄ object names, file kinds, order.

A committed single-file step is ``step-0000000300.ckpt`` (its rename was the commit). A file a
caller named itself (``AsyncCheckpointer.save(..., name="last.ckpt")``, any other ``*.ckpt``) is
a checkpoint whose step is read from its header. Legacy ``torch.save`` files (``*.pt``,
``*.pth``) are candidates too, read-only. Newest-first order puts a higher step first and, for one
step, an asyncckpt file before a legacy one, then the later write first.

A multi-rank step is a folder ``step-0000000300/`` holding one shard file per rank
(``rank-00001.ckpt``, each a v1 file) and the commit record ``commit.record`` (a v1 file written
last, by one rank). The record is the commit: a folder without it is not a checkpoint.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from .errors import UsageError
from .storage import (
    CheckpointPath,
    Location,
    Storage,
    StoredObject,
    is_temp_name,
    is_url,
    local_path,
    open_storage,
    path_of,
)

CHECKPOINT_SUFFIX = ".ckpt"
LEGACY_SUFFIXES = (".pt", ".pth")
FAILED_LOG_NAME = "failed_checkpoints.txt"
MAX_STEP = 2**63 - 1
_CHECKPOINT_NAME = re.compile(r"^step-(\d{1,19})\.ckpt$")
COMMIT_RECORD_NAME = "commit.record"
MAX_RANK = 10**9 - 1
_STEP_FOLDER_NAME = re.compile(r"^step-(\d{1,19})$")
_SHARD_NAME = re.compile(r"^rank-(\d{5,9})\.ckpt$")

Kind = Literal["checkpoint", "named", "legacy", "temp"]


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint found in a directory: its step, file, size and modification time.

    ``path`` is a ``Path`` for a local file and a :class:`~asyncckpt.storage.RemotePath` (the
    URL as a ``str``) for an object store.
    """

    step: int
    path: CheckpointPath
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


def open_target(
    location: Location, *, storage_options: dict[str, Any] | None = None
) -> tuple[Storage, str | None]:
    """A checkpoint directory, or one checkpoint file: ``(its storage, None)`` or ``(the storage
    of its folder, its name)``.

    A local path is a file unless it is a directory. A URL is a file when its last segment is
    a checkpoint's, a named checkpoint's or a legacy file's name (``.../step-0000000300.ckpt``,
    ``.../last.ckpt``, ``.../model.pt``) and it does not end in ``/``; object stores have no
    directories to ask.
    """
    if isinstance(location, Storage):
        return location, None
    text = os.fspath(location)
    if is_url(text):
        folder, _, base = text.rpartition("/")
        if base and kind_of(base) in ("checkpoint", "named", "legacy") and not folder.endswith(":/"):
            return open_storage(folder, storage_options=storage_options), base
        return open_storage(text, storage_options=storage_options), None
    path = Path(local_path(text))
    if path.is_dir():
        return open_storage(path), None
    return open_storage(path.parent), path.name


def temp_step(name: str) -> int | None:
    """The step a writer's temp file was for (``.step-0000000300.ckpt.tmp-1a2b3c4d``)."""
    return parse_checkpoint_name(name.rpartition("/")[2][1:].partition(".tmp-")[0])


def committed(storage: Storage) -> list[CheckpointInfo]:
    """Committed asyncckpt checkpoints of ``storage``'s root, oldest step first."""
    return _committed_in(storage, storage.ls())


def _committed_in(storage: Storage, listing: list[StoredObject]) -> list[CheckpointInfo]:
    found = [
        CheckpointInfo(step, path_of(storage.where(obj.name)), obj.size, obj.modified)
        for obj in listing
        if obj.kind == "file" and (step := parse_checkpoint_name(obj.name)) is not None
    ]
    return sorted(found, key=lambda c: c.step)


def legacy_files(storage: Storage) -> list[StoredObject]:
    """Legacy ``torch.save`` files of ``storage``'s root, by name."""
    return [obj for obj in storage.ls() if obj.kind == "file" and kind_of(obj.name) == "legacy"]


def newest_first_key(
    step: int | None, name: str, modified: float = 0.0
) -> tuple[bool, int, bool, float, str]:
    """Sort key of the loader's order: known steps newest first, an asyncckpt file before a
    legacy one of the same step, then the later write first (``modified``, a timestamp: one step
    written twice, as Lightning's epoch file and then ``last.ckpt``), then by name; unknown
    steps last."""
    base = name.rpartition("/")[2]
    return (step is None, -(step or 0), not base.endswith(CHECKPOINT_SUFFIX), -modified, base)


# --------------------------------------------------------------------------- multi-rank steps


@dataclass(frozen=True)
class StepInfo:
    """A committed multi-rank step: its step, its folder, and when its commit record was written."""

    step: int
    folder: str  # the folder's full location (a path or a URL)
    record_size: int
    committed_at: datetime


def step_folder_name(step: int) -> str:
    """The folder of a multi-rank step: ``step-0000000300``. Raises like :func:`checkpoint_name`."""
    return checkpoint_name(step).removesuffix(CHECKPOINT_SUFFIX)


def shard_name(step: int, rank: int) -> str:
    """The shard file of ``rank`` in ``step``'s folder: ``step-0000000300/rank-00001.ckpt``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= MAX_RANK:
        raise UsageError(f"rank must be an int in [0, {MAX_RANK}], got {rank!r}")
    return f"{step_folder_name(step)}/rank-{rank:05d}{CHECKPOINT_SUFFIX}"


def commit_record_name(step: int) -> str:
    """The commit record of ``step``: ``step-0000000300/commit.record``."""
    return f"{step_folder_name(step)}/{COMMIT_RECORD_NAME}"


def parse_step_folder(name: str) -> int | None:
    """The step of a multi-rank step folder's name, or None when ``name`` is not one."""
    match = _STEP_FOLDER_NAME.match(name.rstrip("/").rpartition("/")[2])
    if match is None:
        return None
    step = int(match[1])
    return step if step <= MAX_STEP else None


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """``(step, rank)`` of a shard file's name (``step-0000000300/rank-00001.ckpt``), else None."""
    folder, _, base = name.rpartition("/")
    match = _SHARD_NAME.match(base)
    step = parse_step_folder(folder) if folder else None
    if match is None or step is None:
        return None
    return step, int(match[1])


def committed_steps(storage: Storage) -> list[StepInfo]:
    """Committed multi-rank steps of ``storage``'s root (a folder with its commit record), oldest
    first. Folders without a record (a save that never finished) are never listed."""
    found = []
    for obj in storage.ls():
        step = parse_step_folder(obj.name) if obj.kind == "dir" else None
        if step is None:
            continue
        record = commit_record_name(step)
        for entry in storage.ls(obj.name):
            if entry.kind == "file" and entry.name == record:
                found.append(StepInfo(step, storage.where(obj.name), entry.size, entry.modified))
    return sorted(found, key=lambda info: info.step)


def uncommitted_step_folders(storage: Storage) -> list[str]:
    """Names of step folders without a commit record (a save that failed or was interrupted)."""
    done = {info.step for info in committed_steps(storage)}
    return [
        obj.name
        for obj in storage.ls()
        if obj.kind == "dir" and (step := parse_step_folder(obj.name)) is not None and step not in done
    ]


def list_checkpoints(
    directory: str | os.PathLike[str] | Storage, *, storage_options: dict[str, Any] | None = None
) -> list[CheckpointInfo]:
    """Committed checkpoints in ``directory`` (a path or a URL such as ``s3://bucket/run``),
    oldest step first (newest last).

    Single files and committed multi-rank steps (``path`` is the step's folder, ``size`` the
    bytes of its files, ``created`` when its commit record was written). Temp files, symlinks
    and other non-regular files, uploads without their commit object and step folders without
    a commit record are never listed. A missing directory has no checkpoints.
    ``storage_options`` go to fsspec for a URL (credentials, ``endpoint_url``, ...).
    """
    storage = open_storage(directory, storage_options=storage_options)
    listing = storage.ls()
    found = _committed_in(storage, listing)
    if any(obj.kind == "dir" for obj in listing):  # one LIST when the run has no step folders
        found += [_step_info(storage, info) for info in committed_steps(storage)]
    return sorted(found, key=lambda c: (c.step, c.path.suffix != CHECKPOINT_SUFFIX))


def _step_info(storage: Storage, step: StepInfo) -> CheckpointInfo:
    folder = step_folder_name(step.step)
    size = sum(obj.size for obj in storage.ls(folder) if obj.kind == "file")
    return CheckpointInfo(step.step, path_of(step.folder), size, step.committed_at)
