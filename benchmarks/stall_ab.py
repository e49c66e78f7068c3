#!/usr/bin/env python3
"""A/B of the ``AsyncCheckpointer.save()`` stall across checkouts, side by side.

Each round runs one child process per checkout and state, in turn (A B, A B, ...). A child
builds the benchmark state (model + filled Adam, ``ckptbench.state.build_state`` of the
checkout this script is in, so every checkout saves the same state), opens an
``AsyncCheckpointer`` (default options: overlap on), saves once to size the staging pool, then
times ``--saves`` calls of ``save()`` alone (after each, not timed: ``wait_staged()``, the
durable ``result()`` and 50 ms for the writer's last events) and reports their median, wall
time and the trainer thread's CPU time (which preemption by other processes does not inflate).
Ratios are taken within a round (same moment, same load); the table gives medians over rounds,
in microseconds per tensor.

    python benchmarks/stall_ab.py --tree before=/path/to/old-checkout --tree after=. \
        --states 32M:10000,1G:1000,1G:10000 --rounds 5 --out benchmarks/results/stall-ab.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ckptbench.trees import run_in_tree

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from ckptbench.state import build_state, parse_size
import asyncckpt
size, count, saves, directory = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
state = build_state(parse_size(size), count)
objects = state.objects()
stalls, cpu = [], []
with asyncckpt.AsyncCheckpointer(directory, keep_last=1) as ckpt:
    ckpt.save(0, objects).result()
    for step in range(1, saves + 1):
        started, started_cpu = time.perf_counter(), time.thread_time()
        handle = ckpt.save(step, objects)
        stalls.append(time.perf_counter() - started)
        cpu.append(time.thread_time() - started_cpu)
        ckpt.wait_staged()
        handle.result()
        time.sleep(0.05)  # the writer's last events and the loop settle, as between training steps
print(json.dumps({"median": statistics.median(stalls), "cpu": statistics.median(cpu), "all": stalls,
                  "module": asyncckpt.__file__}))
"""


def _child(tree: str, size: str, count: int, saves: int, root: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(dir=root) as directory:
        command = [sys.executable, "-c", CHILD, str(HERE), size, str(count), str(saves), directory]
        return run_in_tree(command, tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a checkout")
    parser.add_argument("--states", default="32M:10000,1G:1000,1G:10000", help="SIZE:TENSORS,...")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--saves", type=int, default=7, help="timed save() calls per child")
    parser.add_argument("--dir", default="/var/tmp", help="where the checkpoints go (e.g. /dev/shm)")
    parser.add_argument("--out", default=None, help="write the table (markdown) here too")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    states = [(s.split(":")[0], int(s.split(":")[1])) for s in args.states.split(",")]
    first = next(iter(trees))
    per_tensor: dict[tuple[str, str, str], list[float]] = {}
    ratios: dict[tuple[str, str, str], list[float]] = {}
    load_start = os.getloadavg()
    started = time.time()
    for round_ in range(args.rounds):
        order = list(trees.items()) if round_ % 2 == 0 else list(reversed(trees.items()))  # ABBA
        for size, count in states:
            label = f"{size}:{count}"
            results = {name: _child(path, size, count, args.saves, args.dir) for name, path in order}
            for what in ("median", "cpu"):
                base = float(results[first][what])  # type: ignore[arg-type]
                for name, result in results.items():
                    value = float(result[what])  # type: ignore[arg-type]
                    per_tensor.setdefault((label, name, what), []).append(value / count * 1e6)
                    ratios.setdefault((label, name, what), []).append(value / base)
    lines = [
        f"command: `python {' '.join(sys.argv)}`",
        f"load average at start / end: {[round(x, 2) for x in load_start]} / "
        f"{[round(x, 2) for x in os.getloadavg()]}; took {time.time() - started:.0f} s",
        "",
        f"save() stall (wall) and the trainer thread's CPU time in save(), us per tensor: median "
        f"[min-max] over {args.rounds} interleaved rounds (ABBA order; each a median of {args.saves} "
        f"saves); ratio to {first!r} within a round, median",
        "",
        f"| state | checkout | stall us/tensor | stall ms | x {first} | trainer CPU us/tensor | x {first} |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, count in states:
        label = f"{size}:{count}"
        for name in trees:
            wall, cpu = per_tensor[(label, name, "median")], per_tensor[(label, name, "cpu")]
            lines.append(
                f"| {label} | {name} | {statistics.median(wall):.2f} [{min(wall):.2f}-{max(wall):.2f}] | "
                f"{statistics.median(wall) * count / 1e3:.2f} | "
                f"{statistics.median(ratios[(label, name, 'median')]):.2f}x | "
                f"{statistics.median(cpu):.2f} [{min(cpu):.2f}-{max(cpu):.2f}] | "
                f"{statistics.median(ratios[(label, name, 'cpu')]):.2f}x |"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
