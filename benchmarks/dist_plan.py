"""The training thread's planning of one multi-rank save, across checkouts, side by side.

Each round runs, for every checkout in turn (A B, A B, ...), one process with that checkout
first on ``PYTHONPATH``: a world-1 gloo group, the state of ``benchmarks/distributed.py``
(``--layout`` fsdp = FSDP2, ddp = DDP; ``--tensors``, ``--size``) and the distributed mode's
``StepPlanner`` as rank 0 of ``--world`` ranks would use it (its share of the replicated
tensors decided for ``--world``), then ``--plans`` calls of ``plan()`` (after two untimed),
keeping the last two plans alive as the pipeline does. Figures per child: the median thread
CPU time of one ``plan()`` (the collector's work included) and the part of it spent in
collections. A loaded machine changes CPU time less than wall time; ratios are taken within a
round.

    python benchmarks/dist_plan.py --tree before=/tmp/base --tree after=. --layout ddp \\
        --tensors 10000 --size 256M --rounds 3 --out benchmarks/results/dist-plan.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FIGURES = ("plan_cpu_ms", "gc_cpu_ms")


def child(layout: str, tensors: int, size: int, world: int, plans: int) -> None:
    """One checkout's run in this process; figures as one JSON line on stdout."""
    import gc

    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    from distributed import build, free_port

    from asyncckpt.dist.share import ReplicaShare
    from asyncckpt.dist.stage import StepPlanner

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    model, optimizer, _ = build(layout, tensors, size, world)
    state = {"model": model, "optimizer": optimizer}
    planner = StepPlanner(ReplicaShare(0, world))
    in_gc = [0.0, 0.0]

    def collector(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            in_gc[1] = time.thread_time()
        else:
            in_gc[0] += time.thread_time() - in_gc[1]

    gc.callbacks.append(collector)
    alive = [planner.plan(1, state, None, overlap=True), planner.plan(2, state, None, overlap=True)]
    figures: dict[str, list[float]] = {name: [] for name in FIGURES}
    for step in range(3, plans + 3):
        in_gc[0] = 0.0
        started = time.thread_time()
        alive.append(planner.plan(step, state, None, overlap=True))
        figures["plan_cpu_ms"].append((time.thread_time() - started) * 1e3)
        figures["gc_cpu_ms"].append(in_gc[0] * 1e3)
        alive.pop(0)
    gc.callbacks.remove(collector)
    dist.destroy_process_group()
    print(json.dumps({name: statistics.median(values) for name, values in figures.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a checkout")
    parser.add_argument("--world", type=int, default=2, help="the world size the share is decided for")
    parser.add_argument("--layout", default="ddp", choices=("fsdp", "ddp"))
    parser.add_argument("--tensors", type=int, default=10000)
    parser.add_argument("--size", default="256M")
    parser.add_argument("--plans", type=int, default=10, help="timed plan() calls per child")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="markdown report (NAME.json beside it)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from ckptbench.state import parse_size

    size = parse_size(args.size)
    if args.child:
        child(args.layout, args.tensors, size, args.world, args.plans)
        return
    trees = dict(t.split("=", 1) for t in args.tree)
    load = os.getloadavg()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, path in trees.items():
            env = {**os.environ, "PYTHONPATH": str(Path(path).resolve())}
            argv = [sys.executable, __file__, *sys.argv[1:], "--child"]
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{name}: {done.stderr[-3000:]}")
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(name, results[name][-1], flush=True)
    print(report(args, trees, results, started, load))


def report(
    args: argparse.Namespace,
    trees: dict[str, str],
    results: dict[str, list[dict[str, float]]],
    started: str,
    load: tuple[float, float, float],
) -> str:
    """The markdown table (written to ``--out`` too, with the JSON beside it)."""
    lines = [
        f"- command: `python benchmarks/dist_plan.py {' '.join(sys.argv[1:])}`",
        f"- started {started}; load average at start {load}, at end {os.getloadavg()} (2-core VM "
        "shared with other jobs: compare ratios within a round)",
        f"- {args.layout}, {args.tensors} tensors, {args.size}, rank 0 of world {args.world}; per "
        f"child {args.plans} timed plan() calls; {args.rounds} rounds, children interleaved",
        "",
        "| tree | plan CPU ms | of which GC ms | plan CPU vs first |",
        "|---|---|---|---|",
    ]
    names = list(trees)
    first = results[names[0]]
    for name in names:
        rounds = results[name]
        plan = statistics.median(r["plan_cpu_ms"] for r in rounds)
        collect = statistics.median(r["gc_cpu_ms"] for r in rounds)
        ratio = statistics.median(
            r["plan_cpu_ms"] / f["plan_cpu_ms"] for r, f in zip(rounds, first, strict=True)
        )
        lines.append(f"| {name} | {plan:.1f} | {collect:.1f} | {ratio:.2f}x |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    return text


if __name__ == "__main__":
    main()
