#!/usr/bin/env python3
"""Who gets the CPU while a checkpoint is written: the training threads or asyncckpt's writer.

A CPU MLP (Adam) trains with torch's intra-op threads (default 2) while one checkpointer per
``background_nice`` value writes a checkpoint; the checkpointers take turns, save after save
(A B A B ...), in one process. For each save, from the call until the checkpoint is committed
(the write window): the CPU time of the training threads (the main thread and torch's pool,
which exist before any checkpointer opens) and of every other thread (the writer's), read from
/proc/self/task/*/stat, the steps trained and the wall time. Reported per nice value (medians
over the saves): the training threads' share of the CPU time used in the window, the training
rate in the window against the rate just before the save (the same number of steps, no write),
and the time to durable.

The share is a ratio between threads of one process, so it holds on a machine that other
processes load (with the kernel's autogroup scheduling they compete as a group); the rates and
the time to durable move with that load. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ckptbench import interference  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0], epilog=__doc__)
    parser.add_argument(
        "--nice", default="0,10", help="background_nice values, comma-separated (%(default)s)"
    )
    parser.add_argument("--saves", type=int, default=10, help="saves per value (%(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (%(default)s)")
    parser.add_argument("--batch", type=int, default=41, help="MLP batch (%(default)s)")
    parser.add_argument("--overlap", action="store_true", help="overlapped staging (default: overlap=False)")
    parser.add_argument("--out", type=Path, help="JSON result; a .md with the command goes beside it")
    return parser.parse_args(argv)


def cpu_by_thread() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process."""
    result = {}
    for task in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{task}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        result[int(task)] = (int(fields[11]) + int(fields[12])) / TICK
    return result


def window(trainer: Any, ckpt: Any, step: int, training: set[int], before_steps: int) -> dict[str, float]:
    """Train ``before_steps`` steps (no write), then save and train until it is committed."""
    began = time.perf_counter()
    for _ in range(before_steps):
        trainer.step()
    before_rate = before_steps / (time.perf_counter() - began)
    cpu0 = cpu_by_thread()
    started = time.perf_counter()
    handle = ckpt.save(step, trainer.state().objects())
    steps = 0
    while not handle.done():
        trainer.step()
        steps += 1
    durable = time.perf_counter() - started
    handle.result()
    cpu1 = cpu_by_thread()
    train_cpu = sum(cpu1[t] - cpu0.get(t, 0.0) for t in cpu1 if t in training)
    other_cpu = sum(cpu1[t] - cpu0.get(t, 0.0) for t in cpu1 if t not in training)
    return {
        "durable_s": durable,
        "steps": steps,
        "rate_ratio": (steps / durable) / before_rate if steps else 0.0,
        "train_cpu_s": train_cpu,
        "writer_cpu_s": other_cpu,
        "train_share": train_cpu / (train_cpu + other_cpu) if train_cpu + other_cpu > 0 else 1.0,
    }


def main(argv: list[str] | None = None) -> None:
    import asyncckpt

    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)
    torch.set_num_threads(options.threads)
    trainer = interference.make_trainer(options.batch)
    interference.time_steps(trainer, 5)  # torch's thread pool exists from here on
    training = set(cpu_by_thread())
    levels = [int(v) for v in options.nice.split(",")]
    runs: dict[int, list[dict[str, float]]] = {level: [] for level in levels}
    with tempfile.TemporaryDirectory(prefix="asyncckpt-share-") as root:
        ckpts = {
            level: asyncckpt.AsyncCheckpointer(
                Path(root) / f"nice{level}", keep_last=1, background_nice=level, overlap=options.overlap
            ).__enter__()
            for level in levels
        }
        try:
            for ckpt in ckpts.values():  # sizes each staging pool once, untimed
                ckpt.save(0, trainer.state().objects()).result()
            for round_ in range(1, options.saves + 1):
                for level, ckpt in ckpts.items():
                    os.sync()
                    run = window(trainer, ckpt, round_, training, before_steps=10)
                    runs[level].append(run)
                    print(
                        f"round {round_} nice {level}: "
                        + json.dumps({k: round(v, 3) for k, v in run.items()})
                    )
        finally:
            for ckpt in ckpts.values():
                ckpt.close()
    text = table(runs, trainer)
    print(text)
    if options.out is not None:
        command = "python benchmarks/priority_share.py " + " ".join(argv)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        options.out.write_text(json.dumps({"command": command, "load": load, "runs": runs}, indent=1))
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        options.out.with_suffix(".md").write_text(
            f"# Who gets the CPU while a checkpoint is written\n\n`{command}`\n\n{stamp}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, {options.threads} intra-op threads; "
            f"load average at the end {load}\n\n{text}\n"
        )


def table(runs: dict[int, list[dict[str, float]]], trainer: Any) -> str:
    def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
        v = [x * scale for x in values]
        return f"{statistics.median(v):.{digits}f} [{min(v):.{digits}f}-{max(v):.{digits}f}]"

    state = trainer.state()
    lines = [
        f"MLP state {state.nbytes / 2**20:.0f} MiB in {state.n_tensors} tensors; medians [min-max] per save",
        "",
        "| background_nice | training threads' share of the CPU used while writing (%) | writer CPU "
        "(ms) | training rate while writing / just before | time to durable (ms) | saves |",
        "|---|---|---|---|---|---|",
    ]
    for level, rs in runs.items():
        lines.append(
            f"| {level} | {spread([r['train_share'] for r in rs], 100.0, 1)} | "
            f"{spread([r['writer_cpu_s'] for r in rs], 1000.0, 0)} | "
            f"{spread([r['rate_ratio'] for r in rs])} | {spread([r['durable_s'] for r in rs], 1000.0, 0)} | "
            f"{len(rs)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
