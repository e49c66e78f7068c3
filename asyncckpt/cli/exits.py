"""How a command's errors become one line on stderr and the documented exit code.

Exit codes (errors.py): 0 success; 1 a usage error (bad options, a path that does not exist or
is of the wrong kind, :class:`~asyncckpt.errors.UsageError`), an OS error or an unexpected one;
2 some checkpoints valid and some not (``validate``); 3 a checkpoint problem
(:class:`~asyncckpt.errors.CheckpointError`: none valid, not a readable checkpoint, no
checkpoints at all). Every :class:`~asyncckpt.errors.AsyncckptError` exits with its own
``exit_code``. ``--debug`` adds the traceback.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
from typer.core import TyperGroup

from ..errors import EXIT_FAILURE, AsyncckptError, UsageError
from .render import shown, stderr

try:  # typer >= 0.22 vendors click
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover
    from click.exceptions import (  # type: ignore[assignment,no-redef,import-not-found,unused-ignore]
        UsageError as ClickUsageError,
    )

P = ParamSpec("P")
R = TypeVar("R")

DebugOption = Annotated[bool, typer.Option("--debug", help="On error, also print the traceback.")]


class Group(TyperGroup):
    """Click's usage errors exit with 1, since 2 means "partial" for ``validate``."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        """Parse the command line; a usage error exits with 1."""
        try:
            return super().make_context(*args, **kwargs)
        except ClickUsageError as exc:
            exc.exit_code = EXIT_FAILURE
            raise

    def invoke(self, ctx: Any) -> Any:
        """Run the command; a usage error found while parsing its options exits with 1."""
        try:
            return super().invoke(ctx)
        except ClickUsageError as exc:
            exc.exit_code = EXIT_FAILURE
            raise


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors of ``command`` into one line on stderr and the documented exit code."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, ClickUsageError, KeyboardInterrupt):
            raise
        except AsyncckptError as exc:
            fail(str(exc), exc.exit_code, kwargs)
        except OSError as exc:
            fail(os_error_text(exc), EXIT_FAILURE, kwargs)
        except Exception as exc:
            fail(
                f"unexpected error: {type(exc).__name__}: {exc} (--debug shows the traceback)",
                EXIT_FAILURE,
                kwargs,
            )

    return run


def fail(message: str, code: int, kwargs: dict[str, Any]) -> NoReturn:
    """Print ``message`` as one error line (and the traceback with --debug); exit with ``code``."""
    ctx = kwargs.get("ctx")  # the click context typer passes (not always a typer.Context instance)
    settings = ctx.find_root().obj if ctx is not None else None
    if kwargs.get("debug") or (isinstance(settings, dict) and settings.get("debug")):
        traceback.print_exc(file=sys.stderr)
    stderr().print(f"[bold red]error:[/] {shown(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def os_error_text(exc: OSError) -> str:
    """``{filename}: {strerror}``, without Python's ``[Errno N]``."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


def existing(path: Path) -> Path:
    """``path`` if it exists; otherwise a :class:`UsageError` naming it (exit code 1)."""
    if not path.exists():
        raise UsageError("no such file or directory", path=path)
    return path


def existing_directory(path: Path, *, hint: str) -> Path:
    """``path`` if it is a directory; otherwise a :class:`UsageError` with ``hint`` (exit code 1)."""
    if not existing(path).is_dir():
        raise UsageError(f"not a directory ({hint})", path=path)
    return path
