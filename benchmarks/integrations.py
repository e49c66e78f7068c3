#!/usr/bin/env python3
"""What checkpointing costs a Lightning and a Hugging Face Trainer run: the framework's own way vs asyncckpt.

For each framework, a model built in the script (nothing is downloaded) trains STEPS steps with
a checkpoint every EVERY steps, once per configuration, the configurations interleaved round by
round (A B C A B C ...), each run in a fresh process:

  lightning     none (enable_checkpointing=False), floor (no checkpointing; a plain thread writes
                and fsyncs the state's bytes at each checkpoint step: plain_writer.py), floor-copy
                (the same, but of a copy made on the trainer's thread and with a CRC32C of each
                tensor: a like-for-like floor, consistent, durable and checksummed),
                torch (the default TorchCheckpointIO),
                lightning-async (Lightning's own AsyncCheckpointIO: clones, then torch.save in a
                thread), asyncckpt (AsyncCheckpointIO plugin), asyncckpt-overlap (the plugin also
                passed as a callback, so parameter and optimizer copies overlap training)
  transformers  none (save_strategy="no"), floor and floor-copy (as for lightning), trainer (the Trainer's
                checkpoint-N/ folders),
                asyncckpt (AsyncCheckpointTrainer), asyncckpt-overlap (overlap=True: parameter
                and optimizer copies overlap forward and backward)

An asyncckpt configuration with a suffix -niceN (asyncckpt-nice10, asyncckpt-overlap-nice19) runs
the writer's threads N nice levels below the trainer (background_nice=N; without the suffix: the
library's default, 0). --configs picks configurations (default: those above plus -nice10 twins).

Measured per run: the training time from the first step's start to the last step's end (the run
goes on EVERY/2 steps past its last checkpoint, so a background write has time to finish, as in a
long run), and the stall of each checkpoint: the time the training thread spends in Lightning's
Trainer.save_checkpoint (state dict + CheckpointIO.save_checkpoint) or the Trainer's
_save_checkpoint; for asyncckpt also the time to durable of each checkpoint (from the save call
to the commit, read from the run's events.jsonl). Slowdown is each run's training time over the
same round's "none" run (--configs must name "none"). Medians [min-max] over --repeat rounds.
With "floor": the plain writer's thread CPU time per checkpoint over the "none" training time of
EVERY steps, the least slowdown any background writer can cause when training uses every core.
Output: tables on stdout, JSON (--out) and a Markdown file next to it with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from plain_writer import Copy, PlainWriter, state_tensors

CONFIGS = {
    "lightning": (
        "none",
        "floor",
        "floor-copy",
        "torch",
        "lightning-async",
        "asyncckpt",
        "asyncckpt-nice10",
        "asyncckpt-overlap",
        "asyncckpt-overlap-nice10",
    ),
    "transformers": (
        "none",
        "floor",
        "floor-copy",
        "trainer",
        "asyncckpt",
        "asyncckpt-nice10",
        "asyncckpt-overlap",
        "asyncckpt-overlap-nice10",
    ),
}


def split_nice(config: str) -> tuple[str, dict[str, Any]]:
    """``asyncckpt-overlap-nice10`` -> (``asyncckpt-overlap``, {"background_nice": 10})."""
    base, sep, level = config.rpartition("-nice")
    if sep and level.isdigit() and base.startswith("asyncckpt"):
        return base, {"background_nice": int(level)}
    return config, {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="integrations.py",
        description=(__doc__ or "").split("\n\n")[0],
        epilog=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--frameworks", default="lightning,transformers", help="comma-separated (%(default)s)"
    )
    parser.add_argument("--steps", type=int, default=100, help="checkpointed steps per run (%(default)s)")
    parser.add_argument("--every", type=int, default=20, help="a checkpoint every N steps (%(default)s)")
    parser.add_argument(
        "--configs", help="comma-separated configurations (default: every one of the framework)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every configuration (%(default)s)")
    parser.add_argument("--lightning-width", type=int, default=1024, help="MLP width (%(default)s)")
    parser.add_argument("--lightning-depth", type=int, default=8, help="MLP hidden layers (%(default)s)")
    parser.add_argument("--lightning-batch", type=int, default=64, help="(%(default)s)")
    parser.add_argument("--hf-embd", type=int, default=384, help="GPT-2 width (%(default)s)")
    parser.add_argument("--hf-layers", type=int, default=4, help="GPT-2 layers (%(default)s)")
    parser.add_argument("--hf-vocab", type=int, default=8192, help="GPT-2 vocabulary (%(default)s)")
    parser.add_argument("--hf-batch", type=int, default=2, help="sequences of 64 tokens a step (%(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (%(default)s)")
    parser.add_argument("--dir", type=Path, help="where checkpoints go (default: a temp dir, removed)")
    parser.add_argument("--out", type=Path, help="JSON result; a .md with the command goes beside it")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # framework:config, run by the parent
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- child: one run


def run_lightning(config: str, options: argparse.Namespace, directory: Path) -> dict[str, Any]:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import AsyncCheckpointIO as LightningAsyncIO

    from asyncckpt.integrations.lightning import AsyncCheckpointIO

    config, nice = split_nice(config)
    width, depth = options.lightning_width, options.lightning_depth

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers: list[torch.nn.Module] = [torch.nn.Linear(64, width), torch.nn.ReLU()]
            for _ in range(depth):
                layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
            self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            return torch.nn.functional.mse_loss(self.net(inputs), targets)

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    timer = StepTimer()
    total = options.steps + options.every // 2
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(total * options.lightning_batch, 64, generator=generator)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, inputs[:, :1]), batch_size=options.lightning_batch
    )
    callbacks: list[Any] = [timer.lightning_callback(L)]
    plugins: list[Any] = []
    plain = PlainWriter(directory, checksum=config == "floor-copy")
    if config.startswith("floor"):
        callbacks.append(plain_lightning_callback(L, plain, options.every, copy=config == "floor-copy"))
    if config not in ("none", "floor", "floor-copy"):
        callbacks.append(ModelCheckpoint(dirpath=directory, every_n_train_steps=options.every, save_top_k=-1))
    if config == "lightning-async":
        plugins.append(LightningAsyncIO())
    if config.startswith("asyncckpt"):
        io = AsyncCheckpointIO(**nice)
        plugins.append(io)
        if config == "asyncckpt-overlap":
            callbacks.append(io)
    trainer = L.Trainer(
        max_steps=total,
        accelerator=options.device,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=config not in ("none", "floor", "floor-copy"),
        plugins=plugins,
        callbacks=callbacks,
    )
    original = L.Trainer.save_checkpoint

    def timed_save(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            timer.stalls.append(time.perf_counter() - started)

    L.Trainer.save_checkpoint = timed_save  # type: ignore[method-assign]
    trainer.fit(Model(), data)
    plain.join()
    params = sum(p.numel() for p in trainer.lightning_module.parameters())
    return timer.result(params=params, files=checkpoint_bytes(directory), directory=directory, plain=plain)


def hf_gpt2(options: argparse.Namespace) -> tuple[Any, Any]:
    """The Trainer's GPT-2 (built from a config, seeded) and its endless random tokens."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = options.hf_vocab

    class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 100_000

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            ids = torch.randint(0, vocab, (64,), generator=torch.Generator().manual_seed(index))
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=options.hf_layers,
        n_embd=options.hf_embd,
        n_head=6,
        vocab_size=vocab,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config), Tokens()


def run_transformers(config: str, options: argparse.Namespace, directory: Path) -> dict[str, Any]:
    import transformers
    from transformers import Trainer, TrainingArguments

    from asyncckpt.integrations.transformers import AsyncCheckpointTrainer

    transformers.logging.set_verbosity_error()
    config, nice = split_nice(config)
    model, dataset = hf_gpt2(options)
    timer = StepTimer()
    args = TrainingArguments(
        str(directory),
        max_steps=options.steps + options.every // 2,
        save_strategy="no" if config in ("none", "floor", "floor-copy") else "steps",
        save_steps=options.every,
        per_device_train_batch_size=options.hf_batch,
        report_to=[],
        use_cpu=options.device == "cpu",
        disable_tqdm=True,
        logging_strategy="no",
    )
    cls = AsyncCheckpointTrainer if config.startswith("asyncckpt") else Trainer
    extra = {"overlap": True} if config == "asyncckpt-overlap" else {}
    if config.startswith("asyncckpt"):
        extra.update(nice)
    plain = PlainWriter(directory, checksum=config == "floor-copy")
    callbacks = [timer.hf_callback()]
    if config.startswith("floor"):
        callbacks.append(plain_hf_callback(plain, options.every, copy=config == "floor-copy"))
    trainer = cls(model=model, args=args, train_dataset=dataset, callbacks=callbacks, **extra)
    original = cls._save_checkpoint

    def timed_save(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            timer.stalls.append(time.perf_counter() - started)

    cls._save_checkpoint = timed_save  # type: ignore[method-assign]
    trainer.train()
    plain.join()
    params = sum(p.numel() for p in model.parameters())
    return timer.result(params=params, files=checkpoint_bytes(directory), directory=directory, plain=plain)


def plain_hf_callback(plain: PlainWriter, every: int, *, copy: bool) -> Any:
    """The floor configurations' checkpoints in the HF Trainer: a plain write every ``every`` steps
    (of a copy, with ``copy``)."""
    from transformers import TrainerCallback

    copier = Copy() if copy else list

    class PlainSaves(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % every == 0:
                tensors = state_tensors(kwargs["model"], kwargs["optimizer"])
                plain.save(state.global_step, copier(tensors))

    return PlainSaves()


def plain_lightning_callback(L: Any, plain: PlainWriter, every: int, *, copy: bool) -> Any:  # noqa: N803
    """The floor configurations' checkpoints in Lightning: a plain write every ``every`` steps
    (of a copy, with ``copy``)."""
    copier = Copy() if copy else list

    class PlainSaves(L.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            if trainer.global_step % every == 0:
                tensors = state_tensors(module, trainer.optimizers[0])
                plain.save(trainer.global_step, copier(tensors))

    return PlainSaves()


class StepTimer:
    """Training time from the start of the step after the warm-up to the last step's end; save stalls."""

    WARMUP = 3  # steps before the clock starts (allocator and thread-pool warm-up)

    def __init__(self) -> None:
        self.first: float | None = None
        self.last = 0.0
        self.cpu_first = self.cpu_last = 0.0
        self.steps = 0
        self.stalls: list[float] = []
        self.begins: list[float] = []  # each step's start and end (perf_counter), every step
        self.ends: list[float] = []

    def begin(self) -> None:
        self.steps += 1
        now = time.perf_counter()
        self.begins.append(now)
        if self.steps == self.WARMUP + 1:
            self.first = now
            self.cpu_first = time.process_time()

    def end(self) -> None:
        self.last = time.perf_counter()
        self.ends.append(self.last)
        self.cpu_last = time.process_time()

    def lightning_callback(self, L: Any) -> Any:  # noqa: N803
        timer = self

        class Timing(L.Callback):  # type: ignore[misc]
            def on_train_batch_start(self, *args: Any) -> None:
                timer.begin()

            def on_train_batch_end(self, *args: Any) -> None:
                timer.end()

        return Timing()

    def hf_callback(self) -> Any:
        from transformers import TrainerCallback

        timer = self

        class Timing(TrainerCallback):  # type: ignore[misc]
            def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
                timer.begin()

            def on_step_end(self, *args: Any, **kwargs: Any) -> None:
                timer.end()

        return Timing()

    def result(self, *, params: int, files: int, directory: Path, plain: PlainWriter) -> dict[str, Any]:
        assert self.first is not None
        return {
            "train_s": self.last - self.first,
            "timed_steps": self.steps - self.WARMUP,
            "plain_cpu_s": plain.cpu_s,
            "cpu_s": self.cpu_last - self.cpu_first,
            "stalls_s": self.stalls,
            "step_s": [end - begin for begin, end in zip(self.begins, self.ends, strict=False)],
            "gap_s": [begin - end for end, begin in zip(self.ends, self.begins[1:], strict=False)],
            "durable_s": durable_times(directory),
            "params": params,
            "bytes": files,
        }


def durable_times(directory: Path) -> list[float]:
    """Each asyncckpt checkpoint's time from the save call to its commit, from the events logs:
    the staged event (logged when save() returns, with its stall) to the committed event (the
    writer handles a checkpointer's saves in order)."""
    times: list[float] = []
    for log in sorted(directory.rglob("events.jsonl")):
        events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        staged = [e for e in events if e["event"] == "checkpoint.save.staged"]
        committed = [e for e in events if e["event"] == "checkpoint.save.committed"]
        for begin, end in zip(staged, committed, strict=False):
            seconds = (
                datetime.fromisoformat(end["timestamp"]) - datetime.fromisoformat(begin["timestamp"])
            ).total_seconds()
            times.append(seconds + begin["stall_ms"] / 1000.0)
    return times


def checkpoint_bytes(directory: Path) -> int:
    """Bytes of the newest checkpoint (a file, or the Trainer's newest checkpoint-N folder)."""
    files = [p for p in directory.rglob("*") if p.is_file() and p.suffix not in (".jsonl", ".txt", ".json")]
    if not files:
        return 0
    newest = max(files, key=lambda p: p.stat().st_mtime)
    group = (
        [p for p in files if p.parent == newest.parent]
        if newest.parent.name.startswith("checkpoint-")
        else [newest]
    )
    return sum(p.stat().st_size for p in group)


def child(spec: str, options: argparse.Namespace) -> None:
    framework, config = spec.split(":")
    assert options.dir is not None
    directory = options.dir / f"{framework}-{config}"
    run = run_lightning if framework == "lightning" else run_transformers
    print(json.dumps(run(config, options, directory)))


# --------------------------------------------------------------------------- parent: rounds, tables


def run_child(spec: str, options: argparse.Namespace, argv: list[str], work: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, *argv, "--child", spec, "--dir", str(work)]
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{spec} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure(options: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    frameworks = options.frameworks.split(",")
    asked = options.configs.split(",") if options.configs else []
    unknown = [c for c in asked if not any(c in CONFIGS[f] for f in frameworks)]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown} for {frameworks}: choose from {CONFIGS}")
    for framework in frameworks:
        # a configuration of another framework (lightning-async, trainer) is that framework's only
        configs = [c for c in asked if c in CONFIGS[framework]] if asked else list(CONFIGS[framework])
        runs[framework] = {config: [] for config in configs}
        for round_ in range(options.repeat):
            for config in configs:
                with tempfile.TemporaryDirectory(dir=options.dir) as work:
                    result = run_child(f"{framework}:{config}", options, argv, Path(work))
                runs[framework][config].append(result)
                print(
                    f"{framework} {config} round {round_ + 1}: {result['train_s']:.2f} s, "
                    f"stalls {[round(s * 1000) for s in result['stalls_s']]} ms",
                    file=sys.stderr,
                )
    return runs


def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "-"
    scaled = [v * scale for v in values]
    return f"{statistics.median(scaled):.{digits}f} [{min(scaled):.{digits}f}-{max(scaled):.{digits}f}]"


def floor_line(floor: list[dict[str, Any]], none: list[dict[str, Any]], every: int) -> str:
    """The plain writer's CPU per checkpoint over the training time of ``every`` steps."""
    cpu = [s for run in floor for s in run["plain_cpu_s"]]
    per_every = [run["train_s"] * every / run["timed_steps"] for run in none]
    share = 100.0 * statistics.median(cpu) / statistics.median(per_every)
    return (
        f"Interference floor: a plain thread's write + fsync of the checkpoint's bytes took "
        f"{spread(cpu, 1000.0, digits=0)} ms of CPU per checkpoint, against "
        f"{spread(per_every, 1000.0, digits=0)} ms of training between two checkpoints (none): "
        f"**{share:.1f}%**, the least slowdown a background writer can cause when training "
        "keeps every core busy (medians [min-max])."
    )


def tables(runs: dict[str, Any], every: int) -> str:
    lines = []
    for framework, configs in runs.items():
        base = [run["train_s"] for run in configs["none"]]
        checkpoints = [results for c, results in configs.items() if not c.startswith("floor")]
        saved = [run for results in checkpoints for run in results if run["bytes"]]
        first = saved[0] if saved else configs["none"][0]
        lines += [
            f"### {framework} ({first['params'] / 1e6:.1f} M parameters, "
            f"checkpoint {first['bytes'] / 1e6:.0f} MB)",
            "",
            "| configuration | training time (s) | slowdown vs none (%) | CPU time vs none (%) "
            "| stall per checkpoint (ms) | time to durable (ms) | checkpoints |",
            "|---|---|---|---|---|---|---|",
        ]
        floor = configs.get("floor")
        for config, results in configs.items():
            slowdown = [100.0 * (run["train_s"] / b - 1.0) for run, b in zip(results, base, strict=True)]
            cpu = [
                100.0 * (run["cpu_s"] / b["cpu_s"] - 1.0)
                for run, b in zip(results, configs["none"], strict=True)
            ]
            stalls = [s for run in results for s in run["stalls_s"]]
            durable = [s for run in results for s in run.get("durable_s", [])]
            count = len(results[0]["stalls_s"]) or len(results[0].get("plain_cpu_s", []))
            none = config == "none"
            lines.append(
                f"| {config} | {spread([r['train_s'] for r in results], digits=2)} | "
                f"{'-' if none else spread(slowdown)} | {'-' if none else spread(cpu)} | "
                f"{spread(stalls, 1000.0)} | {spread(durable, 1000.0, digits=0)} | {count} |"
            )
        lines.append("")
        if floor is not None:
            lines += [floor_line(floor, configs["none"], every), ""]
    return "\n".join(lines)


def machine() -> str:
    """CPUs, versions, GPU, and the load average: other processes skew wall times."""
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}{gpu}; "
        f"load average {load}"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)
    if options.child:
        child(options.child, options)
        return
    owned = None
    if options.dir is None:
        owned = tempfile.TemporaryDirectory(prefix="asyncckpt-integrations-")
        options.dir = Path(owned.name)
    options.dir.mkdir(parents=True, exist_ok=True)
    try:
        runs = measure(options, strip_paths(argv))
    finally:
        if owned is not None:
            owned.cleanup()
    text = tables(runs, options.every)
    print(text)
    if options.out is not None:
        command = "python benchmarks/integrations.py " + shlex.join(argv)
        options.out.write_text(json.dumps({"command": command, "machine": machine(), "runs": runs}, indent=1))
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        options.out.with_suffix(".md").write_text(
            f"# Integrations: checkpoint cost in Lightning and the HF Trainer\n\n"
            f"`{command}`\n\n{stamp}, {machine()}\n\n{text}\n"
        )


def strip_paths(argv: list[str]) -> list[str]:
    """The options a child run gets: everything but --out and --dir (the parent passes its own)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--out", "--dir"):
            skip = True
            continue
        if arg.startswith(("--out=", "--dir=")):
            continue
        kept.append(arg)
    return kept


if __name__ == "__main__":
    main()
