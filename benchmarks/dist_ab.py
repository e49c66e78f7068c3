"""A/B of the multi-rank save (stall and time to durable) and restore across checkouts, side by side.

Each round runs, for every checkout in turn (A B, A B, ...), one set of ``--world`` rank
processes (gloo, CPU) with that checkout first on ``PYTHONPATH``; each saves the same FSDP2 (or
DDP) state of ``--tensors`` tensors ``--saves`` times with ``AsyncCheckpointer`` (the first save
untimed; stall = ``save()`` returns, stall CPU = the training thread's CPU time in ``save()``,
which a loaded machine changes less, durable = its handle's result) and restores it
``--restores`` times. Per child the figure is the median over its saves
of the slowest rank; ratios are taken between the two children of one round (same moment, same
load), then the median over rounds. For "did this change make multi-rank saves faster" on a
shared machine.

    python benchmarks/dist_ab.py --tree before=/tmp/base --tree after=. --world 2 \\
        --layout fsdp --tensors 10000 --size 64M --rounds 3 --out benchmarks/results/dist-ab.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ckptbench.trees import write_report

HERE = Path(__file__).resolve().parent
FIGURES = ("stall", "stall_cpu", "durable", "restore")


def child(world: int, layout: str, tensors: int, size: int, saves: int, restores: int, root: str) -> None:
    """One checkout's run: ``world`` rank processes, figures as one JSON line on stdout."""
    sys.path.insert(0, str(HERE))
    from distributed import free_port, spawn_ranks

    args = (world, free_port(), layout, tensors, size, saves, restores, root)
    ranks = spawn_ranks(_rank, world, args)
    figures = {
        name: statistics.median(max(values) for values in zip(*(r[name] for r in ranks), strict=True))
        for name in ranks[0]
    }
    print(json.dumps(figures))


def _rank(
    rank: int,
    world: int,
    port: int,
    layout: str,
    tensors: int,
    size: int,
    saves: int,
    restores: int,
    root: str,
    out: str,
) -> None:
    import pickle

    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    from distributed import build

    import asyncckpt

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, optimizer, _ = build(layout, tensors, size, world)
    state = {"model": model, "optimizer": optimizer}
    figures: dict[str, list[float]] = {"stall": [], "stall_cpu": [], "durable": [], "restore": []}
    group = {"process_group": dist.group.WORLD} if world == 1 else {}
    with asyncckpt.AsyncCheckpointer(
        Path(root) / "ckpt", keep_last=1, coordination_timeout=900, **group
    ) as ckpt:
        for step in range(1, saves + 1):
            dist.barrier()
            started, started_cpu = time.perf_counter(), time.thread_time()
            handle = ckpt.save(step, state)
            stalled, stalled_cpu = time.perf_counter(), time.thread_time()
            handle.result()
            if step > 1:
                figures["stall"].append(stalled - started)
                figures["stall_cpu"].append(stalled_cpu - started_cpu)
                figures["durable"].append(time.perf_counter() - started)
        for _ in range(restores):
            dist.barrier()
            started = time.perf_counter()
            ckpt.restore(state)
            figures["restore"].append(time.perf_counter() - started)
    with open(out, "wb") as file:
        pickle.dump(figures, file)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a checkout")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layout", default="fsdp", choices=("fsdp", "ddp"))
    parser.add_argument("--tensors", type=int, default=10000)
    parser.add_argument("--size", default="64M")
    parser.add_argument("--saves", type=int, default=3, help="saves per child (the first untimed)")
    parser.add_argument("--restores", type=int, default=2, help="restores per child")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="markdown report (NAME.json beside it)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from ckptbench.state import parse_size

    size = parse_size(args.size)
    if args.child:
        child(args.world, args.layout, args.tensors, size, args.saves, args.restores, args.dir)
        return
    trees = dict(t.split("=", 1) for t in args.tree)
    load = os.getloadavg()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, path in trees.items():
            with tempfile.TemporaryDirectory(prefix="asyncckpt-distab-") as directory:
                env = {**os.environ, "PYTHONPATH": str(Path(path).resolve())}
                argv = [sys.executable, __file__, *sys.argv[1:], "--child", "--dir", directory]
                done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"{name}: {done.stderr[-3000:]}")
                results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(name, results[name][-1], flush=True)
    names = list(trees)
    lines = [
        f"- command: `python benchmarks/dist_ab.py {' '.join(sys.argv[1:])}`",
        f"- started {started}; load average at start {load}, at end "
        f"{os.getloadavg()} (2-core VM shared with other jobs: compare ratios within a round)",
        f"- world {args.world}, {args.layout}, {args.tensors} tensors, {args.size}; per child "
        f"{args.saves} saves (first untimed) and {args.restores} restores; {args.rounds} rounds, "
        "children interleaved",
        "",
        "| tree | stall s | stall CPU s | durable s | restore s | stall vs first | stall CPU vs first "
        "| durable vs first | restore vs first |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    first = results[names[0]]
    for name in names:
        rounds = results[name]
        medians = [statistics.median(r[figure] for r in rounds) for figure in FIGURES]
        ratios = [
            statistics.median(r[figure] / f[figure] for r, f in zip(rounds, first, strict=True))
            for figure in FIGURES
        ]
        cells = [f"{m:.3f}" for m in medians] + [f"{r:.2f}x" for r in ratios]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    text = "\n".join(lines) + "\n"
    write_report(text, args.out, results)


if __name__ == "__main__":
    main()
