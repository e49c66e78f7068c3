"""``asyncckpt demo``: train a small MLP with AsyncCheckpointer (the trainer is asyncckpt.demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..demo import DEFAULT_DIRECTORY, DEFAULT_EVERY, DEFAULT_STEPS, print_report, run_demo
from ..errors import UsageError
from .exits import DebugOption, reports_errors
from .render import stdout


@reports_errors
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
        raise UsageError("not a directory", path=directory)
    out = stdout()
    report = run_demo(directory, steps=steps, every=every, crash_at=crash_at, console=out)
    print_report(report, out)
