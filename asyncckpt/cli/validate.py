"""``asyncckpt validate``: a dry run of a resume, which changes nothing.

``--verify full`` (the default) checks what :func:`asyncckpt.load_latest` checks, every blob's
checksum included, so its verdict is the resume's: the step it would load and the newer files it
would skip. ``--verify structure`` skips the blobs' bytes and ``--verify none`` reads only the
preludes; both say in their output what they did not check.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .. import catalog
from ..errors import EXIT_CHECKPOINT, EXIT_OK, EXIT_PARTIAL, NoValidCheckpointError
from ..loading import CandidateReport
from ..loading.verify import check_object
from .exits import DebugOption, reports_errors
from .inspection import Entry, candidates_of, prelude_report
from .render import JsonOption, human_bytes, plural, shown, stderr, stdout, step_text
from .steps import (
    Mode,
    StepReport,
    check_steps,
    has_step_folders,
    is_step_folder,
    resume_rows,
    steps_document,
)
from .targets import StorageOptionsOption, open_location

PROGRESS_MIN_BYTES = 256 << 20  # --verify full shows a progress bar past this many bytes to read
NO_CHECKPOINTS = "no checkpoints (no step-*.ckpt, *.pt or *.pth files, no committed step-*/ folders)"


class Verify(enum.StrEnum):
    """How much of each candidate ``validate`` checks."""

    full = "full"  # structure and every blob's checksum: what a resume checks
    structure = "structure"  # prelude, trailer and header (every length bounded); no blob bytes
    none = "none"  # the 64-byte prelude only


NOT_CHECKED: dict[Verify, list[str]] = {
    Verify.full: [],
    Verify.structure: ["tensor data (blob checksums)"],
    Verify.none: ["trailer", "header", "tensor data (blob checksums)"],
}
TITLES = {
    Verify.full: "structure and checksums checked",
    Verify.structure: "structure checked; tensor data (blob checksums) not checked",
    Verify.none: "not checked: preludes only",
}
STYLES = {"valid": "green", "corrupted": "bold red", "incompatible": "yellow"}


@reports_errors
def validate(
    ctx: typer.Context,
    path: Annotated[
        str,
        typer.Argument(
            help="A checkpoint directory or one checkpoint file: a path, or a URL such as s3://bucket/run/."
        ),
    ],
    verify: Annotated[
        Verify,
        typer.Option(
            "--verify",
            help="full: what a resume checks, every checksum included; structure: prelude, trailer "
            "and header, no tensor data; none: only find the candidates and read their format version.",
        ),
    ] = Verify.full,
    as_json: JsonOption = False,
    storage_options: StorageOptionsOption = None,
    debug: DebugOption = False,
) -> None:
    """Check checkpoints without changing anything (a dry run of a resume).

    By default every file is checked as a resume checks it (structure, then every blob's
    checksum), so the verdict is the resume's. Exit code 0: every checkpoint valid; 2: some
    valid, some not, whether or not a resume would fall back (an older broken file counts too:
    the summary and the JSON's `resume_falls_back` say which); 3: none valid, or the single
    file given is invalid; 1: usage or unexpected errors.
    """
    storage, name = open_location(path, storage_options)
    target = storage.where(name) if name is not None else storage.location
    local = None if "://" in target else Path(target)
    step_folder = local is not None and is_step_folder(local)
    steps = _check_steps(local, verify) if local is not None else []
    files = [] if step_folder else candidates_of(storage, name)
    rows = _newest_first(_check_all(files, verify) + [step.report for step in steps])
    code = _exit_code(rows, single_file=name is not None or step_folder)
    if as_json:
        document = _document(target, verify, rows, code)
        if steps:
            document["steps"] = steps_document(steps)
        typer.echo(json.dumps(document, indent=2))
    else:
        _print(target, verify, rows)
    if not rows:
        raise NoValidCheckpointError(NO_CHECKPOINTS, path=target)
    raise typer.Exit(code)


def _check_all(files: list[Entry], verify: Verify) -> list[CandidateReport]:
    if verify == Verify.none:
        return [prelude_report(entry) for entry in files]
    mode: Literal["full", "structure"] = "full" if verify == Verify.full else "structure"
    total = sum(entry.size for entry in files)
    if verify != Verify.full or total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        return _newest_first([_check(entry, mode) for entry in files])
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    reports = []
    with Progress(*columns, console=stderr(), transient=True) as progress:
        task = progress.add_task("validating", total=total)
        for entry in files:
            progress.update(task, description=f"checking {entry.path.name}")
            reports.append(_check(entry, "full"))
            progress.advance(task, entry.size)
    return _newest_first(reports)


def _check_steps(target: Path, verify: Verify) -> list[StepReport]:
    """Multi-rank steps: all of a directory's committed ones, or the one folder given."""
    mode: Mode = verify.value
    if is_step_folder(target):
        return check_steps(target.parent, mode, only=catalog.parse_step_folder(target.name))
    return check_steps(target, mode) if target.is_dir() and has_step_folders(target) else []


def _check(entry: Entry, mode: Literal["full", "structure"]) -> CandidateReport:
    assert entry.storage is not None
    return check_object(entry.storage, entry.name, verify=mode)


def _newest_first(reports: list[CandidateReport]) -> list[CandidateReport]:
    """The loader's order: newest step first, a v1 file before a legacy one of the same step, and
    otherwise the order given (:func:`candidates_of` puts a later write of one step first)."""
    return sorted(reports, key=lambda r: (r.step is None, -(r.step or 0), r.path.suffix != ".ckpt"))


def _resume_row(rows: list[CandidateReport], verify: Verify) -> CandidateReport | None:
    """The row a resume would load: the newest valid one with a step (the loader ignores the rest)."""
    if verify == Verify.none:
        return None
    return next((r for r in resume_rows(rows) if r.status == "valid" and r.step is not None), None)


def _skipped(rows: list[CandidateReport], chosen: CandidateReport) -> list[CandidateReport]:
    """The newer candidates a resume would try and skip before it loads ``chosen``."""
    rows = resume_rows(rows)
    return [r for r in rows[: rows.index(chosen)] if r.status != "valid"]


def _exit_code(rows: list[CandidateReport], *, single_file: bool) -> int:
    """0 all valid; 2 some valid and some not, an older broken file included (a resume that
    loads the newest still finds a directory that needs attention); 3 none valid (or the one
    file given is not)."""
    valid = sum(row.status == "valid" for row in rows)
    if rows and valid == len(rows):
        return EXIT_OK
    if valid and not single_file:
        return EXIT_PARTIAL
    return EXIT_CHECKPOINT


def _summary(rows: list[CandidateReport], verify: Verify) -> str:
    counted = plural(len(rows), "checkpoint")
    if not rows:
        return "no checkpoints"
    if verify == Verify.none:
        return f"{counted} found; contents not checked (--verify none: only the 64-byte preludes were read)"
    valid = [row for row in rows if row.status == "valid"]
    broken = ", ".join(
        f"{n} {kind}" for kind in ("corrupted", "incompatible") if (n := sum(r.status == kind for r in rows))
    )
    text = f"{counted}, all valid" if not broken else f"{counted}: {len(valid)} valid, {broken}"
    chosen = _resume_row(rows, verify)
    if not valid:
        return f"{counted}: none valid ({broken}); a resume would fail"
    if chosen is None:
        return f"{text}; a resume would fail: the loader ignores legacy files without a readable step"
    if verify == Verify.structure:
        return (
            f"{text}; newest valid: step {step_text(chosen.step)} (structure only; not checked: "
            f"{', '.join(NOT_CHECKED[verify])}; --verify full checks what a resume checks)"
        )
    skipped = _skipped(rows, chosen)
    if not skipped:
        return f"{text}; a resume would load step {chosen.step}"
    names = "; ".join(f"{r.path.name}: {r.reason}" for r in skipped)
    fallback = "(falling back past newer broken ones)"
    return f"{text}; a resume would load step {chosen.step} {fallback}, skipping {names}"


def _status(row: CandidateReport, verify: Verify) -> str:
    return "unchecked" if verify == Verify.none and row.status == "valid" else row.status


def _print(target: str, verify: Verify, rows: list[CandidateReport]) -> None:
    out = stdout()
    out.print(f"[bold]{shown(str(target))}[/] ({TITLES[verify]})")
    table = Table()
    for name, justify in (("step", "right"), ("file", "left"), ("size", "right"), ("version", "left")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("status", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for row in rows:
        status = _status(row, verify)
        table.add_row(
            step_text(row.step),
            shown(row.path.name),
            human_bytes(row.size),
            row.version or "-",
            f"[{STYLES.get(status, 'dim')}]{status}[/]",
            shown(row.reason or ""),
        )
    if rows:
        out.print(table)
    out.print(shown(_summary(rows, verify)), soft_wrap=True)


def _document(target: str, verify: Verify, rows: list[CandidateReport], code: int) -> dict[str, Any]:
    counts = {
        status: sum(r.status == status for r in rows) for status in ("valid", "corrupted", "incompatible")
    }
    chosen = _resume_row(rows, verify)
    return {
        "path": str(target),
        "verify": verify.value,
        "not_checked": NOT_CHECKED[verify],
        "checkpoints": [
            {
                "step": row.step,
                "file": row.path.name,
                "path": str(row.path),
                "size": row.size,
                "version": row.version,
                "status": _status(row, verify),
                "reason": row.reason,
            }
            for row in rows
        ],
        "summary": {"total": len(rows), **counts, "text": _summary(rows, verify)},
        "resume_step": None if chosen is None else chosen.step,
        "resume_file": None if chosen is None else str(chosen.path),
        "resume_falls_back": None if chosen is None else bool(_skipped(rows, chosen)),
        "exit_code": code if rows else EXIT_CHECKPOINT,
    }
