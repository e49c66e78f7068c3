"""Check-only verification: what a resume would find, file by file, without keeping any data.

The rules are the resume's own (the same candidates, the same reader, the same step checks), so
``check_candidates`` predicts a resume: a file a resume would skip is never reported valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..catalog import open_target
from ..errors import CheckpointError
from ..format import FileKind
from ..format.legacy import LEGACY_VERSION, legacy_step
from ..reader import check_blobs, file_kind, read_legacy
from ..storage import CheckpointPath, Location, Storage
from .candidate import Vanished, layout_of, opened
from .candidates import Candidate, check_named_step, discover, no_step, probe, require_step
from .options import CHECK_MODES, Check, one_of
from .report import diagnose


@dataclass(frozen=True)
class CandidateReport:
    """What :func:`check_candidates` found out about one file.

    ``step`` is None for a legacy file whose step cannot be read; ``version`` is None when the
    file is too broken to say; ``reason`` is None when ``status`` is "valid". ``path`` is a
    ``Path``, or a :class:`~asyncckpt.storage.RemotePath` (the URL) on an object store.
    """

    step: int | None
    path: CheckpointPath
    size: int
    version: str | None
    status: Literal["valid", "corrupted", "incompatible"]
    reason: str | None


def check_candidates(
    directory_or_file: Location,
    *,
    verify: Check = "full",
    storage_options: dict[str, Any] | None = None,
) -> list[CandidateReport]:
    """Check every candidate of a directory (newest first), or one file, without keeping any data.

    ``verify="full"`` checks what a resume checks: the structure and every blob's checksum
    (legacy files are unpickled, and checked against their own checksums where they have them);
    ``verify="structure"`` checks the prelude, trailer and header only. As on a resume, a file
    whose name says another step than its content, and a legacy file without a step, are
    incompatible. Nothing is written. A file pruned while it is checked is left out.

    ``directory_or_file`` may be a URL (``s3://bucket/run`` for a run,
    ``s3://bucket/run/step-0000000300.ckpt`` for one checkpoint): ``storage_options`` go to
    fsspec, and blobs are checked with parallel ranged GETs.

    Raises ``FileNotFoundError`` for a missing file (or one that is not a regular file) and
    :class:`UsageError` for another ``verify``.
    """
    mode = one_of("verify", verify, CHECK_MODES)
    storage, name = open_target(directory_or_file, storage_options=storage_options)
    if name is not None:
        return [check_object(storage, name, verify=mode)]
    reports = []
    for candidate in discover(storage):
        try:
            reports.append(_check(storage, candidate, mode))
        except Vanished:  # pruned since it was listed
            continue
    return reports


def check_object(storage: Storage, name: str, *, verify: Check = "full") -> CandidateReport:
    """Check one object of ``storage`` as :func:`check_candidates` checks each candidate.

    Raises ``FileNotFoundError`` when it is missing or removed while it is checked.
    """
    candidate = probe(storage, name)  # FileNotFoundError for a missing file
    try:
        return _check(storage, candidate, one_of("verify", verify, CHECK_MODES))
    except Vanished as exc:
        raise FileNotFoundError(f"{candidate.where} was removed while it was checked") from exc


def _check(storage: Storage, candidate: Candidate, mode: Check) -> CandidateReport:
    try:
        version, step = _verify(storage, candidate, mode)
    except CheckpointError as exc:
        diagnostic = diagnose(candidate, exc)
        return CandidateReport(
            candidate.step, candidate.path, candidate.size, None, diagnostic.kind, diagnostic.reason
        )
    return CandidateReport(step, candidate.path, candidate.size, version, "valid", None)


def _verify(storage: Storage, candidate: Candidate, mode: Check) -> tuple[str, int]:
    if candidate.error is not None:
        raise candidate.error
    require_step(candidate)
    with opened(storage, candidate) as handle:
        kind = file_kind(handle, candidate.where)
        if kind is FileKind.V1:
            layout = layout_of(handle, candidate)
            if mode == "full":
                check_blobs(handle, layout, where=candidate.where)
            return layout.version, layout.step
        full = mode == "full"
        legacy = read_legacy(handle, kind, where=candidate.where, mmap=not full, checksums=full)
    step = legacy_step(legacy.state, Path(candidate.name))
    if step is None:
        raise no_step(candidate.where)
    check_named_step(candidate, step)
    return LEGACY_VERSION, step
