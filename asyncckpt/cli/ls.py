"""``asyncckpt ls``: the files of a checkpoint directory, from their names and first 64 bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import CheckpointError, NoValidCheckpointError
from .exits import DebugOption, existing_directory, reports_errors
from .inspection import Entry, read_prelude, scan_directory
from .render import JsonOption, human_bytes, plural, stdout, step_text
from .validate import NO_CHECKPOINTS

Preludes = dict[Path, tuple[str | None, CheckpointError | None]]

NOTES = {
    "checkpoint": "",
    "legacy": "[cyan]legacy[/] (torch.save, read-only)",
    "temp": "[yellow]temp[/] (unfinished write)",
}


@reports_errors
def list_directory(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="A checkpoint directory.")],
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """List checkpoints with step, time, size and format version; mark temp and legacy files.

    Reads only the first 64 bytes of each file: use `validate` to check them. Exit code 3 when
    the directory holds no checkpoint.
    """
    root = existing_directory(directory, hint="use `asyncckpt inspect` for one file")
    entries = scan_directory(root)
    preludes = {e.path: read_prelude(e.path) for e in entries if e.kind != "temp"}
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
        typer.echo(json.dumps({"path": str(root), "files": document}, indent=2))
    else:
        _print(root, entries, preludes)
    if not any(e.kind != "temp" for e in entries):
        raise NoValidCheckpointError(NO_CHECKPOINTS, path=root)


def _problem(entry: Entry, preludes: Preludes) -> str | None:
    error = preludes[entry.path][1] if entry.kind != "temp" else None
    return None if error is None else error.reason


def _print(root: Path, entries: list[Entry], preludes: Preludes) -> None:
    out = stdout()
    if entries:
        out.print(f"[bold]{escape(str(root))}[/]")
        out.print(_table(entries, preludes))
    counts = {kind: sum(e.kind == kind for e in entries) for kind in ("checkpoint", "legacy", "temp")}
    total = sum(e.size for e in entries if e.kind != "temp")
    parts = [plural(counts["checkpoint"], "checkpoint")]
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
            escape(version or "?"),
            escape(e.path.name),
            f"[red]{escape(problem)}[/]" if problem else NOTES[e.kind],
        )
    return table
