"""``asyncckpt inspect``: one file's metadata, tensor table and plain values (header only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..errors import UsageError
from ..format.legacy import LEGACY_VERSION
from .exits import DebugOption, reports_errors
from .inspection import Inspection, TensorRow, inspect_file, plain_json
from .render import JsonOption, human_bytes, plain_tree, shown, stdout, step_text
from .steps import StepInspection, inspect_step, is_step_folder
from .targets import StorageOptionsOption, open_location


@reports_errors
def inspect_command(
    ctx: typer.Context,
    file: Annotated[
        str,
        typer.Argument(help="One checkpoint file (a path or a URL) or a multi-rank step folder."),
    ],
    as_json: JsonOption = False,
    storage_options: StorageOptionsOption = None,
    debug: DebugOption = False,
) -> None:
    """Show a checkpoint's metadata, its tensor table (key, dtype, shape, bytes) and its plain values.

    Reads the header only (legacy files: the pickled structure): use `validate` to check the
    tensor bytes. A multi-rank step folder (`step-0000000300/`): its commit record, each rank's
    shard file (checked against the record's digest) and DCP's tensors (global shapes).
    """
    if "://" not in file and is_step_folder(Path(file)):
        show_step(inspect_step(Path(file)), as_json=as_json)
        return
    storage, name = open_location(file, storage_options)
    if name is None:
        raise UsageError("is a directory (use `asyncckpt ls` or `asyncckpt validate`)", path=storage.location)
    found = inspect_file((storage, name))
    if as_json:
        typer.echo(json.dumps(_document(found), indent=2))
        return
    out = stdout()
    out.print(_metadata_table(found))
    if found.tensors:
        out.print(f"[bold]tensors[/] ({len(found.tensors)})")
        out.print(_tensor_table(found.tensors))
    out.print(
        plain_tree(found.tree, label="[bold]state[/] (plain values; tensors are counted, see the table)")
    )


def _metadata_table(found: Inspection) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    total = sum(t.nbytes for t in found.tensors)
    rows = [
        ("file", str(found.path)),
        ("size", f"{human_bytes(found.size)} ({found.size} bytes)"),
        ("format", found.version + (" (legacy torch.save)" if found.version == LEGACY_VERSION else "")),
        ("step", step_text(found.step)),
        ("created", found.created or "-"),
        ("writer", found.writer or "-"),
        ("tensors", f"{len(found.tensors)}, {human_bytes(total)}"),
    ]
    for name, value in rows:
        table.add_row(name, shown(value))
    metadata = plain_json(found.metadata)
    table.add_row("metadata", shown(json.dumps(metadata, ensure_ascii=False)) if metadata else "-")
    return table


def _tensor_table(tensors: list[TensorRow]) -> Table:
    table = Table()
    table.add_column("key", overflow="fold")
    table.add_column("dtype", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    for t in tensors:
        table.add_row(shown(t.key), t.dtype, f"[{', '.join(map(str, t.shape))}]", f"{t.nbytes:,}")
    return table


def _document(found: Inspection) -> dict[str, Any]:
    return {
        "path": str(found.path),
        "size": found.size,
        "version": found.version,
        "step": found.step,
        "created": found.created,
        "writer": found.writer,
        "metadata": plain_json(found.metadata),
        "tensors": [
            {"key": t.key, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes} for t in found.tensors
        ],
        "tree": plain_json(found.tree),
    }


def show_step(found: StepInspection, *, as_json: bool) -> None:
    """Print one multi-rank step: the record, each rank's shard, DCP's tensors and plain values."""
    if as_json:
        typer.echo(json.dumps(_step_document(found), indent=2))
        return
    out = stdout()
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    metadata = plain_json(found.metadata)
    for name, value in (
        ("step folder", str(found.path)),
        ("step", str(found.step)),
        ("world size", str(found.world_size)),
        ("committed", found.committed_at),
        ("commit record", f"{human_bytes(found.record_size)} ({found.record_size} bytes)"),
        ("metadata", json.dumps(metadata, ensure_ascii=False) if metadata else "-"),
    ):
        table.add_row(name, shown(value))
    out.print(table)
    shards = Table(title=f"shards ({len(found.shards)})", title_justify="left")
    for name in ("rank", "file", "size", "tensors", "status"):
        shards.add_column(name, justify="right" if name in ("rank", "size", "tensors") else "left")
    for row in found.shards:
        status = "[green]ok[/]" if row.status == "ok" else f"[bold red]{shown(row.status)}[/]"
        size = "-" if row.size is None else human_bytes(row.size)
        count = "-" if row.tensors is None else str(row.tensors)
        shards.add_row(str(row.rank), shown(row.file), size, count, status)
    out.print(shards)
    tensors = Table(title=f"tensors ({len(found.tensors)}, global shapes)", title_justify="left")
    for name in ("key", "dtype", "shape", "chunks"):
        tensors.add_column(name, overflow="fold" if name == "key" else "ellipsis")
    for t in found.tensors:
        tensors.add_row(shown(t.key), t.dtype, f"[{', '.join(map(str, t.shape))}]", str(t.chunks))
    out.print(tensors)
    if found.values:
        out.print(f"[bold]plain values[/] ({len(found.values)}): " + shown(", ".join(found.values)))


def _step_document(found: StepInspection) -> dict[str, Any]:
    return {
        "path": str(found.path),
        "step": found.step,
        "world_size": found.world_size,
        "committed": found.committed_at,
        "record_size": found.record_size,
        "metadata": plain_json(found.metadata),
        "shards": [
            {"rank": r.rank, "file": r.file, "size": r.size, "tensors": r.tensors, "status": r.status}
            for r in found.shards
        ],
        "tensors": [
            {"key": t.key, "dtype": t.dtype, "shape": list(t.shape), "chunks": t.chunks}
            for t in found.tensors
        ],
        "values": found.values,
    }
