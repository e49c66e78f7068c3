"""The demo trainer behind ``asyncckpt demo``: a small MLP trained on CPU with AsyncCheckpointer.

Everything is synthetic and deterministic: the model starts from a fixed seed and the batch of
step ``s`` is a function of ``s`` alone, so a run that crashes and resumes ends with exactly the
loss of a run that never stopped. A second run in the same directory resumes from the newest
valid checkpoint.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from .checkpointer import AsyncCheckpointer
from .saving.stats import CheckpointerStats

DEFAULT_DIRECTORY = Path("demo-run")
DEFAULT_STEPS = 300
DEFAULT_EVERY = 50
CRASH_EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL (128 + 9)

SEED = 1234
INPUTS = 64
HIDDEN = 512
OUTPUTS = 10
BATCH = 64
LEARNING_RATE = 1e-3


@dataclass(frozen=True)
class Resumed:
    """Where a demo run resumed from and what the loader said about it."""

    step: int
    path: Path
    summary: str


@dataclass(frozen=True)
class DemoReport:
    """What one demo run did."""

    directory: Path
    resumed: Resumed | None
    steps: int  # the step the run trains up to
    first_step: int  # the first step trained in this run
    last_step: int  # the last step trained (== first_step - 1 when there was nothing to do)
    seconds: float
    final_loss: float | None
    stats: CheckpointerStats | None
    stall_ms: list[float] = field(default_factory=list)  # stall of each save() of this run


def build_model() -> torch.nn.Module:
    """The demo MLP, initialised from a fixed seed without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return torch.nn.Sequential(
            torch.nn.Linear(INPUTS, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, OUTPUTS),
        )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic batch of ``step``: inputs and the targets of a fixed random teacher."""
    teacher = torch.Generator().manual_seed(SEED + 1)
    weights = torch.randn(INPUTS, OUTPUTS, generator=teacher) / INPUTS**0.5
    inputs = torch.randn(BATCH, INPUTS, generator=torch.Generator().manual_seed(SEED * 1_000_003 + step))
    return inputs, torch.tanh(inputs @ weights)


class _Trainer:
    """Model, optimizer and the step they have reached."""

    def __init__(self) -> None:
        self.model = build_model()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LEARNING_RATE)
        self.step = 0
        self.loss: float | None = None

    def state(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "step": self.step, "loss": self.loss}

    def train_step(self) -> float:
        self.step += 1
        inputs, targets = batch(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(self.model(inputs), targets)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self.loss = float(loss.item())
        return self.loss


def resume(trainer: _Trainer, ckpt: AsyncCheckpointer) -> Resumed | None:
    """Restore ``trainer`` from the newest valid checkpoint of ``ckpt``; None on a fresh run.

    The loader's summary goes to the run's events.jsonl and into the result. Raises
    :class:`NoValidCheckpointError` when the directory has checkpoints but none is usable.
    """
    result = ckpt.restore({"model": trainer.model, "optimizer": trainer.optimizer})
    if result is None:
        return None  # no candidate at all: a fresh start, nothing was touched
    trainer.step = result.step
    loss = result.state.get("loss") if isinstance(result.state, dict) else None
    trainer.loss = float(loss) if isinstance(loss, float) else None
    return Resumed(result.step, Path(result.path), result.summary)  # the demo runs locally


def run_demo(
    directory: Path = DEFAULT_DIRECTORY,
    *,
    steps: int = DEFAULT_STEPS,
    every: int = DEFAULT_EVERY,
    crash_at: int | None = None,
    console: Console | None = None,
) -> DemoReport:
    """Train to step ``steps``, saving every ``every`` steps (and at the last); return a report.

    Resumes from the newest checkpoint in ``directory`` when there is one. With ``crash_at``, the
    process ends with ``os._exit(CRASH_EXIT_CODE)`` right after that step (and its save, if it
    has one, is queued): pending saves are lost, as in a real crash. Raises ``ValueError`` for
    a non-positive ``steps`` or ``every``, and what the checkpointer raises.
    """
    if steps < 1 or every < 1:
        raise ValueError(f"--steps and --every must be >= 1, got {steps} and {every}")
    out = console or Console()
    trainer = _Trainer()
    threads = torch.get_num_threads()
    # One training thread leaves the other cores to the writer (and keeps a small model fast).
    torch.set_num_threads(1)
    try:
        return _run(trainer, directory, steps=steps, every=every, crash_at=crash_at, out=out)
    finally:
        torch.set_num_threads(threads)


def _run(
    trainer: _Trainer, directory: Path, *, steps: int, every: int, crash_at: int | None, out: Console
) -> DemoReport:
    stall_ms: list[float] = []
    with AsyncCheckpointer(directory, keep_last=3) as ckpt:  # removes temp files of a crashed run
        resumed = resume(trainer, ckpt)
        if resumed is not None:
            out.print(f"[bold]resume:[/] {resumed.summary}", soft_wrap=True)
        first = trainer.step + 1
        started = time.perf_counter()
        if first <= steps:
            _train(trainer, ckpt, steps=steps, every=every, crash_at=crash_at, out=out, stall_ms=stall_ms)
        ckpt.flush()
        stats = ckpt.stats()
    seconds = time.perf_counter() - started
    return DemoReport(directory, resumed, steps, first, trainer.step, seconds, trainer.loss, stats, stall_ms)


def _train(
    trainer: _Trainer,
    ckpt: AsyncCheckpointer,
    *,
    steps: int,
    every: int,
    crash_at: int | None,
    out: Console,
    stall_ms: list[float],
) -> None:
    columns = (
        TextColumn("[bold]train[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("loss {task.fields[loss]}"),
    )
    with _TrainingProgress(*columns, console=out) as progress:
        task = progress.add_task("train", total=steps, completed=trainer.step, loss="-")
        while trainer.step < steps:
            loss = trainer.train_step()
            if trainer.step % every == 0 or trainer.step == steps:
                ckpt.save(trainer.step, trainer.state())
                stall_ms.append(ckpt.stats().last_stall_ms)
            progress.checkpoint_line = describe_save(ckpt.stats())
            progress.update(task, completed=trainer.step, loss=f"{loss:.4f}")
            if trainer.step == crash_at:
                progress.stop()
                _crash(out, trainer.step)
        ckpt.flush()  # so that the last frame shows the last checkpoint
        progress.checkpoint_line = describe_save(ckpt.stats())


class _TrainingProgress(Progress):
    """The progress bar, and under it a line about the last checkpoint."""

    checkpoint_line = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield Text(self.checkpoint_line, style="dim")


def describe_save(stats: CheckpointerStats) -> str:
    """One line about the last committed save: its stall on the trainer and its write figures."""
    stall = f"stall {stats.last_stall_ms:.1f} ms" if stats.saves else "no save yet"
    if stats.last_step is None:
        return f"ckpt: none committed yet, {stall}"
    return (
        f"ckpt {stats.last_step}: {stats.last_bytes / 1e6:.1f} MB, write {stats.last_write_ms:.0f} ms + "
        f"fsync {stats.last_fsync_ms:.0f} ms ({stats.last_mb_s:.0f} MB/s), {stall}"
    )


def print_report(report: DemoReport, out: Console) -> None:
    """What the run did, what training paid for its checkpoints, and what to run next."""
    if report.last_step < report.first_step:
        out.print(f"nothing to train: already at step {report.last_step} (--steps {report.steps})")
    else:
        out.print(
            f"trained steps {report.first_step}-{report.last_step} in {report.seconds:.1f} s, "
            f"final loss {report.final_loss:.4f}",
            soft_wrap=True,
        )
    stats, stalls = report.stats, report.stall_ms
    if stats is not None and stalls:
        out.print(
            f"{len(stalls)} saves ({stats.committed} committed, {stats.failed} failed); save() stalled "
            f"training {sum(stalls) / len(stalls):.1f} ms on average, {max(stalls):.1f} ms at most",
            soft_wrap=True,
        )
    name = str(report.directory)
    out.print(
        f"next: asyncckpt ls {name} · asyncckpt validate {name} · asyncckpt logs {name}", soft_wrap=True
    )


def _crash(out: Console, step: int) -> None:
    out.print(f"[bold red]simulated crash[/] at step {step}: os._exit({CRASH_EXIT_CODE}), pending saves lost")
    out.file.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(CRASH_EXIT_CODE)
