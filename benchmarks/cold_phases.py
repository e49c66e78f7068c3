"""Phases of a cold ``asyncckpt.load`` and ``asyncckpt.restore``, side by side, with the read path
each took and the disk requests it made.

Each round drops the page cache (``drop_caches`` as root, else the file's pages with
``posix_fadvise(DONTNEED)``) before each call, then times the call, the blob read inside it
(``read_tensors``), whether the reader's page-cache probe (:meth:`asyncckpt.runs.RunReads.cached`)
said "cached" (True: the threaded warm path; False: one reader in file order), and the read
requests the disk completed meanwhile (``/proc/diskstats``: count and mean KiB).

    PYTHONPATH=. python benchmarks/cold_phases.py --size 1G --tensors 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from ckptbench.loading import restore_function  # noqa: E402
from ckptbench.state import build_state, parse_size  # noqa: E402
from ckptbench.system import evict  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt import reader, runs  # noqa: E402
from asyncckpt.loading import candidate  # noqa: E402


def disk_reads(device: str) -> tuple[int, int]:
    """(read requests completed, sectors read) of ``device`` so far."""
    with open("/proc/diskstats") as stats:
        for line in stats:
            fields = line.split()
            if fields[2] == device:
                return int(fields[3]), int(fields[5])
    return 0, 0


class Probe:
    """What one call did: the probe's answers and the blob read's wall time."""

    def __init__(self) -> None:
        self.cached: list[bool] = []
        self.read_s = 0.0
        original_cached = runs.RunReads.cached
        original_read = reader.read_tensors
        probe = self

        def cached(self: runs.RunReads) -> bool:
            answer = original_cached(self)
            probe.cached.append(answer)
            return answer

        def read_tensors(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original_read(*args, **kwargs)
            finally:
                probe.read_s += time.perf_counter() - started

        runs.RunReads.cached = cached  # type: ignore[method-assign]
        candidate.read_tensors = read_tensors  # type: ignore[assignment]
        reader.read_tensors = read_tensors  # type: ignore[assignment]

    def reset(self) -> None:
        self.cached.clear()
        self.read_s = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--what", default="load,restore")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--device", default="vda", help="the block device in /proc/diskstats")
    args = parser.parse_args()
    torch.set_num_threads(1)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="cold-phases-", dir="/tmp"))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "step-00000001.ckpt"
    state = build_state(parse_size(args.size), args.tensors)
    if not path.exists():
        asyncckpt.save(path, state.state_dict(), step=1)
    restore = restore_function()
    calls = {
        "load": lambda: asyncckpt.load(path),
        "restore": lambda: restore(directory, state.objects()),
    }
    probe = Probe()
    print(f"# {asyncckpt.__file__}; load average {os.getloadavg()}")
    print("what     wall s  read s  outside s  probe   requests  mean KiB")
    rows: dict[str, list[float]] = {}
    order = args.what.split(",")
    for round_ in range(args.rounds):
        for what in order[round_ % len(order) :] + order[: round_ % len(order)]:  # each goes first in turn
            gc.collect()
            method = evict([directory])
            probe.reset()
            before = disk_reads(args.device)
            started = time.perf_counter()
            calls[what]()
            wall = time.perf_counter() - started
            after = disk_reads(args.device)
            requests, sectors = after[0] - before[0], after[1] - before[1]
            mean = sectors * 512 / 1024 / max(requests, 1)
            rows.setdefault(what, []).append(wall)
            print(
                f"{what:8} {wall:6.3f}  {probe.read_s:6.3f}  {wall - probe.read_s:9.3f}  "
                f"{str(probe.cached):7} {requests:8}  {mean:8.0f}  ({method})",
                flush=True,
            )
    for what, walls in rows.items():
        print(f"{what}: median {statistics.median(walls):.3f} s [{min(walls):.3f}-{max(walls):.3f}]")
    print(f"# load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
