#!/usr/bin/env python3
"""How long asyncckpt's background threads hold the GIL (and use the CPU) per checkpoint.

A trainer thread feels the checkpoint writer through the GIL: whenever the writer (or the
copier, or the event loop) runs Python, the trainer's Python waits. This script saves a
benchmark state (model + Adam state, ``--size`` in ``--tensors`` tensors) ``--saves`` times
through ``AsyncCheckpointer``; the trainer thread waits for each save with the GIL released
(``handle.result()``), so whatever holds the GIL meanwhile is asyncckpt. Two measurements:

- CPU seconds per checkpoint of each background thread, from ``/proc/self/task/*/stat``
  (an upper bound of its GIL hold: it includes system calls and CRC32C that release the GIL);
- with ``--py-spy PATH``, GIL hold per checkpoint per thread: the run is repeated under
  ``py-spy record --gil`` (samples only the thread that holds the GIL), and the samples of
  each thread are counted, with the functions that hold it longest.

Public API only, so the same script measures older versions (put them first on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ckptbench.state import build_state, format_size, parse_size  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", default="32M", help="state size (default %(default)s)")
    parser.add_argument("--tensors", type=int, default=10000, help="tensor count (default %(default)s)")
    parser.add_argument("--saves", type=int, default=20, help="checkpoints measured (default %(default)s)")
    parser.add_argument(
        "--py-spy", default=None, metavar="PATH", help="py-spy executable: also sample the GIL"
    )
    parser.add_argument(
        "--rate", type=int, default=500, help="py-spy samples per second (default %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="write the report (.md) and a .json beside it")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def thread_cpu(seen: dict[int, str]) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of this process, by Python thread name (threads
    of one name summed; ``seen`` keeps the names of threads that have ended since)."""
    seen.update({t.native_id: t.name for t in threading.enumerate() if t.native_id is not None})
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[str, float] = collections.Counter()
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = seen.get(int(task.name), f"thread {task.name}")
        found[name.rstrip("_0123456789")] += (int(fields[11]) + int(fields[12])) / ticks
    return dict(found)


def run_saves(args: argparse.Namespace, *, ready: Any = None) -> dict[str, Any]:
    """Warm up, call ``ready()`` (the sampler attaches), then time ``args.saves`` checkpoints."""
    import asyncckpt

    torch.set_num_threads(args.threads)
    state = build_state(parse_size(args.size), args.tensors)
    names: dict[int, str] = {}
    with (
        tempfile.TemporaryDirectory(prefix="asyncckpt-gil-") as directory,
        asyncckpt.AsyncCheckpointer(directory, keep_last=2) as ckpt,
    ):
        for step in range(-2, 0):  # imports, allocations, caches: not measured
            ckpt.save(step + 2, state.objects()).result()
        if ready is not None:
            ready()
        before = thread_cpu(names)
        main_before = time.thread_time()
        started = time.perf_counter()
        stall = 0.0
        for step in range(1, args.saves + 1):
            t0 = time.perf_counter()
            handle = ckpt.save(step + 1, state.objects())
            stall += time.perf_counter() - t0
            handle.result()
        wall = time.perf_counter() - started
        main_cpu = time.thread_time() - main_before
        after = thread_cpu(names)
    main_name = threading.main_thread().name
    per_thread = {
        name: (after.get(name, 0.0) - before.get(name, 0.0)) / args.saves
        for name in after
        if after.get(name, 0.0) - before.get(name, 0.0) > 0
    }
    return {
        "state_bytes": state.nbytes,
        "tensors": state.n_tensors,
        "saves": args.saves,
        "wall_s_per_checkpoint": wall / args.saves,
        "stall_s_per_checkpoint": stall / args.saves,
        "trainer_cpu_s_per_checkpoint": main_cpu / args.saves,
        "cpu_s_per_checkpoint_by_thread": per_thread,
        "main_thread": main_name,
    }


def sample_gil(args: argparse.Namespace) -> dict[str, Any]:
    """Run the saves in a child process and sample it with ``py-spy record --gil`` while it
    saves (attached after its warm-up); count the samples of each thread."""
    with tempfile.TemporaryDirectory(prefix="asyncckpt-gil-spy-") as scratch:
        raw = Path(scratch) / "samples.txt"
        child = [sys.executable, __file__, "--child", "--size", args.size, "--tensors", str(args.tensors)]
        child += ["--saves", str(args.saves), "--threads", str(args.threads)]
        worker = subprocess.Popen(child, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdout.readline()  # "ready": warmed up, waiting
        command = [args.py_spy, "record", "--gil", "--threads", "--nonblocking", "-f", "raw"]
        command += ["-r", str(args.rate), "-o", str(raw), "--pid", str(worker.pid)]
        spy = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # let py-spy attach before the measured saves start
        worker.stdin.write("go\n")
        worker.stdin.flush()
        worker.wait()
        _, errors = spy.communicate(timeout=60)
        if not raw.exists():
            return {"error": errors[-2000:]}
        return count_samples(raw.read_text(), rate=args.rate, saves=args.saves)


def count_samples(raw: str, *, rate: int, saves: int) -> dict[str, Any]:
    """GIL seconds per checkpoint by thread, and the functions each background thread holds it in."""
    by_thread: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if ": " in frames[0] else frames[0]
        by_thread[thread] += int(count)
        inner = next((f for f in reversed(frames) if "asyncckpt" in f), frames[-1])
        by_function[(thread, inner)] += int(count)
    scale = 1.0 / rate / saves
    return {
        "gil_s_per_checkpoint_by_thread": {t: n * scale for t, n in by_thread.most_common()},
        "top_functions": [
            {"thread": t, "function": f, "gil_s_per_checkpoint": n * scale}
            for (t, f), n in by_function.most_common(15)
        ],
    }


def render(result: dict[str, Any]) -> str:
    run = result["run"]
    lines = [
        f"state: {format_size(run['state_bytes'])} in {run['tensors']} tensors, {run['saves']} checkpoints",
        f"per checkpoint: wall {run['wall_s_per_checkpoint'] * 1e3:.1f} ms, save() stall "
        f"{run['stall_s_per_checkpoint'] * 1e3:.1f} ms, "
        f"trainer CPU {run['trainer_cpu_s_per_checkpoint'] * 1e3:.1f} ms",
        "",
        "CPU ms per checkpoint by thread (/proc; includes GIL-free system calls and CRC32C):",
    ]
    for name, seconds in sorted(run["cpu_s_per_checkpoint_by_thread"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {seconds * 1e3:9.1f}  {name}")
    gil = result.get("gil")
    if gil and "error" not in gil:
        lines += ["", "GIL held, ms per checkpoint by thread (py-spy --gil):"]
        for name, seconds in gil["gil_s_per_checkpoint_by_thread"].items():
            lines.append(f"  {seconds * 1e3:9.1f}  {name}")
        lines += ["", "where (innermost asyncckpt frame), ms per checkpoint:"]
        for entry in gil["top_functions"]:
            ms = entry["gil_s_per_checkpoint"] * 1e3
            lines.append(f"  {ms:9.2f}  {entry['thread'][:24]:24s}  {entry['function']}")
    elif gil:
        lines += ["", f"py-spy failed: {gil['error']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:

        def ready() -> None:
            print("ready", flush=True)
            sys.stdin.readline()

        run_saves(args, ready=ready)
        return 0
    import asyncckpt

    result: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "asyncckpt": getattr(asyncckpt, "__file__", None),
        "loadavg_start": os.getloadavg(),
        "run": run_saves(args),
    }
    if args.py_spy:
        result["gil"] = sample_gil(args)
    result["loadavg_end"] = os.getloadavg()
    report = render(result)
    print(report)
    if args.out is not None:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        loads = f"load average at start / end: {result['loadavg_start']} / {result['loadavg_end']}"
        args.out.write_text(
            f"# {args.out.stem}\n\ncommand: `{result['command']}`\n\n{loads}\n\n```\n{report}\n```\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
