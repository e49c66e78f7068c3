"""What the CLI shows of multi-rank steps (``step-0000000300/`` folders), as plain data.

``ls`` lists the step folders (:func:`scan_steps`: world size from the commit record's header,
shard files from the folder's listing; a folder without a record is "uncommitted").
``validate`` checks committed steps as :func:`asyncckpt.dist.check_step` does, naming each
broken shard and its rank (:func:`check_steps`). ``inspect`` shows one step: the record, each
rank's shard and DCP's tensors (:func:`inspect_step`). Every multi-rank read goes through
:mod:`asyncckpt.dist`, imported only when a directory holds step folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

from .. import catalog
from .. import format as fmt
from ..dtypes import dtype_name
from ..errors import CheckpointError, Diagnostic
from ..loading import CandidateReport
from ..storage import PosixStorage

Status = Literal["valid", "corrupted", "incompatible"]


@dataclass(frozen=True)
class StepEntry:
    """A step folder as ``ls`` shows it: committed or not, its ranks and shard files."""

    path: Path
    step: int
    committed: bool
    size: int  # bytes of the files in the folder
    modified: datetime  # the record's (committed) or the folder's time
    world_size: int | None  # from the commit record (None: uncommitted or unreadable)
    shards: int  # shard files present
    temps: int  # writers' temp files left in the folder
    version: str | None = None
    problem: str | None = None


def has_step_folders(root: Path) -> bool:
    """Whether ``root`` holds any ``step-N/`` folder (committed or not)."""
    return any(catalog.parse_step_folder(e.name) is not None and e.is_dir() for e in os.scandir(root))


def scan_steps(root: Path) -> list[StepEntry]:
    """Every step folder of ``root``, by step; reads each commit record's header only."""
    storage = PosixStorage(root)
    leftovers = storage.leftovers()
    entries = []
    for item in os.scandir(root):
        step = catalog.parse_step_folder(item.name)
        if step is None or not item.is_dir(follow_symlinks=False):
            continue
        files = [obj for obj in storage.ls(item.name) if obj.kind == "file"]
        record = next((obj for obj in files if obj.name == catalog.commit_record_name(step)), None)
        shards = sum(catalog.parse_shard_name(obj.name) is not None for obj in files)
        temps = sum(name.startswith(f"{item.name}/") for name in leftovers)
        modified = record.modified if record else datetime.fromtimestamp(item.stat().st_mtime, UTC)
        size = sum(o.size for o in files)
        entry = StepEntry(root / item.name, step, record is not None, size, modified, None, shards, temps)
        entries.append(_with_record(storage, entry) if record else entry)
    return sorted(entries, key=lambda e: e.step)


def _with_record(storage: PosixStorage, entry: StepEntry) -> StepEntry:
    name = catalog.commit_record_name(entry.step)
    where = storage.where(name)
    try:
        with storage.open(name) as handle:
            layout = fmt.read_layout(cast(BinaryIO, handle.cursor()), where)
    except (OSError, CheckpointError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        return _replace(entry, problem=f"commit record: {reason}")
    tree = layout.tree if isinstance(layout.tree, dict) else {}
    world = tree.get("world_size")
    world_size = world if isinstance(world, int) and not isinstance(world, bool) else None
    return _replace(entry, world_size=world_size, version=layout.version)


def _replace(entry: StepEntry, **changes: Any) -> StepEntry:
    fields = {name: getattr(entry, name) for name in StepEntry.__dataclass_fields__}
    return StepEntry(**{**fields, **changes})


def step_note(entry: StepEntry) -> str:
    """The ``ls`` note of a step folder (plain text)."""
    if not entry.committed:
        return "uncommitted (no commit record): never loaded, removed at the next save"
    if entry.problem:
        return entry.problem
    ranks = f"{entry.world_size} ranks" if entry.world_size is not None else "? ranks"
    text = f"multi-rank: {ranks}, {entry.shards} shard files"
    if entry.world_size is not None and entry.shards != entry.world_size:
        text += f" (expected {entry.world_size})"
    return text + (f", {entry.temps} temp files" if entry.temps else "")


# --------------------------------------------------------------------------- validate


@dataclass(frozen=True)
class BrokenShard:
    """One broken file of a step: its rank (None for the commit record), path and reason."""

    rank: int | None
    path: str
    reason: str


@dataclass(frozen=True)
class StepReport:
    """``validate``'s verdict on one committed step."""

    report: CandidateReport
    world_size: int | None
    broken: list[BrokenShard] = field(default_factory=list)


Mode = Literal["full", "structure", "none"]


def check_steps(root: Path, mode: Mode, only: int | None = None) -> list[StepReport]:
    """Check the committed steps of ``root`` (or step ``only``), newest first; nothing is written.

    ``full``: what :func:`asyncckpt.dist.check_step` checks (the record, every shard's digest
    and blobs, every item against the record); ``structure``: the record and every shard's
    header against its digest; ``none``: nothing (the record's header only, as ``ls``).
    """
    reports = []
    for entry in reversed([e for e in scan_steps(root) if e.committed and only in (None, e.step)]):
        found = [] if mode == "none" and not entry.problem else _diagnose(root, entry.step, mode)
        broken = [BrokenShard(_rank_of(d.path), d.path, d.reason) for d in found]
        status: Status = "valid"
        if found:
            status = "incompatible" if all(d.kind == "incompatible" for d in found) else "corrupted"
        reason = "; ".join(f"{_short(b.path, entry.path)}: {b.reason}" for b in broken) or None
        report = CandidateReport(entry.step, entry.path, entry.size, entry.version, status, reason)
        reports.append(StepReport(report, entry.world_size, broken))
    return reports


def _diagnose(root: Path, step: int, mode: str) -> list[Diagnostic]:
    from ..dist import check_step
    from ..dist.verify import diagnose, utc_now

    if mode == "full":
        return check_step(root, step)
    where = str(root / catalog.step_folder_name(step))
    try:
        found = inspect_step(root / catalog.step_folder_name(step))
    except FileNotFoundError:
        return [Diagnostic(where, "corrupted", "the commit record vanished", utc_now(), step)]
    except (CheckpointError, OSError) as exc:
        return [diagnose(exc, where, step)]
    return [
        Diagnostic(str(root / catalog.shard_name(step, row.rank)), "corrupted", row.status, utc_now(), step)
        for row in found.shards
        if row.status != "ok"
    ]


def resume_rows(rows: list[CandidateReport]) -> list[CandidateReport]:
    """The rows a resume considers: those of the layout of the newest committed step (multi-rank
    step folders, or single files), as :func:`asyncckpt.load_latest` and ``restore`` choose."""
    steps = [r for r in rows if is_step_row(r)]
    files = [r for r in rows if not is_step_row(r)]
    if not steps or not files:
        return rows
    newest_file = max(
        (r.step for r in files if r.path.suffix == catalog.CHECKPOINT_SUFFIX and r.step is not None),
        default=-1,
    )
    return steps if max(r.step or 0 for r in steps) >= newest_file else files


def is_step_row(row: CandidateReport) -> bool:
    """Whether a report is about a multi-rank step folder."""
    return catalog.parse_step_folder(row.path.name) is not None and row.path.suffix == ""


def steps_document(reports: list[StepReport]) -> list[dict[str, Any]]:
    """The ``--json`` details of the multi-rank steps checked (which shard is broken)."""
    return [
        {
            "step": r.report.step,
            "folder": str(r.report.path),
            "world_size": r.world_size,
            "status": r.report.status,
            "broken": [{"rank": b.rank, "path": b.path, "reason": b.reason} for b in r.broken],
        }
        for r in reports
    ]


def _rank_of(path: str) -> int | None:
    parsed = catalog.parse_shard_name("/".join(Path(path).parts[-2:]))
    return parsed[1] if parsed else None


def _short(path: str, folder: Path) -> str:
    """A broken file's name inside its step folder (``rank-00001.ckpt``), or its whole path."""
    return Path(path).name if Path(path).parent == folder else path


def newest_is_multi_rank(root: Path) -> bool:
    """Whether a resume of ``root`` uses its multi-rank steps (its newest step is one)."""
    from ..multirank import newest_is_multi_rank as newest

    return newest(PosixStorage(root))


# --------------------------------------------------------------------------- inspect


@dataclass(frozen=True)
class ShardRow:
    """One rank's shard file as ``inspect`` shows it (header only)."""

    rank: int
    file: str
    size: int | None
    tensors: int | None
    status: str  # "ok", "missing", or what differs from the record


@dataclass(frozen=True)
class DcpTensor:
    """One tensor of DCP's metadata: its key, dtype, global shape and how many chunks."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    chunks: int


@dataclass(frozen=True)
class StepInspection:
    """What ``inspect`` shows of one multi-rank step."""

    path: Path
    step: int
    world_size: int
    record_size: int
    committed_at: str
    shards: list[ShardRow]
    tensors: list[DcpTensor]
    values: list[str]  # keys of DCP's plain (non-tensor) values
    metadata: Any


def is_step_folder(path: Path) -> bool:
    """Whether ``path`` is a multi-rank step folder."""
    return path.is_dir() and catalog.parse_step_folder(path.name) is not None


def inspect_step(path: Path) -> StepInspection:
    """Read a step's commit record (all of it, checked) and each shard's header.

    Raises ``FileNotFoundError`` when the step has no commit record, and
    :class:`CorruptedCheckpointError` when the record is broken.
    """
    from ..dist import read_record
    from ..dist.shards import header_digest

    step = catalog.parse_step_folder(path.name)
    assert step is not None
    storage = PosixStorage(path.parent)
    record = read_record(storage, step)
    rows = []
    metadata: Any = None
    for expected in record.shards:
        name = catalog.shard_name(step, expected.rank)
        where = storage.where(name)
        try:
            with storage.open(name) as handle:
                digest, layout = header_digest(handle, where, expected.rank)
        except FileNotFoundError:
            rows.append(ShardRow(expected.rank, Path(name).name, None, None, "missing"))
            continue
        except CheckpointError as exc:
            rows.append(ShardRow(expected.rank, Path(name).name, None, None, exc.reason))
            continue
        same = digest == expected
        status = "ok" if same else "differs from the commit record's digest"
        rows.append(ShardRow(expected.rank, Path(name).name, digest.nbytes, len(layout.tensors), status))
        if expected.rank == 0 and isinstance(layout.metadata, dict):
            metadata = layout.metadata.get("user")
    tensors, values = _dcp_tensors(record.metadata)
    committed_at = datetime.fromtimestamp((path / catalog.COMMIT_RECORD_NAME).stat().st_mtime, UTC).isoformat(
        timespec="seconds"
    )
    size = (path / catalog.COMMIT_RECORD_NAME).stat().st_size
    return StepInspection(path, step, record.world_size, size, committed_at, rows, tensors, values, metadata)


def _dcp_tensors(metadata: Any) -> tuple[list[DcpTensor], list[str]]:
    tensors, values = [], []
    for key, md in metadata.state_dict_metadata.items():
        chunks = getattr(md, "chunks", None)
        if chunks is None:
            values.append(key)
            continue
        name = dtype_name(md.properties.dtype) or str(md.properties.dtype)
        tensors.append(DcpTensor(key, name, tuple(md.size), len(chunks)))
    return tensors, values
