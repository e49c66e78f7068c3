"""The CPU a checkpoint costs off the trainer's thread, per checkpoint, against the plain floor.

One process, a state of ``--size`` bytes in ``--tensors`` float32 tensors, ``--saves`` checkpoints
per configuration, configurations interleaved round by round. Per checkpoint it takes the
process's CPU time (every thread, user + system) and the main thread's own, from just before
``save()`` to the checkpoint durable: the difference is what the checkpoint cost outside the
trainer's thread, i.e. what it takes from training when training keeps every core busy.

- ``plain``: ``benchmarks/plain_writer.py``'s thread: write + fsync of the tensors' bytes, no
  copy, no checksum (the floor; its bytes are not a consistent checkpoint).
- ``asyncckpt-<verify>``: ``AsyncCheckpointer(verify=...)``, overlapped staging (the default):
  the staging copy, CRC32C of every blob, encode, write, fsync, rename, the verification.

    python benchmarks/writer_cpu.py --size 124M --tensors 400 --saves 5 --rounds 3 \
        --out benchmarks/results/writer-cpu-124M.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from ckptbench.state import parse_size
from plain_writer import PlainWriter

import asyncckpt

CONFIGS = ("plain", "asyncckpt-none", "asyncckpt-structure", "asyncckpt-full")


def one_round(config: str, state: dict[str, torch.Tensor], directory: Path, saves: int) -> list[float]:
    """Background CPU seconds per checkpoint for ``saves`` checkpoints of ``config``."""
    costs: list[float] = []
    if config == "plain":
        writer = PlainWriter(directory)
        for step in range(saves):
            process, main = time.process_time(), time.thread_time()
            writer.save(step, state.values())
            writer.join()
            costs.append((time.process_time() - process) - (time.thread_time() - main))
        return costs
    verify = config.removeprefix("asyncckpt-")
    with asyncckpt.AsyncCheckpointer(directory, keep_last=1, verify=verify) as ckpt:  # type: ignore[arg-type]
        for step in range(saves + 1):  # the first save allocates the staging buffers: untimed
            process, main = time.process_time(), time.thread_time()
            handle = ckpt.save(step, state)
            main_cpu = time.thread_time() - main  # save() itself, on the trainer's thread
            handle.result()
            if step:
                costs.append((time.process_time() - process) - main_cpu)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="124M")
    parser.add_argument("--tensors", type=int, default=400)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    per = parse_size(args.size) // 4 // args.tensors
    state = {f"t{i}": torch.randn(per) for i in range(args.tensors)}
    results: dict[str, list[float]] = {config: [] for config in CONFIGS}
    started, load = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="asyncckpt-writercpu-") as root:
        for round_ in range(args.rounds):
            for config in CONFIGS:
                directory = Path(root) / f"{config}-{round_}"
                results[config] += one_round(config, state, directory, args.saves)
    floor = statistics.median(results["plain"])
    lines = [
        "# The CPU a checkpoint costs off the trainer's thread",
        "",
        f"`python benchmarks/writer_cpu.py --size {args.size} --tensors {args.tensors} "
        f"--saves {args.saves} --rounds {args.rounds}`",
        "",
        f"{started}, {os.cpu_count()} CPUs, torch {torch.__version__}; load average {load[0]:.1f}, "
        f"{load[1]:.1f}, {load[2]:.1f}; {args.rounds * args.saves} checkpoints per configuration",
        "",
        "| configuration | CPU ms per checkpoint, median [min-max] | vs plain |",
        "|---|---|---|",
    ]
    for config, costs in results.items():
        median = statistics.median(costs)
        lines.append(
            f"| {config} | {median * 1e3:.0f} [{min(costs) * 1e3:.0f}-{max(costs) * 1e3:.0f}] | "
            f"{median / floor:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
