"""A/B of the load side across checkouts: ``asyncckpt.load``, ``load_latest`` and ``restore``.

Each round runs one child process per checkout, in turn (A B, A B, ...), on the same checkpoint
of the benchmark's model + Adam state (``ckptbench.state``), warm page cache (``--cold``: the
file's pages dropped with ``posix_fadvise(DONTNEED)`` before every call). A child times
``--calls`` calls after one untimed call and reports wall and CPU seconds (``process_time``: all
threads) per call; ratios are taken per round (median of the child's calls, B over A), then the
median over rounds, which holds on a loaded machine far better than absolute times.

    python benchmarks/load_ab.py --tree before=/path/to/old --tree after=. --size 32M \
        --tensors 10000 --what load,latest,restore --rounds 5 --out benchmarks/results/x.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ckptbench.state import parse_size
from ckptbench.trees import run_in_tree

HERE = Path(__file__).resolve().parent

CHILD = r"""
import gc, json, os, sys, time
sys.path.insert(0, sys.argv[5])
import torch
torch.set_num_threads(1)
import asyncckpt
from ckptbench.state import build_state
from ckptbench.loading import restore_function
size, count, directory, what = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
calls, cold, kind = int(sys.argv[6]), sys.argv[7] == "cold", sys.argv[8]
path = os.path.join(directory, "step-00000001.ckpt")
if kind == "large":  # equal float32 tensors of size / count bytes each (an embedding, a head)
    torch.manual_seed(0)
    flat = {f"t{i}": torch.randn(size // count // 4) for i in range(count)}
    if not os.path.exists(path):
        asyncckpt.save(path, flat, step=1)
    objects = None
else:
    state = build_state(size, count)
    if not os.path.exists(path):
        asyncckpt.save(path, state.state_dict(), step=1)
    objects = state.objects()
restore = restore_function()
quiet = lambda *args, **kwargs: None
run = {
    "load": lambda: asyncckpt.load(path),
    "latest": lambda: asyncckpt.load_latest(directory, log=quiet),
    "restore": lambda: restore(directory, objects),
}[what]
def drop():
    if cold:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
drop()
run()
out = []
for _ in range(calls):
    gc.collect()
    drop()
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    out.append((time.perf_counter() - wall, time.process_time() - cpu))
print(json.dumps({"runs": out, "module": asyncckpt.__file__}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a checkout (2 or more)")
    parser.add_argument("--size", default="32M")
    parser.add_argument("--tensors", type=int, default=10_000)
    parser.add_argument("--what", default="load,latest,restore", help="load, latest, restore")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="timed calls per child")
    parser.add_argument("--dir", type=Path, default=None, help="checkpoint folder (default: temp)")
    parser.add_argument("--cold", action="store_true", help="drop the file's cached pages before each call")
    parser.add_argument(
        "--state",
        choices=("model", "large"),
        default="model",
        help="model: the benchmark's model + Adam (ckptbench.state); large: --tensors equal float32 "
        "tensors of --size in all (load and latest only)",
    )
    parser.add_argument("--out", type=Path, default=None, help="a Markdown file for the results")
    args = parser.parse_args()
    if args.state == "large" and "restore" in args.what.split(","):
        parser.error("--state large has no model to restore into: use --what load,latest")
    trees = dict(tree.split("=", 1) for tree in args.tree)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="load-ab-"))
    directory.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_start = os.getloadavg()
    lines = [
        "# Load A/B",
        "",
        f"- command: `python benchmarks/load_ab.py {' '.join(sys.argv[1:])}`",
        f"- started: {started}, load average {load_start}",
        f"- state: {args.size} in {args.tensors} tensors "
        + ("(equal float32 tensors), " if args.state == "large" else "(model + Adam, ckptbench.state), ")
        + ("cold: the file's pages dropped before each call" if args.cold else "warm page cache"),
        "",
        "| what | tree | wall ms (median) | CPU ms (median) | wall / first tree (median of rounds) "
        "| per round |",
        "|---|---|---|---|---|---|",
    ]
    names = list(trees)
    for what in args.what.split(","):
        runs: dict[str, list[list[tuple[float, float]]]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                command = [sys.executable, "-c", CHILD, str(parse_size(args.size)), str(args.tensors)]
                command += [str(directory), what, str(HERE), str(args.calls), "cold" if args.cold else "warm"]
                command.append(args.state)
                runs[name].append(run_in_tree(command, tree)["runs"])
        base = [statistics.median(w for w, _ in r) for r in runs[names[0]]]
        for name in names:
            walls = [statistics.median(w for w, _ in r) for r in runs[name]]
            ratios = [w / b for w, b in zip(walls, base, strict=True)]
            wall = statistics.median(w for r in runs[name] for w, _ in r)
            cpu = statistics.median(c for r in runs[name] for _, c in r)
            per_round = " ".join(f"{r:.2f}" for r in ratios)
            lines.append(
                f"| {what} | {name} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} | "
                f"{statistics.median(ratios):.2f}x | {per_round} |"
            )
        print("\n".join(lines[-len(names) :]), flush=True)
    lines += ["", f"- load average at the end: {os.getloadavg()}"]
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
