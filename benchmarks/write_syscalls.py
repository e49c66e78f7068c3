"""Time every write call of a few 1 GiB saves (model + Adam state).

Usage: ``python benchmarks/write_syscalls.py overlap|eager [--saves N]``. Used to find where time to
durable goes when a save is slow (benchmarks/results/cpu-slow-writes.md): each save prints its time
to durable, the number and median size of its write calls, the time spent in them, and the slowest.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ckptbench import state as bench_state  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt.storage.posix import FileOps  # noqa: E402


class TimedOps(FileOps):
    """The real file operations, each write call timed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float]] = []

    def write(self, fd: int, data: memoryview | bytes) -> int:
        started = time.perf_counter()
        written = super().write(fd, data)
        self.calls.append(("write", len(data), time.perf_counter() - started))
        return written

    def writev(self, fd: int, buffers: collections.abc.Sequence[memoryview | bytes]) -> int:
        started = time.perf_counter()
        written = super().writev(fd, buffers)
        self.calls.append(("writev", written, time.perf_counter() - started))
        return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["overlap", "eager"])
    parser.add_argument("--saves", type=int, default=4)
    args = parser.parse_args()
    ops = TimedOps()
    state = bench_state.build_state(1 << 30, 1000)
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        run = Path(directory)
        with asyncckpt.AsyncCheckpointer(run, keep_last=1, overlap=args.mode == "overlap", ops=ops) as ckpt:
            for step in range(args.saves):
                ops.calls.clear()
                os.sync()
                started = time.perf_counter()
                handle = ckpt.save(step, state.objects())
                ckpt.wait_staged()
                handle.result()
                durable = time.perf_counter() - started
                sizes = sorted(size for _, size, _ in ops.calls)
                median_kib = sizes[len(sizes) // 2] >> 10
                in_calls = sum(call[2] for call in ops.calls)
                top = sorted(ops.calls, key=lambda call: -call[2])[:3]
                slowest = [(kind, size >> 20, round(s, 3)) for kind, size, s in top]
                print(
                    f"save {step}: durable {durable:.2f} s, {len(ops.calls)} write calls "
                    f"(median {median_kib} KiB) taking {in_calls:.2f} s, slowest {slowest} (kind, MiB, s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
