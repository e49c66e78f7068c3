"""The ``asyncckpt`` command line: validate, ls, inspect, logs and demo.

Every command reads only (``demo`` writes its own directory). Exit codes (errors.py): 0 success,
1 usage or unexpected error (and a path that does not exist or cannot be listed), 2 some
checkpoints valid and some not (``validate``), 3 a checkpoint problem (none valid, the file is
not a readable checkpoint, no checkpoints at all). Errors are one line on stderr; ``--debug``
adds the traceback.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, ParamSpec, TypeVar

import structlog
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.tree import Tree
from typer.core import TyperGroup

from . import format as fmt
from ._version import __version__
from .demo import DEFAULT_DIRECTORY, DEFAULT_EVERY, DEFAULT_STEPS, print_report, run_demo
from .errors import EXIT_CHECKPOINT, EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, CheckpointError
from .events import EVENTS_FILE
from .format.legacy import LEGACY_VERSION
from .inspection import (
    Entry,
    Inspection,
    TensorRow,
    inspect_file,
    plain_json,
    prelude_report,
    read_prelude,
    resume_candidates,
    scan_directory,
    without_path,
)
from .loader import CandidateReport, check_candidates
from .tail import DEFAULT_POLL_INTERVAL, follow_lines, read_lines

try:  # typer >= 0.22 vendors click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError  # type: ignore[no-redef,import-not-found]

P = ParamSpec("P")
R = TypeVar("R")

PROGRESS_MIN_BYTES = 256 << 20  # validate shows a progress bar past this many bytes to read
TREE_INLINE_ITEMS = 12  # lists of plain values up to this long are shown on one line
TREE_VALUE_CHARS = 80
PIPE_WIDTH = 200  # output width when stdout is not a terminal (and COLUMNS is not set)


class CliError(Exception):
    """A problem the CLI reports as one line and an exit code (no traceback without --debug)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Group(TyperGroup):
    """Usage errors exit with 1, since 2 means "partial" for ``validate``."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as exc:
            exc.exit_code = EXIT_FAILURE
            raise

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            exc.exit_code = EXIT_FAILURE
            raise


app = typer.Typer(
    cls=_Group,
    name="asyncckpt",
    help="Inspect, validate and follow asyncckpt checkpoint directories.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

DebugOption = Annotated[bool, typer.Option("--debug", help="On error, also print the traceback.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON document.")]


def main() -> None:
    """Entry point of the ``asyncckpt`` console script and of ``python -m asyncckpt``."""
    app(prog_name="asyncckpt")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"asyncckpt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: DebugOption = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    ctx.obj = {"debug": debug}


# --------------------------------------------------------------------------- error handling


def _reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors of ``command`` into one line on stderr and the documented exit code."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, UsageError, KeyboardInterrupt):
            raise
        except CliError as exc:
            _fail(str(exc), exc.exit_code, kwargs)
        except CheckpointError as exc:
            _fail(str(exc), exc.exit_code, kwargs)
        except OSError as exc:
            _fail(_os_error_text(exc), EXIT_FAILURE, kwargs)
        except Exception as exc:
            _fail(
                f"unexpected error: {type(exc).__name__}: {exc} (--debug shows the traceback)",
                EXIT_FAILURE,
                kwargs,
            )

    return run


def _fail(message: str, code: int, kwargs: dict[str, Any]) -> NoReturn:
    ctx = kwargs.get("ctx")  # the click context typer passes (not always a typer.Context instance)
    settings = ctx.find_root().obj if ctx is not None else None
    if kwargs.get("debug") or (isinstance(settings, dict) and settings.get("debug")):
        traceback.print_exc(file=sys.stderr)
    _stderr().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _os_error_text(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


def _stdout() -> Console:
    return _console(stderr=False)


def _stderr() -> Console:
    return _console(stderr=True)


def _console(*, stderr: bool) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH  # pipes and files: do not fold table cells at 80 columns
    return console


def _existing(path: Path) -> Path:
    """``path`` if it exists; otherwise a :class:`CliError` naming it (exit code 1)."""
    if not path.exists():
        raise CliError(f"{path}: no such file or directory")
    return path


def _directory(path: Path, *, hint: str) -> Path:
    if not _existing(path).is_dir():
        raise CliError(f"{path}: not a directory ({hint})")
    return path


# --------------------------------------------------------------------------- validate


ValidationMode = Literal["structure", "full", "skip"]


@app.command()
@_reports_errors
def validate(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A checkpoint directory or one checkpoint file.")],
    full: Annotated[
        bool, typer.Option("--full", help="Also read every tensor blob and check its CRC32C.")
    ] = False,
    skip_validation: Annotated[
        bool,
        typer.Option(
            "--skip-checkpoint-validation",
            help="Only find the candidates and read their format version; check nothing else.",
        ),
    ] = False,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Check checkpoints without changing anything (a dry run of a resume).

    By default the structure of each file is checked (prelude, trailer, header with every length
    bounded); --full also reads every blob and checks its checksum. Exit code 0: every checkpoint
    valid; 2: some valid, some not (a resume would fall back); 3: none valid, or the single file
    given is invalid; 1: usage or unexpected errors.
    """
    if full and skip_validation:
        raise CliError("--full and --skip-checkpoint-validation exclude each other")
    mode: ValidationMode = "full" if full else "skip" if skip_validation else "structure"
    target = _existing(path)
    files = resume_candidates(target)
    rows = _check_all(files, mode)
    code = _validation_exit_code(rows, single_file=not target.is_dir())
    if as_json:
        typer.echo(json.dumps(_validation_document(target, mode, rows, code), indent=2))
    else:
        _print_validation(target, mode, rows)
    if not rows:
        raise CliError(f"{target}: no checkpoints (no step-*.ckpt, *.pt or *.pth files)", EXIT_CHECKPOINT)
    raise typer.Exit(code)


def _check_all(files: list[Path], mode: ValidationMode) -> list[CandidateReport]:
    if mode == "skip":
        return [prelude_report(path) for path in files]
    total = sum(path.stat().st_size for path in files)
    if mode != "full" or total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        return _newest_first(
            [report for path in files for report in check_candidates(path, full=mode == "full")]
        )
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    reports = []
    with Progress(*columns, console=_stderr(), transient=True) as progress:
        task = progress.add_task("validating", total=total)
        for path in files:
            progress.update(task, description=f"checking {path.name}")
            reports += check_candidates(path, full=True)
            progress.advance(task, path.stat().st_size)
    return _newest_first(reports)


def _newest_first(reports: list[CandidateReport]) -> list[CandidateReport]:
    """The loader's order: newest step first, a v1 file before a legacy one of the same step."""
    return sorted(
        reports, key=lambda r: (r.step is None, -(r.step or 0), r.path.suffix != ".ckpt", r.path.name)
    )


def _validation_exit_code(rows: list[CandidateReport], *, single_file: bool) -> int:
    valid = sum(row.status == "valid" for row in rows)
    if rows and valid == len(rows):
        return EXIT_OK
    if valid and not single_file:
        return EXIT_PARTIAL
    return EXIT_CHECKPOINT


def _validation_summary(rows: list[CandidateReport], mode: ValidationMode) -> str:
    counted = f"{len(rows)} checkpoint{'s' if len(rows) != 1 else ''}"
    if not rows:
        return "no checkpoints"
    if mode == "skip":
        return f"{counted} found; contents not checked (--skip-checkpoint-validation)"
    valid = [row for row in rows if row.status == "valid"]
    broken = ", ".join(
        f"{n} {kind}" for kind in ("corrupted", "incompatible") if (n := sum(r.status == kind for r in rows))
    )
    text = f"{counted}, all valid" if not broken else f"{counted}: {len(valid)} valid, {broken}"
    if not valid:
        return f"{counted}: none valid ({broken}); a resume would fail"
    newest = _step_text(valid[0].step)
    if mode == "structure":
        return f"{text}; newest valid: step {newest} (structure only: --full also checks every checksum)"
    fallback = " (falling back past newer broken ones)" if rows[0].status != "valid" else ""
    return f"{text}; a resume would load step {newest}{fallback}"


def _print_validation(target: Path, mode: ValidationMode, rows: list[CandidateReport]) -> None:
    out = _stdout()
    title = {
        "structure": "structure checked",
        "full": "structure and checksums checked",
        "skip": "not checked",
    }
    out.print(f"[bold]{escape(str(target))}[/] ({title[mode]})")
    table = Table()
    for name, justify in (("step", "right"), ("file", "left"), ("size", "right"), ("version", "left")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("status", no_wrap=True)
    table.add_column("reason", overflow="fold")
    styles = {"valid": "green", "corrupted": "bold red", "incompatible": "yellow"}
    for row in rows:
        status = "unchecked" if mode == "skip" and row.status == "valid" else row.status
        table.add_row(
            _step_text(row.step),
            escape(row.path.name),
            human_bytes(row.size),
            row.version or "-",
            f"[{styles.get(status, 'dim')}]{status}[/]",
            escape(row.reason or ""),
        )
    if rows:
        out.print(table)
    out.print(_validation_summary(rows, mode))


def _validation_document(
    target: Path, mode: ValidationMode, rows: list[CandidateReport], code: int
) -> dict[str, Any]:
    counts = {
        status: sum(r.status == status for r in rows) for status in ("valid", "corrupted", "incompatible")
    }
    newest_valid = next((r.step for r in rows if r.status == "valid"), None)
    return {
        "path": str(target),
        "mode": mode,
        "checkpoints": [
            {
                "step": row.step,
                "file": row.path.name,
                "path": str(row.path),
                "size": row.size,
                "version": row.version,
                "status": "unchecked" if mode == "skip" and row.status == "valid" else row.status,
                "reason": row.reason,
            }
            for row in rows
        ],
        "summary": {"total": len(rows), **counts, "text": _validation_summary(rows, mode)},
        "resume_step": newest_valid if mode != "skip" else None,
        "exit_code": code if rows else EXIT_CHECKPOINT,
    }


# --------------------------------------------------------------------------- ls


@app.command("ls")
@_reports_errors
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
    root = _directory(directory, hint="use `asyncckpt inspect` for one file")
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
        _print_listing(root, entries, preludes)
    if not any(e.kind != "temp" for e in entries):
        raise CliError(f"{root}: no checkpoints (no step-*.ckpt, *.pt or *.pth files)", EXIT_CHECKPOINT)


Preludes = dict[Path, tuple[str | None, CheckpointError | None]]


def _problem(entry: Entry, preludes: Preludes) -> str | None:
    error = preludes[entry.path][1] if entry.kind != "temp" else None
    return None if error is None else without_path(error, entry.path)


def _print_listing(root: Path, entries: list[Entry], preludes: Preludes) -> None:
    out = _stdout()
    if entries:
        out.print(f"[bold]{escape(str(root))}[/]")
        table = Table()
        for name, justify in (("step", "right"), ("modified (UTC)", "left"), ("size", "right")):
            table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        table.add_column("version", no_wrap=True)
        table.add_column("file", no_wrap=True)
        table.add_column("note", overflow="fold")
        notes = {
            "checkpoint": "",
            "legacy": "[cyan]legacy[/] (torch.save, read-only)",
            "temp": "[yellow]temp[/] (unfinished write)",
        }
        for e in entries:
            version = preludes[e.path][0] if e.kind != "temp" else "-"
            problem = _problem(e, preludes)
            table.add_row(
                _step_text(e.step),
                e.modified.strftime("%Y-%m-%d %H:%M:%S"),
                human_bytes(e.size),
                escape(version or "?"),
                escape(e.path.name),
                f"[red]{escape(problem)}[/]" if problem else notes[e.kind],
            )
        out.print(table)
    counts = {kind: sum(e.kind == kind for e in entries) for kind in ("checkpoint", "legacy", "temp")}
    total = sum(e.size for e in entries if e.kind != "temp")
    parts = [f"{counts['checkpoint']} checkpoint{'s' if counts['checkpoint'] != 1 else ''}"]
    parts += [f"{counts['legacy']} legacy"] if counts["legacy"] else []
    parts += [f"{counts['temp']} temp file{'s' if counts['temp'] != 1 else ''}"] if counts["temp"] else []
    out.print(f"{', '.join(parts)}; {human_bytes(total)} in checkpoints")


# --------------------------------------------------------------------------- inspect


@app.command("inspect")
@_reports_errors
def inspect_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="One checkpoint file (v1 or legacy torch.save).")],
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Show a checkpoint's metadata, its tensor table (key, dtype, shape, bytes) and its plain values.

    Reads the header only (legacy files: the pickled structure): use `validate --full` to check
    the tensor bytes.
    """
    if _existing(file).is_dir():
        raise CliError(f"{file}: is a directory (use `asyncckpt ls` or `asyncckpt validate`)")
    found = inspect_file(file)
    if as_json:
        typer.echo(json.dumps(_inspection_document(found), indent=2))
        return
    out = _stdout()
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
        ("step", _step_text(found.step)),
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


def plain_tree(tree: Any, *, label: str) -> Tree:
    """A rich tree of the plain values of ``tree``; tensor-only branches collapse to a count."""
    root = Tree(label)
    _add_branch(root, tree)
    return root


def _add_branch(node: Tree, value: Any) -> None:
    items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
    hidden = 0
    for key, child in items:
        name = escape(str(key) if isinstance(value, dict) and isinstance(key, str) else f"[{key}]")
        tensors = _count_tensors(child)
        if isinstance(child, fmt.TensorRef):
            hidden += 1
        elif isinstance(child, dict | list | tuple) and tensors == _count_leaves(child) and tensors:
            node.add(f"[cyan]{name}[/]: [dim]{tensors} tensor{'s' if tensors != 1 else ''}[/]")
        elif isinstance(child, dict | list | tuple) and not _inline(child):
            _add_branch(node.add(f"[cyan]{name}[/]" + _container_note(child)), child)
        else:
            node.add(f"[cyan]{name}[/]: {escape(_short(child))}")
    if hidden:
        node.add(f"[dim]{hidden} tensor{'s' if hidden != 1 else ''}[/]")


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


def _inspection_document(found: Inspection) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- logs


class Level(enum.StrEnum):
    """Event levels, lowest first (structlog's names)."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"
    critical = "critical"


@dataclass(frozen=True)
class EventFilter:
    """Which events ``logs`` prints: any of the name globs (all when none), at least ``level``."""

    patterns: tuple[str, ...] = ()
    level: str = "debug"

    def matches(self, event: dict[str, Any]) -> bool:
        name = str(event.get("event", ""))
        if self.patterns and not any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
            return False
        return _level_rank(event.get("level")) >= _level_rank(self.level)


def _level_rank(level: Any) -> int:
    """Position of ``level`` in :class:`Level` ("exception" counts as "error"; unknown as lowest)."""
    text = str(level).lower()
    names = [member.value for member in Level]
    text = "error" if text == "exception" else text
    return names.index(text) if text in names else 0


def parse_event(line: str) -> dict[str, Any] | None:
    """The event dict of one events.jsonl line; None when it is not a JSON object."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@app.command()
@_reports_errors
def logs(
    ctx: typer.Context,
    path: Annotated[
        Path, typer.Argument(help=f"A checkpoint directory (its {EVENTS_FILE}) or an events file.")
    ],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events (like tail -F); Ctrl-C stops.")
    ] = False,
    event: Annotated[
        list[str] | None,
        typer.Option("--event", "-e", help="Only events whose name matches this glob (repeatable)."),
    ] = None,
    level: Annotated[
        Level, typer.Option("--level", "-l", help="Only events at this level or above.")
    ] = Level.debug,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the matching lines as JSON, unchanged.")
    ] = False,
    debug: DebugOption = False,
    max_lines: Annotated[int | None, typer.Option("--max-lines", hidden=True)] = None,
    idle_timeout: Annotated[float | None, typer.Option("--idle-timeout", hidden=True)] = None,
    poll_interval: Annotated[float, typer.Option("--poll-interval", hidden=True)] = DEFAULT_POLL_INTERVAL,
) -> None:
    """Print the writer's structured events, colored like structlog's console output.

    Lines that are not JSON objects are skipped with a note on stderr. A half-written last line is
    never printed. With --follow, a directory without an events file yet is waited on.
    """
    source = _events_file(path, follow=follow)
    if follow and not source.exists():
        _stderr().print(f"waiting for {escape(str(source))} to appear", soft_wrap=True)
    keep = EventFilter(tuple(event or ()), level.value)
    render = _renderer(as_json)
    lines: Iterable[str] = (
        follow_lines(source, poll_interval=poll_interval, idle_timeout=idle_timeout)
        if follow
        else read_lines(source)
    )
    printed = 0
    for line in lines:
        parsed = parse_event(line)
        if parsed is None:
            if line.strip():
                note = f"[yellow]skipped[/] a line that is not a JSON object: {escape(line[:80])}"
                _stderr().print(note, soft_wrap=True)
            continue
        if not keep.matches(parsed):
            continue
        typer.echo(render(line, parsed))
        printed += 1
        if max_lines is not None and printed >= max_lines:
            break


def _events_file(path: Path, *, follow: bool) -> Path:
    if _existing(path).is_dir():
        source = path / EVENTS_FILE
        if not source.exists() and not follow:
            raise CliError(f"{path}: no {EVENTS_FILE} (has a checkpointer written here yet?)")
        return source
    return path


def _renderer(as_json: bool) -> Callable[[str, dict[str, Any]], str]:
    if as_json:
        return lambda line, _: line
    console = _stdout()
    colors = console.is_terminal and not console.no_color
    console_renderer = structlog.dev.ConsoleRenderer(colors=colors, sort_keys=False)

    def render(_: str, event: dict[str, Any]) -> str:
        event = dict(event)
        event.setdefault("event", "")
        level = str(event.get("level", "info"))
        return str(console_renderer(None, level, event))

    return render


# --------------------------------------------------------------------------- demo


@app.command()
@_reports_errors
def demo(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="Where the checkpoints go.")] = DEFAULT_DIRECTORY,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Train up to this step.")] = DEFAULT_STEPS,
    every: Annotated[
        int, typer.Option("--every", min=1, help="Save a checkpoint every K steps.")
    ] = DEFAULT_EVERY,
    crash_at: Annotated[
        int | None,
        typer.Option(
            "--crash-at", min=1, help="Kill the process (os._exit) after this step, to show the resume."
        ),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Train a small MLP on CPU with AsyncCheckpointer; run it again to resume.

    Synthetic data, a few seconds. The progress bar shows the last checkpoint's stall (time
    taken from training) and write figures. A second run resumes from the newest valid
    checkpoint and prints the loader's summary. With --crash-at the process exits with code 137
    after that step, losing any save in flight.
    """
    if directory.exists() and not directory.is_dir():
        raise CliError(f"{directory}: not a directory")
    out = _stdout()
    report = run_demo(directory, steps=steps, every=every, crash_at=crash_at, console=out)
    print_report(report, out)


# --------------------------------------------------------------------------- formatting


def human_bytes(n: int) -> str:
    """``14342161`` → ``14.3 MB`` (decimal units, like the write speeds)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _step_text(step: int | None) -> str:
    return "-" if step is None else str(step)
