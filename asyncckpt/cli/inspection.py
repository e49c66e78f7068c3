"""What the CLI reads from a checkpoint directory or file, as plain data (no printing).

``scan_directory`` lists the files ``ls`` shows, ``read_prelude`` reads only a file's first 64
bytes, ``inspect_file`` reads a header (or a legacy file's pickled structure) without the tensor
data, and ``plain_json`` turns a decoded header tree into JSON values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from .. import format as fmt
from ..catalog import parse_checkpoint_name
from ..dtypes import dtype_name, itemsize
from ..errors import CheckpointError, CorruptedCheckpointError, IncompatibleCheckpointError
from ..format.legacy import LEGACY_SUFFIXES, LEGACY_VERSION, is_zip_torch_save, legacy_step, load_legacy
from ..loading import CandidateReport
from ..saving.snapshot import flatten
from ..storage import is_temp_name

Kind = Literal["checkpoint", "legacy", "temp"]


@dataclass(frozen=True)
class Entry:
    """A file of a checkpoint directory that ``ls`` shows."""

    path: Path
    kind: Kind
    step: int | None
    size: int
    modified: datetime


def scan_directory(root: Path) -> list[Entry]:
    """Checkpoints (``step-*.ckpt``), legacy ``*.pt``/``*.pth`` files and writers' temp files.

    Regular files only (symlinks are never candidates, as in the loader); by step, then name.
    Raises ``OSError`` when ``root`` cannot be listed.
    """
    entries = []
    for item in os.scandir(root):
        kind = kind_of(item.name)
        if kind is None or not item.is_file(follow_symlinks=False):
            continue
        info = item.stat(follow_symlinks=False)
        path = root / item.name
        entries.append(
            Entry(path, kind, step_of(path, kind), info.st_size, datetime.fromtimestamp(info.st_mtime, UTC))
        )
    return sorted(entries, key=lambda e: (e.step is None, e.step or 0, e.path.name))


def kind_of(name: str) -> Kind | None:
    if is_temp_name(name):
        return "temp"
    if parse_checkpoint_name(name) is not None:
        return "checkpoint"
    if name.endswith(LEGACY_SUFFIXES):
        return "legacy"
    return None


def step_of(path: Path, kind: Kind) -> int | None:
    if kind == "checkpoint":
        return parse_checkpoint_name(path.name)
    if kind == "temp":  # .step-0000000300.ckpt.tmp-1a2b3c4d
        return parse_checkpoint_name(path.name[1:].partition(".tmp-")[0])
    return legacy_step(None, path)  # from the name: ls never unpickles


def read_prelude(path: Path) -> tuple[str | None, CheckpointError | None]:
    """The format version a file's first 64 bytes declare, and what is wrong with them (if anything).

    Nothing past the prelude is read: a file with a good prelude may still be broken.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(fmt.PRELUDE_SIZE)
    except OSError as exc:
        return None, CorruptedCheckpointError(f"cannot be read: {exc.strerror or exc}", path=path)
    try:
        if fmt.sniff(head, path=path).legacy:
            return LEGACY_VERSION, None
    except CorruptedCheckpointError as exc:
        return None, exc
    declared = head[len(fmt.MAGIC) : len(fmt.MAGIC) + 16].rstrip(b"\0").decode("ascii", "replace")
    try:
        return fmt.check_prelude(head, str(path)), None
    except CheckpointError as exc:
        return declared or None, exc


def resume_candidates(target: Path) -> list[Path]:
    """The files a resume would consider, newest step first (the loader's order)."""
    if not target.is_dir():
        return [target]
    found = [e for e in scan_directory(target) if e.kind != "temp"]
    found.sort(key=lambda e: (e.step is None, -(e.step or 0), e.kind != "checkpoint", e.path.name))
    return [e.path for e in found]


def prelude_report(path: Path) -> CandidateReport:
    """A report from the prelude alone (``--verify none``); "valid" means "not refused"."""
    version, error = read_prelude(path)
    kind: Kind = "legacy" if path.name.endswith(LEGACY_SUFFIXES) else "checkpoint"
    step, size = step_of(path, kind), path.stat().st_size
    if error is None:
        return CandidateReport(step, path, size, version, "valid", None)
    status: Any = "incompatible" if isinstance(error, IncompatibleCheckpointError) else "corrupted"
    return CandidateReport(step, path, size, None, status, error.reason)


@dataclass(frozen=True)
class TensorRow:
    """One tensor of a checkpoint: key path, dtype name, shape, size in bytes."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Inspection:
    """What ``inspect`` shows of one file."""

    path: Path
    size: int
    version: str
    step: int | None
    created: str | None
    writer: str | None
    metadata: Any
    tensors: list[TensorRow]
    tree: Any  # with fmt.TensorRef leaves


def inspect_file(path: Path) -> Inspection:
    """Read a file's header (v1) or pickled structure (legacy); no tensor data is checked.

    Raises :class:`CheckpointError` for a file that is not a readable checkpoint.
    """
    size = path.stat().st_size
    with open(path, "rb", buffering=0) as file:
        head = file.read(fmt.SNIFF_BYTES)
        if fmt.sniff(head, path=path) is fmt.FileKind.V1:
            layout = fmt.read_layout(file, str(path))
            rows = _rows(layout.tensors)
            info = (layout.version, layout.step, layout.created, layout.writer, layout.metadata)
            return Inspection(path, size, *info, rows, layout.tree)
    state = load_legacy(path, mmap=is_zip_torch_save(head))
    snapshot = flatten(state)
    step = legacy_step(state, path)
    return Inspection(
        path, size, LEGACY_VERSION, step, None, None, {}, _rows(snapshot.tensors), snapshot.tree
    )


def _rows(tensors: Iterable[Any]) -> list[TensorRow]:
    """Table rows of format.TensorEntry objects."""
    return [
        TensorRow(t.key, dtype_name(t.dtype) or str(t.dtype), t.shape, math.prod(t.shape) * itemsize(t.dtype))
        for t in tensors
    ]


def plain_json(value: Any) -> Any:
    """``value`` as JSON: tuples as lists, keys as text, bytes as hex, big ints and inf/nan as text."""
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_json(v) for v in value]
    if isinstance(value, fmt.BigInt):
        return str(value.value)
    if isinstance(value, fmt.TensorRef):
        return {"tensor": value.index}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
