"""What the CLI reads from a checkpoint directory or file, as plain data (no printing).

Everything goes through the Storage seam and the one reader, so a URL (``s3://bucket/run``)
works as a local path does. ``scan_directory`` lists the files ``ls`` shows, ``read_prelude``
reads only a file's first 64 bytes, ``inspect_file`` reads a header (or a legacy file's pickled
structure) without the tensor data, and ``plain_json`` turns a decoded header tree into JSON
values. A location is a path or URL (``storage_options`` go to fsspec) or an :class:`Entry`.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, Literal

from .. import format as fmt
from .. import reader
from ..catalog import kind_of, newest_first_key, open_target, parse_checkpoint_name
from ..dtypes import dtype_name, itemsize
from ..errors import CheckpointError, CorruptedCheckpointError, IncompatibleCheckpointError
from ..format.legacy import LEGACY_SUFFIXES, LEGACY_VERSION, legacy_step
from ..loading import CandidateReport
from ..loading.candidates import probe
from ..storage import CheckpointPath, Storage, path_of
from .legacyview import Shown, describe

Kind = Literal["checkpoint", "named", "legacy", "temp"]
Options = dict[str, Any] | None
EPOCH = datetime.fromtimestamp(0, UTC)

__all__ = [
    "Entry",
    "Inspection",
    "Object",
    "TensorRow",
    "candidates_of",
    "inspect_file",
    "kind_of",
    "plain_json",
    "prelude_report",
    "read_prelude",
    "resume_candidates",
    "scan_directory",
    "target",
]


@dataclass(frozen=True)
class Entry:
    """A file of a checkpoint directory that ``ls`` shows: its storage and name, where it is
    (``path``), its kind, step, size and time."""

    path: CheckpointPath
    kind: Kind
    step: int | None
    size: int
    modified: datetime
    name: str = field(default="", compare=False)
    storage: Storage | None = field(default=None, compare=False, repr=False)


Object = Entry | tuple[Storage, str] | str | os.PathLike[str]  # one file: an entry, (storage, name), a path


def target(
    location: str | os.PathLike[str], *, storage_options: Options = None
) -> tuple[Storage, str | None]:
    """``(storage, None)`` for a directory, ``(storage of its folder, name)`` for one file."""
    return open_target(location, storage_options=storage_options)


def _one(location: Object, storage_options: Options) -> tuple[Storage, str]:
    if isinstance(location, Entry) and location.storage is not None:
        return location.storage, location.name
    if isinstance(location, tuple):
        return location
    text = str(location.path) if isinstance(location, Entry) else os.fspath(location)
    storage, name = target(text, storage_options=storage_options)
    if name is None:
        raise IsADirectoryError(errno.EISDIR, "is a directory", text)
    return storage, name


def scan_directory(
    location: str | os.PathLike[str] | Storage, *, storage_options: Options = None
) -> list[Entry]:
    """Checkpoints (``step-*.ckpt``), legacy ``*.pt``/``*.pth`` files and unfinished writes
    (temp files; on an object store, uploads without their commit).

    Regular files only (symlinks are never candidates, as in the loader); by step, then name.
    Raises ``OSError`` when the directory cannot be listed.
    """
    storage = (
        location if isinstance(location, Storage) else target(location, storage_options=storage_options)[0]
    )
    entries = []
    for obj in storage.ls():
        kind = kind_of(obj.name)
        if obj.kind != "file" or kind not in ("checkpoint", "named", "legacy"):
            continue
        try:
            step = _header_step(storage, obj.name) if kind == "named" else step_of(obj.name, kind)
        except FileNotFoundError:  # pruned since it was listed
            continue
        path = path_of(storage.where(obj.name))
        entries.append(Entry(path, kind, step, obj.size, obj.modified, obj.name, storage))
    for unfinished in storage.unfinished():
        path = path_of(storage.where(unfinished.label))
        step = parse_checkpoint_name(unfinished.name)
        entries.append(
            Entry(path, "temp", step, unfinished.size, unfinished.modified, unfinished.label, storage)
        )
    return sorted(entries, key=lambda e: (e.step is None, e.step or 0, e.path.name))


def _header_step(storage: Storage, name: str) -> int | None:
    """The step a named checkpoint's header says (``last.ckpt``: its name says none), as a resume
    reads it; None when the file is too broken to say. ``FileNotFoundError`` when it is gone."""
    return probe(storage, name).step


def step_of(name: str, kind: Kind) -> int | None:
    """The step a file's name says (``ls`` never unpickles)."""
    if kind == "checkpoint":
        return parse_checkpoint_name(name)
    if kind == "temp":  # .step-0000000300.ckpt.tmp-1a2b3c4d
        return parse_checkpoint_name(PurePosixPath(name).name[1:].partition(".tmp-")[0])
    return legacy_step(None, PurePosixPath(name))


def read_prelude(
    location: Object, *, storage_options: Options = None
) -> tuple[str | None, CheckpointError | None]:
    """The format version a file's first 64 bytes declare, and what is wrong with them (if anything).

    Nothing past the prelude is read: a file with a good prelude may still be broken.
    """
    storage, name = _one(location, storage_options)
    where = storage.where(name)
    try:
        with storage.open(name) as handle:
            buffer = bytearray(fmt.PRELUDE_SIZE)
            head = bytes(buffer[: handle.read_at(0, memoryview(buffer))])
    except OSError as exc:
        return None, CorruptedCheckpointError(f"cannot be read: {exc.strerror or exc}", path=where)
    except CheckpointError as exc:  # a damaged commit record (object stores)
        return None, exc
    try:
        if fmt.sniff(head, path=where).legacy:
            return LEGACY_VERSION, None
    except CorruptedCheckpointError as exc:
        return None, exc
    declared = head[len(fmt.MAGIC) : len(fmt.MAGIC) + 16].rstrip(b"\0").decode("ascii", "replace")
    try:
        return fmt.check_prelude(head, where), None
    except CheckpointError as exc:
        return declared or None, exc


def resume_candidates(location: str | os.PathLike[str], *, storage_options: Options = None) -> list[Entry]:
    """The files a resume would consider, newest step first (the loader's order); one file
    when ``location`` names one."""
    return candidates_of(*target(location, storage_options=storage_options))


def candidates_of(storage: Storage, name: str | None) -> list[Entry]:
    """:func:`resume_candidates` of an opened target: ``name`` alone, or the directory's files."""
    if name is not None:
        return [_entry(storage, name)]
    found = [e for e in scan_directory(storage) if e.kind != "temp"]
    found.sort(key=lambda e: newest_first_key(e.step, e.name or e.path.name, e.modified.timestamp()))
    return found


def _entry(storage: Storage, name: str) -> Entry:
    """One named file as an entry (size and time from its folder's listing when it is listed)."""
    kind: Kind = "legacy" if name.endswith(LEGACY_SUFFIXES) else "checkpoint"
    if kind_of(name) == "named":
        kind = "named"
    listed = next((o for o in storage.ls() if o.name == name and o.kind == "file"), None)
    size, modified = (listed.size, listed.modified) if listed is not None else (0, EPOCH)
    return Entry(path_of(storage.where(name)), kind, step_of(name, kind), size, modified, name, storage)


def prelude_report(location: Object, *, storage_options: Options = None) -> CandidateReport:
    """A report from the prelude alone (``--verify none``); "valid" means "not refused"."""
    storage, name = _one(location, storage_options)
    entry = location if isinstance(location, Entry) else _entry(storage, name)
    version, error = read_prelude(entry)
    if error is None:
        return CandidateReport(entry.step, entry.path, entry.size, version, "valid", None)
    status: Any = "incompatible" if isinstance(error, IncompatibleCheckpointError) else "corrupted"
    return CandidateReport(entry.step, entry.path, entry.size, None, status, error.reason)


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

    path: CheckpointPath
    size: int
    version: str
    step: int | None
    created: str | None
    writer: str | None
    metadata: Any
    tensors: list[TensorRow]
    tree: Any  # with fmt.TensorRef leaves


def inspect_file(location: Object, *, storage_options: Options = None) -> Inspection:
    """Read a file's header (v1) or pickled structure (legacy); no tensor data is checked.

    Raises :class:`CheckpointError` for a file that is not a readable checkpoint, ``OSError``
    when it cannot be opened.
    """
    storage, name = _one(location, storage_options)
    where = storage.where(name)
    path = path_of(where)
    with storage.open(name) as handle:
        kind = reader.file_kind(handle, where)
        if kind is fmt.FileKind.V1:
            layout = reader.read_layout(handle, where)
            info = (layout.version, layout.step, layout.created, layout.writer, layout.metadata)
            return Inspection(path, handle.size, *info, _rows(layout.tensors), layout.tree)
        state = reader.read_legacy(handle, kind, where=where, mmap=True).state
        size = handle.size
    rows, tree = describe(state)
    step = legacy_step(state, PurePosixPath(name))
    tensors = [TensorRow(*row) for row in rows]
    return Inspection(path, size, LEGACY_VERSION, step, None, None, {}, tensors, tree)


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
    if isinstance(value, Shown):  # a legacy file's value the format has no word for
        return {"repr": value.text, "type": value.type}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
