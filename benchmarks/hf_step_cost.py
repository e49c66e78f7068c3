#!/usr/bin/env python3
"""Where a checkpoint's cost goes in a Hugging Face Trainer run, step by step, in one process.

One ``AsyncCheckpointTrainer`` run (the GPT-2 of integrations.py, nothing downloaded) with its
own saving off; a callback takes a checkpoint every EVERY steps, by each METHOD in turn
(A B C A B C ...), so every method meets the same load, and each checkpoint is measured against
the steps just before it, not against another process:

  nothing     no checkpoint (the control: what the measure reads when nothing happens)
  copy        the state's tensors copied into a reused buffer on the trainer's thread, not written
  plain       benchmarks/plain_writer.py: a thread writes + fsyncs the live tensors (the floor)
  copy-plain  the copy, then the plain thread writes + fsyncs the copy
  copy-plain-crc  the same, the thread also computing each tensor's CRC32C (a like-for-like floor:
              a consistent copy, written, durable and checksummed)
  asyncckpt   the Trainer's checkpoint through asyncckpt (``AsyncCheckpointTrainer._save_checkpoint``)
  asyncckpt-overlap, asyncckpt-verify-none  the same state through a checkpointer of its own with
              overlap=True (copies overlap forward and backward) / verify="none"

For each checkpoint at step k: the gap (the trainer's time between step k's end and step k+1's
start: the save call), then each of the steps k+1 ... k+WINDOW minus the median of the BASELINE
steps before step k (after the previous checkpoint's window), and the process CPU time in the
window: the training threads' (the main thread and torch's OpenMP workers) minus their baseline,
and every other thread's (the writer's); and the training threads' time waiting on a run queue
while ready (taken by other threads, of this process or not) minus its baseline. Wall times need a
quiet machine; the CPU figures hold better under load. Medians [min-max] per method.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from integrations import hf_gpt2
from plain_writer import Copy, PlainWriter, state_tensors


def thread_cpu(tids: list[int]) -> tuple[float, float]:
    """Seconds the threads ``tids`` of this process ran, and waited on a run queue while ready
    to run (/proc schedstat, nanoseconds: what other threads took from them)."""
    ran = waited = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                fields = f.read().split()
        except OSError:  # the thread ended
            continue
        ran += int(fields[0])
        waited += int(fields[1])
    return ran / 1e9, waited / 1e9


def training_threads() -> list[int]:
    """The main thread and the threads Python did not start (torch's OpenMP workers)."""
    python = {t.native_id for t in threading.enumerate() if t is not threading.main_thread()}
    return [int(tid) for tid in os.listdir("/proc/self/task") if int(tid) not in python]


METHODS = ("nothing", "copy", "plain", "copy-plain", "copy-plain-crc", "asyncckpt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hf_step_cost.py",
        description=(__doc__ or "").split("\n\n")[0],
        epilog=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (%(default)s)")
    parser.add_argument("--rounds", type=int, default=6, help="checkpoints per method (%(default)s)")
    parser.add_argument("--every", type=int, default=12, help="steps between checkpoints (%(default)s)")
    parser.add_argument("--window", type=int, default=5, help="steps after a checkpoint charged to it")
    parser.add_argument("--baseline", type=int, default=5, help="steps before a checkpoint: its baseline")
    parser.add_argument("--hf-embd", type=int, default=384, help="GPT-2 width (%(default)s)")
    parser.add_argument("--hf-layers", type=int, default=4, help="GPT-2 layers (%(default)s)")
    parser.add_argument("--hf-vocab", type=int, default=8192, help="GPT-2 vocabulary (%(default)s)")
    parser.add_argument("--hf-batch", type=int, default=2, help="sequences of 64 tokens a step (%(default)s)")
    parser.add_argument("--dir", type=Path, help="where checkpoints go (default: a temp dir, removed)")
    parser.add_argument("--out", type=Path, help="JSON result; a .md with the command goes beside it")
    options = parser.parse_args(argv)
    if options.window + options.baseline >= options.every:
        parser.error("--window + --baseline must be below --every")
    return options


# asyncckpt with other options: its own checkpointer and directory, the Trainer's state
VARIANTS: dict[str, dict[str, Any]] = {
    "asyncckpt-overlap": {"overlap": True},
    "asyncckpt-verify-none": {"verify": "none"},
}


def variant(trainer: Any, directory: Path, options: dict[str, Any]) -> Callable[[int], None]:
    """A checkpoint of the Trainer's state through an AsyncCheckpointer with ``options``."""
    from asyncckpt import AsyncCheckpointer

    checkpointer = AsyncCheckpointer(directory, keep_last=2, **options).__enter__()
    trainer.asyncckpt_extra.append(checkpointer)

    def save(step: int) -> None:
        state, metadata = trainer._checkpoint_state()
        checkpointer.save(step, state, metadata=metadata)

    return save


def make_methods(trainer: Any, directory: Path, names: list[str]) -> dict[str, Callable[[int], None]]:
    """Each method name's checkpoint call (taking the step), and what it needs."""
    plain = PlainWriter(directory / "plain")
    crc = PlainWriter(directory / "crc", checksum=True)
    copy = Copy()
    tensors = lambda: state_tensors(trainer.model, trainer.optimizer)  # noqa: E731
    methods: dict[str, Callable[[int], None]] = {
        "nothing": lambda step: None,
        "copy": lambda step: None if copy(tensors()) is None else None,
        "plain": lambda step: plain.save(step, tensors()),
        "copy-plain": lambda step: plain.save(step, copy(tensors())),
        "copy-plain-crc": lambda step: crc.save(step, copy(tensors())),
        "asyncckpt": lambda step: trainer._save_checkpoint(trainer.model, None),
    }
    trainer.asyncckpt_extra = []
    for name, options in VARIANTS.items():
        if name in names:
            methods[name] = variant(trainer, directory / name, options)
    trainer.asyncckpt_plain = [plain, crc]
    return {name: methods[name] for name in names}


def run(options: argparse.Namespace, directory: Path) -> dict[str, Any]:
    import transformers
    from transformers import TrainerCallback, TrainingArguments

    from asyncckpt.integrations.transformers import AsyncCheckpointTrainer

    transformers.logging.set_verbosity_error()
    model, dataset = hf_gpt2(options)
    names = options.methods.split(",")
    total = options.every * (len(names) * options.rounds + 1) + options.window + 1
    args = TrainingArguments(
        str(directory),
        max_steps=total,
        save_strategy="no",
        per_device_train_batch_size=options.hf_batch,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        save_total_limit=2,
    )
    begins: list[float] = []
    ends: list[float] = []
    cpu: list[tuple[float, float]] = []  # process CPU at each step's start and end
    train: list[tuple[float, float]] = []  # the training threads' CPU at each step's start and end
    queued: list[tuple[float, float]] = []  # their run-queue wait at each step's start and end
    tids: list[int] = []
    saves: list[tuple[int, str]] = []
    holder: dict[str, Any] = {}

    class Timing(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            if len(begins) == 2:  # OpenMP's workers exist after the first step
                tids.extend(training_threads())
            begins.append(time.perf_counter())
            cpu.append((time.process_time(), 0.0))
            ran, waited = thread_cpu(tids)
            train.append((ran, 0.0))
            queued.append((waited, 0.0))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())
            cpu[-1] = (cpu[-1][0], time.process_time())
            ran, waited = thread_cpu(tids)
            train[-1] = (train[-1][0], ran)
            queued[-1] = (queued[-1][0], waited)
            step = state.global_step
            if saves and step == saves[-1][0] + options.window:  # the last checkpoint's window is over
                report = {
                    "begins": begins,
                    "ends": ends,
                    "cpu": cpu,
                    "train": train,
                    "queued": queued,
                    "saves": saves[-1:],
                }
                for name, rows in charges(report, options.window, options.baseline).items():
                    print(
                        f"step {step - options.window} {name}: "
                        + json.dumps({k: round(v * 1000) for k, v in rows[0].items()}),
                        file=sys.stderr,
                        flush=True,
                    )
            if step % options.every == 0 and step + options.window < total:
                name = names[(step // options.every - 1) % len(names)]
                holder["methods"][name](step)
                saves.append((step, name))

    trainer = AsyncCheckpointTrainer(model=model, args=args, train_dataset=dataset, callbacks=[Timing()])
    holder["methods"] = make_methods(trainer, directory, names)
    trainer.train()
    for writer in trainer.asyncckpt_plain:
        writer.join()
    for checkpointer in trainer.asyncckpt_extra:
        checkpointer.close()
    return {"begins": begins, "ends": ends, "cpu": cpu, "train": train, "queued": queued, "saves": saves}


def charges(run: dict[str, Any], window: int, baseline: int) -> dict[str, list[dict[str, float]]]:
    """Per method, per checkpoint: gap, each window step's excess, CPU excess (seconds)."""
    begins, ends, cpu, train = run["begins"], run["ends"], run["cpu"], run["train"]
    durations = [e - b for b, e in zip(begins, ends, strict=False)]
    train_cpus = [e - b for b, e in train]
    queued = run["queued"]
    waits = [e - b for b, e in queued]
    out: dict[str, list[dict[str, float]]] = {}
    for step, name in run["saves"]:
        k = step - 1  # index of step k (steps count from 1)
        before = slice(k - baseline + 1, k + 1)
        base = statistics.median(durations[before])
        excess = [durations[k + i] - base for i in range(1, window + 1)]
        # CPU from step k's end to step k+window's end: the training threads' against their
        # baseline per step, and every other thread's (the writer's; about 0 between saves)
        trained = train[k + window][1] - train[k][1]
        process = cpu[k + window][1] - cpu[k][1]
        out.setdefault(name, []).append(
            {
                "gap": begins[k + 1] - ends[k],
                "first": excess[0],
                "rest": sum(excess[1:]),
                "total": begins[k + 1] - ends[k] + sum(excess),
                "train_cpu": trained - window * statistics.median(train_cpus[before]),
                "other_cpu": process - trained,
                "queued": queued[k + window][1] - queued[k][1] - window * statistics.median(waits[before]),
                "base": base,
            }
        )
    return out


def spread(values: list[float]) -> str:
    ms = [v * 1000.0 for v in values]
    return f"{statistics.median(ms):.0f} [{min(ms):.0f}-{max(ms):.0f}]"


def table(result: dict[str, list[dict[str, float]]], window: int) -> str:
    lines = [
        f"| method | checkpoints | gap: the save call (ms) | step k+1 excess (ms) | steps "
        f"k+2..k+{window} excess (ms) | total per checkpoint (ms) | training threads' CPU excess "
        "(ms) | other threads' CPU (ms) | training threads' run-queue wait excess (ms) "
        "| baseline step (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in result.items():
        cells = [
            spread([r[field] for r in rows])
            for field in ("gap", "first", "rest", "total", "train_cpu", "other_cpu", "queued", "base")
        ]
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="asyncckpt-hfsteps-", dir=options.dir) as work:
        raw = run(options, Path(work))
    result = charges(raw, options.window, options.baseline)
    load = ", ".join(f"{x:.1f}" for x in (*load_before, *os.getloadavg()))
    text = table(result, options.window)
    print(text)
    if options.out is not None:
        command = "python benchmarks/hf_step_cost.py " + shlex.join(argv)
        options.out.write_text(json.dumps({"command": command, "raw": raw, "result": result}, indent=1))
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        options.out.with_suffix(".md").write_text(
            f"# A Trainer checkpoint's cost, step by step, methods interleaved in one run\n\n`{command}`\n\n"
            f"{stamp}, {os.cpu_count()} CPUs, torch {torch.__version__}, OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY', '(not set)')}; load average before "
            f"(1, 5, 15 min) and after: {load}\n\n{text}\n"
        )


if __name__ == "__main__":
    main()
