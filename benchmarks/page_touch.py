"""What memory the kernel hands out costs on this machine: a write of new file pages, and a
first touch of new anonymous memory, in kernel CPU per MiB, save after save.

On a VM whose balloon device reports free pages to the host (free page reporting), a page the
guest freed is unmapped by the host, and the next touch of it costs a hypervisor fault and a
zeroed page: the page cache of a new checkpoint file, and new tensors or staging buffers, cost
far more kernel time while the guest is taking such pages than when it reuses pages it freed
a moment ago. Every write and load figure measured on such a VM carries this cost, in amounts
that depend on the VM's memory history, not on the method. This script shows it on its own:

    python benchmarks/page_touch.py --size 256M --saves 10

Per save: write ``--size`` bytes to a new file and fsync it (deleting the file of two saves
before, as ``keep_last=2`` would), then allocate and touch ``--size`` bytes of new anonymous
memory; for each, the wall time and the process's kernel CPU (``os.times().system``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ckptbench.state import parse_size  # noqa: E402

PIECE = 8 << 20


def write_new_file(path: Path, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for start in range(0, len(data), PIECE):
            os.write(fd, data[start : start + PIECE])
        os.fsync(fd)
    finally:
        os.close(fd)


def touch_new_memory(nbytes: int) -> None:
    memory = bytearray(nbytes)  # calloc: pages are mapped on first write
    for start in range(0, nbytes, 4096):
        memory[start] = 1
    del memory


def timed(action: object) -> tuple[float, float]:
    """Wall seconds and kernel CPU seconds of ``action()``."""
    before, started = os.times(), time.perf_counter()
    action()  # type: ignore[operator]
    after = os.times()
    return time.perf_counter() - started, after.system - before.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="256M", help="bytes per save (256M, 1G, ...)")
    parser.add_argument("--saves", type=int, default=10)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    size = parse_size(args.size)
    data = memoryview(os.urandom(1 << 20) * (size >> 20))
    mib = len(data) / (1 << 20)
    print(f"load average {os.getloadavg()}; {mib:.0f} MiB per save")
    print("save | file write+fsync: wall ms, kernel ms/MiB | new memory touch: wall ms, kernel ms/MiB")
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        folder = Path(directory)
        for save in range(args.saves):
            path = folder / f"save-{save}.bin"
            wall, kernel = timed(partial(write_new_file, path, data))
            if save >= 2:
                (folder / f"save-{save - 2}.bin").unlink()
            touch_wall, touch_kernel = timed(partial(touch_new_memory, len(data)))
            print(
                f"{save} | {wall * 1e3:.0f}, {kernel * 1e3 / mib:.2f} | "
                f"{touch_wall * 1e3:.0f}, {touch_kernel * 1e3 / mib:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
