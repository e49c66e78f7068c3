#!/usr/bin/env python3
"""Where the time of asyncckpt's save and load paths goes: per-part timings and a pyinstrument profile.

``--path save`` (default): the parts of ``AsyncCheckpointer.save()`` on the training thread
(flattening the state, the staging copies) next to a plain per-tensor ``copy_`` of the same
tensors, then a profile of ``save()`` calls only (not the waits for the writer). Uses asyncckpt
internals (``snapshot.flatten``, ``staging.stage``) to time the parts.
``--path sync-save``: ``asyncckpt.save`` next to a plain write + fsync of the same bytes, and its profile.
``--path load``: warm ``asyncckpt.load`` / ``restore`` next to one ``readinto`` of the file and
CRC32C of the same bytes, and a profile of ``asyncckpt.load``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ckptbench.state import build_state, format_size, parse_size  # noqa: E402


def _median_ms(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def _save_path(state: Any, directory: Path, n: int, profiler: Any) -> list[str]:
    from ckptbench.internals import stage_once

    import asyncckpt
    from asyncckpt.saving.snapshot import flatten
    from asyncckpt.saving.staging import StagingPool

    objects = state.objects()
    floor_buffers = [torch.empty_like(t) for t in state.tensors()]
    snapshot = flatten(objects)
    pool = StagingPool(1, pin_memory=False)
    buffers = pool.acquire(snapshot.layout_key())
    assert buffers is not None

    def plain_copy() -> None:
        for dest, source in zip(floor_buffers, state.tensors(), strict=True):
            dest.copy_(source)

    parts = {
        "state_dict() of model + optimizer": lambda: state.state_dict(),
        "plain per-tensor copy_ (floor, incl. state_dict())": plain_copy,
        "snapshot.flatten(state)": lambda: flatten(objects),
        "staging.stage(snapshot) (copies into the buffer set)": lambda: stage_once(snapshot, buffers).wait(),
    }
    lines = []
    for name, fn in parts.items():
        fn()
        lines.append(f"  {_median_ms(fn, n):9.2f}  {name}")
    stalls = []
    with asyncckpt.AsyncCheckpointer(directory, keep_last=1) as ckpt:
        ckpt.save(0, objects).result()
        for step in range(1, n + 1):
            profiler.start()
            started = time.perf_counter()
            handle = ckpt.save(step, objects)
            stalls.append(time.perf_counter() - started)
            profiler.stop()
            handle.result()
    lines.append(f"  {statistics.median(stalls) * 1e3:9.2f}  AsyncCheckpointer.save() (the stall)")
    return lines


def _write_floor(state: Any, path: Path) -> None:
    views = [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in state.tensors()]
    path.unlink(missing_ok=True)
    os.sync()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for view in views:
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_save_path(state: Any, directory: Path, n: int, profiler: Any) -> list[str]:
    import asyncckpt

    objects = state.objects()
    floor = _median_ms(lambda: _write_floor(state, directory / "floor.bin"), n)
    ours = []
    for step in range(1, n + 1):
        target = directory / f"step-{step:010d}.ckpt"  # a new file each time, like the benchmark
        os.sync()
        profiler.start()
        started = time.perf_counter()
        asyncckpt.save(target, objects, step=step)
        ours.append(time.perf_counter() - started)
        profiler.stop()
        target.unlink()
    return [
        f"  {floor:9.2f}  os.write + fsync of the same bytes (floor)",
        f"  {statistics.median(ours) * 1e3:9.2f}  asyncckpt.save",
    ]


def _load_path(state: Any, directory: Path, n: int, profiler: Any) -> list[str]:
    import crc32c

    import asyncckpt

    path = directory / "step-0000000001.ckpt"
    asyncckpt.save(path, state.objects(), step=1)
    data = torch.empty(path.stat().st_size, dtype=torch.uint8)
    view = memoryview(data.numpy())

    def read_all() -> None:
        with open(path, "rb", buffering=0) as file:
            file.readinto(view)

    restore = asyncckpt.restore
    parts = {
        "one readinto of the whole file into a preallocated buffer (floor)": read_all,
        "crc32c of the same bytes": lambda: crc32c.crc32c(view),
        "torch.empty + fill_ of a new buffer of the file's size (page faults)": lambda: torch.empty(
            len(view), dtype=torch.uint8
        ).fill_(0),
        'asyncckpt.load (verify="full")': lambda: asyncckpt.load(path),
        'asyncckpt.load (verify="structure")': lambda: asyncckpt.load(path, verify="structure"),
        "asyncckpt.restore into the model and optimizer": lambda: restore(
            directory, state.objects(), log=lambda *a, **k: None
        ),
    }
    lines = []
    for name, fn in parts.items():
        fn()
        lines.append(f"  {_median_ms(fn, n):9.2f}  {name}")
    for _ in range(n):
        profiler.start()
        asyncckpt.load(path)
        profiler.stop()
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--path", choices=("save", "sync-save", "load"), default="save", help="what to profile"
    )
    parser.add_argument("--size", default="256M", help="state size (default %(default)s)")
    parser.add_argument("--tensors", type=int, default=10000, help="tensor count (default %(default)s)")
    parser.add_argument("--saves", type=int, default=10, help="saves per measurement (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this .md file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from ckptbench.system import machine

    import asyncckpt

    state = build_state(parse_size(args.size), args.tensors)

    facts = machine(Path(tempfile.gettempdir()))
    lines = [
        f"state: {format_size(state.nbytes)} in {state.n_tensors} tensors, torch threads "
        f"{torch.get_num_threads()}, asyncckpt {asyncckpt.__version__} at commit {facts.get('git_commit')}",
        f"machine: {facts['cpus']} CPUs ({facts['cpu_model']}), load average {facts['loadavg_start']}",
        "",
        "median ms per call:",
    ]
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005)
    with tempfile.TemporaryDirectory(prefix="asyncckpt-profile-") as directory:
        paths = {"save": _save_path, "sync-save": _sync_save_path, "load": _load_path}
        lines += paths[args.path](state, Path(directory), args.saves, profiler)
    lines += ["", f"pyinstrument, the profiled calls of --path {args.path}:", ""]
    lines.append(profiler.output_text(unicode=False, color=False, show_all=False))
    report = "\n".join(lines)
    print(report)
    if args.out is not None:  # markdown: the command, then the report verbatim
        command = "python " + " ".join(sys.argv)
        args.out.write_text(f"# {args.out.stem}\n\ncommand: `{command}`\n\n```\n{report}\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
