#!/usr/bin/env python3
"""Where ``AsyncCheckpointer.save()``'s time goes on the trainer's thread, phase by phase.

For each tensor count at the same bytes (the benchmark state: a model and a filled Adam, see
``ckptbench.state``), one checkpointer saves once to size its buffers (the structure is then
cached), then times ``--saves`` calls of ``save()`` in two situations:

- ``finished``: the previous save is durable and the writer idle (``handle.result()``, then
  50 ms for its last events): what ``write_overhead.py``'s stall measures;
- ``writing``: the previous save is still being written (``max_pending=2``, the next save comes
  right after ``wait_staged()``): the writer's threads run and want the GIL meanwhile.

Each phase is timed by wrapping the asyncckpt internal that runs it (wall and the trainer
thread's CPU time): ``state_dicts`` (the objects' ``state_dict()``), ``scan`` (the walk of the
state's tree, including ``state_dicts``), ``check`` (the tensors' fields against the cached
structure, and their version counters), ``plan`` (scan + check + the overlap plan), ``stage``,
``submit`` (the hand-off to the writer's loop) and ``save`` (the whole call).
A line ``a + b * tensors`` fitted over the tensor counts separates the fixed cost per save
from the cost per tensor. Uses asyncckpt internals: for profiling only.

    python benchmarks/save_phases.py --size 1G --tensors 100,1000,10000 \
        --out benchmarks/results/save-phases-1G.md
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ckptbench.state import build_state, parse_size  # noqa: E402

PHASES = ("state_dicts", "scan", "check", "plan", "stage", "submit", "save")
Samples = dict[str, list[tuple[float, float]]]  # phase -> (wall us, cpu us) per call


def _timed(samples: Samples, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
        try:
            return function(*args, **kwargs)
        finally:
            if threading.get_ident() == TRAINER:
                samples.setdefault(phase, []).append(
                    ((time.perf_counter_ns() - wall) / 1e3, (time.thread_time_ns() - cpu) / 1e3)
                )

    return timed


TRAINER = threading.get_ident()  # the main thread saves; phases run elsewhere are not counted


@contextlib.contextmanager
def instrumented(samples: Samples) -> Iterator[None]:
    """Wrap the internals that run each phase; unwrap them at the end."""
    from asyncckpt import pipeline
    from asyncckpt.saving import fingerprint, plan, runner, stager, walker

    try:  # a checkout with module trees remembered between saves takes state dicts here
        from asyncckpt.saving.state_dicts import StateDicts

        state_dicts: tuple[Any, str] = (StateDicts, "_take")
    except ImportError:
        state_dicts = (walker, "_state_dict_of")
    if not hasattr(*state_dicts):
        state_dicts = (walker, "_state_dict_of")
    targets = [
        (*state_dicts, "state_dicts"),
        (fingerprint, "_scan_unchecked", "scan"),
    ]
    try:  # checkouts before the tensors check have no such phase (it is part of scan there)
        from asyncckpt.saving import tensors_check

        targets.append((tensors_check.TensorsCheck, "versions", "check"))
    except ImportError:
        pass
    targets += [
        (plan.Planner, "plan", "plan"),
        (stager.Stager, "stage", "stage"),
        (runner.SyncRunner, "submit", "submit"),
        (pipeline.SavePipeline, "save", "save"),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    for owner, name, phase in targets:
        setattr(owner, name, _timed(samples, phase, getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def measure(size: int, tensors: int, saves: int, situation: str, root: str) -> Samples:
    """Phase samples of ``saves`` saves of one state in ``situation``."""
    import asyncckpt

    state = build_state(size, tensors)
    objects = state.objects()
    samples: Samples = {}
    with tempfile.TemporaryDirectory(dir=root) as directory:
        pending = 2 if situation == "writing" else 1
        with asyncckpt.AsyncCheckpointer(directory, keep_last=1, max_pending=pending) as ckpt:
            ckpt.save(0, objects).result()
            previous = None
            with instrumented(samples):
                for step in range(1, saves + 1):
                    handle = ckpt.save(step, objects)
                    ckpt.wait_staged()
                    if situation == "finished":
                        handle.result()
                        time.sleep(0.05)  # the writer's last events, as between training steps
                    elif previous is not None:
                        previous.result()
                    previous = handle
            if previous is not None:
                previous.result()
    del state, objects
    gc.collect()
    return samples


def fit(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a + b x``; (a, b)."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return mean_y - slope * mean_x, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G", help="state size (e.g. 32M, 1G)")
    parser.add_argument("--tensors", default="100,1000,10000", help="tensor counts, comma separated")
    parser.add_argument("--saves", type=int, default=9, help="timed saves per state and situation")
    parser.add_argument("--situations", default="finished,writing")
    parser.add_argument("--dir", default="/var/tmp", help="where the checkpoints go (e.g. /dev/shm)")
    parser.add_argument("--out", default=None, help="write the tables (markdown) here too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = [int(c) for c in args.tensors.split(",")]
    situations = args.situations.split(",")
    load_start = os.getloadavg()
    started = time.time()
    medians: dict[tuple[str, int, str], tuple[float, float]] = {}
    for count in counts:
        for situation in situations:
            samples = measure(parse_size(args.size), count, args.saves, situation, args.dir)
            for phase in PHASES:
                values = samples.get(phase, [(0.0, 0.0)])
                wall = statistics.median(v[0] for v in values)
                cpu = statistics.median(v[1] for v in values)
                medians[(situation, count, phase)] = (wall, cpu)
    lines = [
        f"command: `python {' '.join(sys.argv)}`",
        f"load average at start / end: {[round(x, 2) for x in load_start]} / "
        f"{[round(x, 2) for x in os.getloadavg()]}; took {time.time() - started:.0f} s",
        "",
        f"Medians of {args.saves} saves, wall / trainer CPU in microseconds; `state_dicts` is inside "
        "`scan`, `scan` and `check` inside `plan`, all inside `save`.",
    ]
    for situation in situations:
        lines += ["", f"### previous save {situation}", ""]
        lines.append(
            "| phase | "
            + " | ".join(f"{c:,} tensors" for c in counts)
            + " | fixed (fit) | per tensor (fit) |"
        )
        lines.append("|---|" + "---|" * (len(counts) + 2))
        for phase in PHASES:
            cells, fits = [], []
            for which in (0, 1):
                ys = [medians[(situation, c, phase)][which] for c in counts]
                fits.append(fit(counts, ys))
            for count in counts:
                wall, cpu = medians[(situation, count, phase)]
                cells.append(f"{wall:,.0f} / {cpu:,.0f}")
            fixed = f"{fits[0][0]:,.0f} / {fits[1][0]:,.0f}"
            slope = f"{fits[0][1]:.2f} / {fits[1][1]:.2f}"
            lines.append(f"| {phase} | " + " | ".join(cells) + f" | {fixed} | {slope} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
