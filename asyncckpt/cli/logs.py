"""``asyncckpt logs``: the writer's structured events, filtered, printed like structlog's console."""

from __future__ import annotations

import enum
import fnmatch
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer

from ..errors import UsageError
from ..events import EVENTS_FILE
from ..tail import DEFAULT_POLL_INTERVAL, follow_lines, read_lines
from .exits import DebugOption, existing, reports_errors
from .render import echo, shown, stderr, stdout


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
        """Whether ``event`` passes the name globs and the level."""
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


@reports_errors
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
        stderr().print(f"waiting for {shown(str(source))} to appear", soft_wrap=True)
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
                note = f"[yellow]skipped[/] a line that is not a JSON object: {shown(line[:80])}"
                stderr().print(note, soft_wrap=True)
            continue
        if not keep.matches(parsed):
            continue
        echo(render(line, parsed))
        printed += 1
        if max_lines is not None and printed >= max_lines:
            break


def _events_file(path: Path, *, follow: bool) -> Path:
    if existing(path).is_dir():
        source = path / EVENTS_FILE
        if not source.exists() and not follow:
            raise UsageError(f"no {EVENTS_FILE} (has a checkpointer written here yet?)", path=path)
        return source
    return path


def _renderer(as_json: bool) -> Callable[[str, dict[str, Any]], str]:
    if as_json:
        return lambda line, _: line
    console = stdout()
    colors = console.is_terminal and not console.no_color
    console_renderer = structlog.dev.ConsoleRenderer(colors=colors, sort_keys=False)

    def render(_: str, event: dict[str, Any]) -> str:
        event = dict(event)
        event.setdefault("event", "")
        level = str(event.get("level", "info"))
        return str(console_renderer(None, level, event))

    return render
