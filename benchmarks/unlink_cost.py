#!/usr/bin/env python3
"""What deleting an old checkpoint costs on this filesystem: ``unlink`` of a written, fsynced
file of each size, and the directory fsync after it (medians of ``--rounds``).

On a filesystem mounted with ``discard`` the kernel discards the freed blocks inside ``unlink``,
so the cost grows with the file; that is why a save's handle resolves before retention deletes
older checkpoints (docs/OPERATIONS.md).

    python benchmarks/unlink_cost.py --sizes 32M,256M,1G --rounds 3 --dir /var/tmp
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

from ckptbench.state import format_size, parse_size  # noqa: E402

CHUNK = 64 << 20


def _mount_options(directory: Path) -> str:
    """The mount options of the filesystem holding ``directory`` (from /proc/mounts), or ``?``."""
    best, options = "", "?"
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return options
    target = str(directory.resolve())
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and target.startswith(fields[1]) and len(fields[1]) > len(best):
            best, options = fields[1], f"{fields[2]} {fields[3]}"
    return options


def _written(path: Path, nbytes: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, data[: min(left, len(data))])
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32M,256M,1G")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    data = os.urandom(CHUNK)
    directory = Path(tempfile.mkdtemp(prefix="unlink-cost-", dir=args.dir))
    print(f"directory {directory} ({_mount_options(directory)}), {args.rounds} rounds")
    print("| size | unlink ms (median) | directory fsync ms (median) |")
    print("|---|---|---|")
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        for size in [parse_size(s) for s in args.sizes.split(",")]:
            unlinks, fsyncs = [], []
            for round_ in range(args.rounds):
                path = directory / f"f{round_}"
                _written(path, size, data)
                os.fsync(dir_fd)
                started = time.perf_counter()
                os.unlink(path)
                unlinked = time.perf_counter()
                os.fsync(dir_fd)
                unlinks.append(unlinked - started)
                fsyncs.append(time.perf_counter() - unlinked)
            unlink_ms, fsync_ms = statistics.median(unlinks) * 1e3, statistics.median(fsyncs) * 1e3
            print(f"| {format_size(size)} | {unlink_ms:.1f} | {fsync_ms:.2f} |", flush=True)
    finally:
        os.close(dir_fd)
        directory.rmdir()


if __name__ == "__main__":
    main()
