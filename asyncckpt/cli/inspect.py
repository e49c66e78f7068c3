"""``asyncckpt inspect``: one file's metadata, tensor table and plain values (header only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import UsageError
from ..format.legacy import LEGACY_VERSION
from .exits import DebugOption, existing, reports_errors
from .inspection import Inspection, TensorRow, inspect_file, plain_json
from .render import JsonOption, human_bytes, plain_tree, stdout, step_text


@reports_errors
def inspect_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="One checkpoint file (v1 or legacy torch.save).")],
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Show a checkpoint's metadata, its tensor table (key, dtype, shape, bytes) and its plain values.

    Reads the header only (legacy files: the pickled structure): use `validate` to check the
    tensor bytes.
    """
    if existing(file).is_dir():
        raise UsageError("is a directory (use `asyncckpt ls` or `asyncckpt validate`)", path=file)
    found = inspect_file(file)
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
        table.add_row(name, escape(value))
    metadata = plain_json(found.metadata)
    table.add_row("metadata", escape(json.dumps(metadata, ensure_ascii=False)) if metadata else "-")
    return table


def _tensor_table(tensors: list[TensorRow]) -> Table:
    table = Table()
    table.add_column("key", overflow="fold")
    table.add_column("dtype", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    for t in tensors:
        table.add_row(escape(t.key), t.dtype, f"[{', '.join(map(str, t.shape))}]", f"{t.nbytes:,}")
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
