"""``asyncckpt ls``: the files of a checkpoint directory, from their names and first 64 bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import CheckpointError, NoValidCheckpointError, UsageError
from ..storage import CheckpointPath
from .exits import DebugOption, reports_errors
from .inspection import Entry, read_prelude, scan_directory
from .render import JsonOption, human_bytes, plural, shown, stdout, step_text
from .steps import StepEntry, has_step_folders, scan_steps, step_note
from .targets import StorageOptionsOption, open_location
from .validate import NO_CHECKPOINTS

Preludes = dict[CheckpointPath, tuple[str | None, CheckpointError | None]]

NOTES = {
    "checkpoint": "",
    "named": "named (step from its header)",
    "legacy": "[cyan]legacy[/] (torch.save, read-only)",
    "temp": "[yellow]temp[/] (unfinished write)",
}


@reports_errors
def list_directory(
    ctx: typer.Context,
    directory: Annotated[
        str, typer.Argument(help="A checkpoint directory: a path, or a URL such as s3://bucket/run/.")
    ],
    as_json: JsonOption = False,
    storage_options: StorageOptionsOption = None,
    debug: DebugOption = False,
) -> None:
    """List checkpoints with step, time, size and format version; mark temp and legacy files.

    Reads only the first 64 bytes of each file: use `validate` to check them. Exit code 3 when
    the directory holds no checkpoint. On an object store the listing is one LIST request, and
    uploads without their commit object show as temp.
    """
    storage, name = open_location(directory, storage_options)
    if name is not None:
        raise UsageError("not a directory (use `asyncckpt inspect` for one file)", path=storage.where(name))
    root = storage.location
    entries = scan_directory(storage)
    preludes = {e.path: read_prelude(e) for e in entries if e.kind != "temp"}
    steps = scan_steps(Path(root)) if "://" not in root and has_step_folders(Path(root)) else []
    if as_json:
        document = [
            {
                "step": e.step,
                "file": e.path.name,
                "kind": e.kind,
                "size": e.size,
                "modified": e.modified.isoformat(),
                "version": preludes[e.path][0] if e.kind != "temp" else None,
                "problem": _problem(e, preludes),
            }
            for e in entries
        ]
        listing: dict[str, object] = {"path": str(root), "files": document}
        if steps:
            listing["steps"] = steps_json(steps)
        typer.echo(json.dumps(listing, indent=2))
    else:
        if entries or not steps:
            _print(root, entries, preludes)
        print_steps(steps)
    if not any(e.kind != "temp" for e in entries) and not any(s.committed for s in steps):
        raise NoValidCheckpointError(NO_CHECKPOINTS, path=root)


def _problem(entry: Entry, preludes: Preludes) -> str | None:
    error = preludes[entry.path][1] if entry.kind != "temp" else None
    return None if error is None else error.reason


def _print(root: str, entries: list[Entry], preludes: Preludes) -> None:
    out = stdout()
    if entries:
        out.print(f"[bold]{shown(str(root))}[/]")
        out.print(_table(entries, preludes))
    counts = {kind: sum(e.kind == kind for e in entries) for kind in ("named", "legacy", "temp")}
    total = sum(e.size for e in entries if e.kind != "temp")
    named = f" ({counts['named']} named)" if counts["named"] else ""
    parts = [plural(sum(e.kind in ("checkpoint", "named") for e in entries), "checkpoint") + named]
    parts += [f"{counts['legacy']} legacy"] if counts["legacy"] else []
    parts += [plural(counts["temp"], "temp file")] if counts["temp"] else []
    out.print(f"{', '.join(parts)}; {human_bytes(total)} in checkpoints")


def _table(entries: list[Entry], preludes: Preludes) -> Table:
    table = Table()
    for name, justify in (("step", "right"), ("modified (UTC)", "left"), ("size", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("version", no_wrap=True)
    table.add_column("file", no_wrap=True)
    table.add_column("note", overflow="fold")
    for e in entries:
        version = preludes[e.path][0] if e.kind != "temp" else "-"
        problem = _problem(e, preludes)
        table.add_row(
            step_text(e.step),
            e.modified.strftime("%Y-%m-%d %H:%M:%S"),
            human_bytes(e.size),
            shown(version or "?"),
            shown(e.path.name),
            f"[red]{shown(problem)}[/]" if problem else NOTES[e.kind],
        )
    return table


def steps_json(steps: list[StepEntry]) -> list[dict[str, object]]:
    """The ``--json`` rows of the multi-rank step folders."""
    return [
        {
            "step": s.step,
            "folder": s.path.name,
            "committed": s.committed,
            "world_size": s.world_size,
            "shards": s.shards,
            "temp_files": s.temps,
            "size": s.size,
            "modified": s.modified.isoformat(),
            "version": s.version,
            "problem": s.problem,
        }
        for s in steps
    ]


def print_steps(steps: list[StepEntry]) -> None:
    """The table of multi-rank step folders, and a count."""
    if not steps:
        return
    out = stdout()
    table = Table(title="multi-rank steps", title_justify="left")
    for name, justify in (("step", "right"), ("committed (UTC)", "left"), ("size", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for name in ("ranks", "version", "folder"):
        table.add_column(name, no_wrap=True)
    table.add_column("note", overflow="fold")
    for s in steps:
        note = shown(step_note(s))
        table.add_row(
            step_text(s.step),
            s.modified.strftime("%Y-%m-%d %H:%M:%S") if s.committed else "-",
            human_bytes(s.size),
            "-" if s.world_size is None else str(s.world_size),
            shown(s.version or "-"),
            shown(s.path.name + "/"),
            note if s.committed and not s.problem else f"[yellow]{note}[/]",
        )
    out.print(table)
    committed = sum(s.committed for s in steps)
    parts = [plural(committed, "multi-rank step")]
    parts += [f"{len(steps) - committed} uncommitted"] if committed != len(steps) else []
    total = sum(s.size for s in steps if s.committed)
    out.print(f"{', '.join(parts)}; {human_bytes(total)} in committed steps")
