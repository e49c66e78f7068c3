"""Rendering shared by the commands: consoles, sizes, steps and the tree of a checkpoint's values."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from typing import Annotated, Any, TextIO, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from .. import format as fmt
from ..loading.report import printable

TREE_INLINE_ITEMS = 12  # lists of plain values up to this long are shown on one line
TREE_VALUE_CHARS = 80
PIPE_WIDTH = 200  # output width when stdout is not a terminal (and COLUMNS is not set)

JsonOption = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON document.")]


def stdout() -> Console:
    """The console for a command's output."""
    return console(stderr=False)


def stderr() -> Console:
    """The console for errors, notes and progress bars (stdout stays clean for --json)."""
    return console(stderr=True)


def console(*, stderr: bool) -> Console:
    """A rich console without highlighting; as wide as :data:`PIPE_WIDTH` when not a terminal.

    It writes through :class:`Printable`, so that no text can make it raise UnicodeEncodeError.
    """
    made = Console(file=cast(TextIO, Printable(sys.stderr if stderr else sys.stdout)), highlight=False)
    if not made.is_terminal and "COLUMNS" not in os.environ:
        made.width = PIPE_WIDTH  # pipes and files: do not fold table cells at 80 columns
    return made


def shown(text: str) -> str:
    """``text`` for a rich console: markup escaped, and a name that is not UTF-8 (Linux names are
    bytes) with its odd bytes as ``\\xNN``, so that it prints on any stream and keeps its width."""
    return escape(printable(text))


def echo(text: str) -> None:
    """``typer.echo`` of :func:`printable` text."""
    typer.echo(printable(text))


class Printable(io.TextIOBase):
    """A text stream that writes anything: lone surrogates (names that are not UTF-8) as
    ``\\xNN``, and characters its encoding lacks (an ASCII terminal) as backslash escapes."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    @property
    def encoding(self) -> str:  # type: ignore[override]
        """The encoding of the stream written to (rich picks its box characters by it)."""
        return getattr(self.stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        """Write ``text``, escaped where the stream could not take it."""
        text = printable(text)
        try:
            self.stream.write(text)
        except UnicodeEncodeError:
            self.stream.write(text.encode(self.encoding, "backslashreplace").decode(self.encoding))
        return len(text)

    def flush(self) -> None:
        """Flush the stream written to."""
        self.stream.flush()

    def isatty(self) -> bool:
        """Whether the stream written to is a terminal."""
        return self.stream.isatty()

    def fileno(self) -> int:
        """The stream's file descriptor (``OSError`` when it has none)."""
        return self.stream.fileno()


def human_bytes(n: int) -> str:
    """``14342161`` → ``14.3 MB`` (decimal units, like the write speeds)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def step_text(step: int | None) -> str:
    """A step for a table cell: ``-`` when unknown."""
    return "-" if step is None else str(step)


def plural(count: int, noun: str) -> str:
    """``3 checkpoints``, ``1 checkpoint``."""
    return f"{count} {noun}{'s' if count != 1 else ''}"


def plain_tree(tree: Any, *, label: str) -> Tree:
    """A rich tree of the plain values of ``tree``; tensor-only branches collapse to a count."""
    root = Tree(label)
    _add_branch(root, tree)
    return root


def _add_branch(node: Tree, value: Any) -> None:
    if not isinstance(value, dict | list | tuple):  # the root itself is a tensor or a plain value
        node.add(
            f"[dim]{plural(1, 'tensor')}[/]" if isinstance(value, fmt.TensorRef) else shown(_short(value))
        )
        return
    items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
    hidden = 0
    for key, child in items:
        name = shown(str(key) if isinstance(value, dict) and isinstance(key, str) else f"[{key}]")
        tensors = _count_tensors(child)
        if isinstance(child, fmt.TensorRef):
            hidden += 1
        elif isinstance(child, dict | list | tuple) and tensors == _count_leaves(child) and tensors:
            node.add(f"[cyan]{name}[/]: [dim]{plural(tensors, 'tensor')}[/]")
        elif isinstance(child, dict | list | tuple) and not _inline(child):
            _add_branch(node.add(f"[cyan]{name}[/]" + _container_note(child)), child)
        else:
            node.add(f"[cyan]{name}[/]: {shown(_short(child))}")
    if hidden:
        node.add(f"[dim]{plural(hidden, 'tensor')}[/]")


def _container_note(value: Any) -> str:
    if isinstance(value, tuple):
        return " [dim](tuple)[/]"
    if isinstance(value, list):
        return f" [dim](list of {len(value)})[/]"
    return ""


def _inline(value: Any) -> bool:
    """Short lists/tuples of plain scalars, and empty containers, go on one line."""
    if isinstance(value, dict):
        return not value
    return len(value) <= TREE_INLINE_ITEMS and not any(
        isinstance(v, dict | list | tuple | fmt.TensorRef) for v in value
    )


def _short(value: Any) -> str:
    text = repr(_python(value))
    return text if len(text) <= TREE_VALUE_CHARS else text[: TREE_VALUE_CHARS - 1] + "…"


def _python(value: Any) -> Any:
    if isinstance(value, fmt.BigInt):
        return value.value
    if isinstance(value, list):
        return [_python(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_python(v) for v in value)
    return value


def _count_tensors(value: Any) -> int:
    return sum(1 for leaf in _leaves(value) if isinstance(leaf, fmt.TensorRef))


def _count_leaves(value: Any) -> int:
    return sum(1 for _ in _leaves(value))


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for child in value.values():
            yield from _leaves(child)
    elif isinstance(value, list | tuple):
        for child in value:
            yield from _leaves(child)
    else:
        yield value
