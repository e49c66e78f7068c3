#!/usr/bin/env python3
"""A/B of ``save()`` when the state's numbers change at every save (a learning-rate schedule,
an epoch counter) against a state that stays the same, across checkouts, side by side.

A trainer with a scheduler changes ``optimizer.param_groups[i]["lr"]`` before every save; the
tensors keep their shapes and places. Each round runs one child per checkout, in turn; each
child builds the benchmark state (``ckptbench.state``: a model and a filled Adam), then times
``AsyncCheckpointer.save()`` (the stall on the trainer's thread, each save waited for before the
next) and the synchronous ``asyncckpt.save`` with the numbers fixed, then with a new learning
rate and epoch at every save. Medians over the saves, then over the rounds.

    python benchmarks/changing_numbers.py --tree before=/path/to/old-checkout --tree after=. \\
        --size 32M --tensors 10000 --rounds 3 --out benchmarks/results/changing-numbers.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ckptbench.state import parse_size  # noqa: E402
from ckptbench.trees import run_in_tree  # noqa: E402

CHILD = r"""
import json, os, statistics, sys, tempfile, time
sys.path.insert(0, sys.argv[4])
import torch
torch.set_num_threads(1)
from ckptbench.state import build_state
import asyncckpt
size, count, saves = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
state = build_state(size, count)
def objects(i, changing):
    if changing:
        for group in state.optimizer.param_groups:
            group["lr"] = 1e-3 * 0.99 ** i
    return {**state.objects(), "epoch": i if changing else 0}
out = {"module": asyncckpt.__file__}
with tempfile.TemporaryDirectory(dir=sys.argv[5]) as directory:
    with asyncckpt.AsyncCheckpointer(directory, keep_last=2) as ckpt:
        for changing in (False, True):
            stalls = []
            for i in range(saves + 1):
                started = time.perf_counter()
                handle = ckpt.save(i + (1000 if changing else 0), objects(i, changing))
                stalls.append(time.perf_counter() - started)
                handle.result()
            out["stall " + ("changing" if changing else "fixed")] = statistics.median(stalls[1:])
    for changing in (False, True):
        times = []
        for i in range(saves + 1):
            started = time.perf_counter()
            asyncckpt.save(os.path.join(directory, "sync.ckpt"), objects(i, changing), step=i)
            times.append(time.perf_counter() - started)
        out["sync save " + ("changing" if changing else "fixed")] = statistics.median(times[1:])
print(json.dumps(out))
"""

FIGURES = ["stall fixed", "stall changing", "sync save fixed", "sync save changing"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a checkout")
    parser.add_argument("--size", default="32M")
    parser.add_argument("--tensors", type=int, default=10000)
    parser.add_argument("--saves", type=int, default=8, help="timed saves per figure and child")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    trees = dict(entry.split("=", 1) for entry in args.tree)
    bench = str(Path(__file__).resolve().parent)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    started = time.time()
    for _ in range(args.rounds):
        for name, tree in trees.items():
            command = [sys.executable, "-c", CHILD, str(parse_size(args.size)), str(args.tensors)]
            results[name].append(run_in_tree([*command, str(args.saves), bench, args.dir], tree))
    lines = [
        f"- command: `python benchmarks/changing_numbers.py {' '.join(sys.argv[1:])}`",
        f"- {args.size} in {args.tensors} tensors, {args.rounds} rounds of {args.saves} saves, children "
        f"interleaved, took {time.time() - started:.0f} s",
        "",
        "| tree | " + " | ".join(f"{figure} ms" for figure in FIGURES) + " |",
        "|---" * (len(FIGURES) + 1) + "|",
    ]
    for name, rounds in results.items():
        cells = [f"{statistics.median(r[figure] for r in rounds) * 1e3:.1f}" for figure in FIGURES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(f"# {Path(args.out).stem}\n\n{text}")


if __name__ == "__main__":
    main()
