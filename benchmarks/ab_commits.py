"""A/B of the synchronous save and the warm load across commits, side by side with the floors.

Each round runs one child process per commit, in turn (A B C, A B C, ...), each measuring in the
same directory: the write floor (``os.write`` + ``fsync`` of the same bytes), ``asyncckpt.save``,
the read floor (``readinto`` per tensor into preallocated buffers) and a warm ``asyncckpt.load``.
Ratios are taken within a child (same moment), medians over rounds. For the question "is a
change between commits a regression or noise".

    python benchmarks/ab_commits.py --tree old=/path/to/worktree-at-old --tree new=. \
        --size 1G --tensors 1000 --rounds 5 --out benchmarks/results/ab-sync-load.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from ckptbench.state import parse_size
from ckptbench.trees import run_in_tree, write_report

CHILD = r"""
import json, os, sys, time, tempfile
import torch
torch.set_num_threads(1)
import asyncckpt
size, count, directory = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
per = max(1, size // 4 // count)
state = {f"t{i}": torch.randn(per) for i in range(count)}
blobs = [t.numpy().tobytes() for t in state.values()]
def write_floor():
    path = os.path.join(directory, "floor.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for b in blobs:
        os.write(fd, b)
    os.fsync(fd); os.close(fd)
    return path
def timed(f):
    t = time.perf_counter(); r = f(); return time.perf_counter() - t, r
out = {}
os.sync(); out["write_floor"], floor_path = timed(write_floor)
ckpt = os.path.join(directory, "step-0000000001.ckpt")
os.sync(); out["sync_save"], _ = timed(lambda: asyncckpt.save(ckpt, state, step=1))
buffers = [bytearray(len(b)) for b in blobs]
def read_floor():
    with open(floor_path, "rb", buffering=0) as f:
        for b in buffers:
            f.readinto(b)
read_floor(); asyncckpt.load(ckpt)  # warm both
out["read_floor"], _ = timed(read_floor)
out["warm_load"], _ = timed(lambda: asyncckpt.load(ckpt))
os.remove(ckpt); os.remove(floor_path)
out["module"] = asyncckpt.__file__
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a checkout")
    parser.add_argument("--size", default="1G")
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    size = parse_size(args.size)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for _ in range(args.rounds):
            for name, path in trees.items():
                command = [sys.executable, "-c", CHILD, str(size), str(args.tensors), directory]
                results[name].append(run_in_tree(command, path))
    lines = [
        f"- command: `python {' '.join(sys.argv)}`",
        f"- started: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}, load average {os.getloadavg()}",
        f"- {args.size} in {args.tensors} tensors, {args.rounds} rounds, children interleaved",
        "",
        "| tree | sync save s | write floor s | sync save / write floor "
        "| warm load s | read floor s | warm load / read floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rounds in results.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        save_ratio = statistics.median(r["sync_save"] / r["write_floor"] for r in rounds)
        load_ratio = statistics.median(r["warm_load"] / r["read_floor"] for r in rounds)
        lines.append(
            f"| {name} | {med['sync_save']:.3f} | {med['write_floor']:.3f} | {save_ratio:.2f}x | "
            f"{med['warm_load']:.3f} | {med['read_floor']:.3f} | {load_ratio:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    write_report(text, args.out, results)


if __name__ == "__main__":
    main()
