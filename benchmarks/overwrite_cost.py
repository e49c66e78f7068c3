#!/usr/bin/env python3
"""What replacing an existing checkpoint costs a save: ``asyncckpt.save`` to a fresh path vs over
an existing file of the same size, side by side, in one child process per checkout and round.

On a filesystem mounted with ``discard`` the rename over an existing file frees (and discards)
the old file's blocks inside the rename, unless the save keeps the old file under a hidden name
and deletes it afterwards (benchmarks/unlink_cost.py measures the unlink alone). Each child
saves a fresh path and an existing one, in an order that alternates by round, and reports
the seconds each ``save`` took to return; "dropped" is how long after the overwrite's return
the old file was gone (a checkout that deletes it in the background; 0 otherwise), waited for
before the next timed save. Rounds interleave the checkouts (A B, A B, ...); ratios are within
a child.

    python benchmarks/overwrite_cost.py --tree before=/path/to/old --tree after=. \\
        --sizes 256M,1G --rounds 5 --out benchmarks/results/overwrite.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ckptbench.state import parse_size  # noqa: E402
from ckptbench.trees import run_in_tree, write_report  # noqa: E402

CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
import asyncckpt
import asyncckpt.oneshot as oneshot
size, tensors, directory = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
overwrite_first = sys.argv[4] == "1"
torch.manual_seed(0)
state = {f"t{i}": torch.randn(max(1, size // 4 // tensors)) for i in range(tensors)}
existing, fresh = os.path.join(directory, "existing.ckpt"), os.path.join(directory, "fresh.ckpt")
wait = getattr(oneshot, "wait_replaced_dropped", lambda: None)
asyncckpt.save(existing, state, step=0, verify="none")  # untimed: the file to replace
wait()
def timed(path):
    started = time.perf_counter()
    asyncckpt.save(path, state, step=1, verify="none")
    returned = time.perf_counter()
    wait()
    return returned - started, time.perf_counter() - returned
result = {}
for kind in (["overwrite", "fresh"] if overwrite_first else ["fresh", "overwrite"]):
    result[kind], dropped = timed(existing if kind == "overwrite" else fresh)
    if kind == "overwrite":
        result["dropped"] = dropped
for path in (existing, fresh):
    os.unlink(path)
os.sync()
result["module"] = asyncckpt.__file__
print(json.dumps(result))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tree", action="append", default=None, help="NAME=PATH of a checkout (default: this one)"
    )
    parser.add_argument("--sizes", default="256M,1G")
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="/var/tmp", help="where the files go (the filesystem under test)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    here = str(Path(__file__).resolve().parent.parent)
    trees = dict(t.split("=", 1) for t in (args.tree or [f"this={here}"]))
    lines = [
        f"- command: `python {' '.join(sys.argv)}`",
        f"- started: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}, load average {os.getloadavg()}",
        f"- {args.tensors} tensors per state, {args.rounds} rounds, checkouts interleaved, in {args.dir}",
        "",
        "| size | tree | fresh s | overwrite s | overwrite / fresh | old file gone after return s |",
        "|---|---|---|---|---|---|",
    ]
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for size_text in args.sizes.split(","):
        size = parse_size(size_text)
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        with tempfile.TemporaryDirectory(prefix="overwrite-cost-", dir=args.dir) as directory:
            for round_ in range(args.rounds):
                for name, path in trees.items():
                    order = str(round_ % 2)
                    command = [sys.executable, "-c", CHILD, str(size), str(args.tensors), directory, order]
                    rounds[name].append(run_in_tree(command, path))
        results[size_text] = rounds
        for name, runs in rounds.items():
            fresh = statistics.median(r["fresh"] for r in runs)
            over = statistics.median(r["overwrite"] for r in runs)
            ratio = statistics.median(r["overwrite"] / r["fresh"] for r in runs)
            dropped = statistics.median(r["dropped"] for r in runs)
            row = f"| {size_text} | {name} | {fresh:.3f} | {over:.3f} | {ratio:.2f}x | {dropped:.3f} |"
            lines.append(row)
        print(lines[-len(rounds) :], flush=True)
    lines.append(f"- finished: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}, load average {os.getloadavg()}")
    text = "\n".join(lines) + "\n"
    write_report(text, args.out, results)


if __name__ == "__main__":
    main()
