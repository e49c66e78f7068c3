"""The ``asyncckpt`` command line: validate, ls, inspect, logs and demo.

One module per command; ``render`` holds the shared rendering and ``exits`` the mapping of
errors to exit codes (0 success, 1 usage or unexpected error, 2 partial, 3 checkpoint problem).
Every command reads only (``demo`` writes its own directory).
"""

from __future__ import annotations

from typing import Annotated

import typer

from .._version import __version__
from . import demo, inspect, logs, ls, validate
from .exits import DebugOption, Group

__all__ = ["app", "main"]

app = typer.Typer(
    cls=Group,
    name="asyncckpt",
    help="Inspect, validate and follow asyncckpt checkpoint directories.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


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


app.command("validate")(validate.validate)
app.command("ls")(ls.list_directory)
app.command("inspect")(inspect.inspect_command)
app.command("logs")(logs.logs)
app.command("demo")(demo.demo)
