#!/usr/bin/env python3
"""Write overhead and resume speed of asyncckpt, side by side with its peers and the hardware's limits.

For a training state (fp32/bf16 parameters plus a filled Adam state) of each size and tensor count,
the methods run interleaved, round by round (A B C A B C ...), in one process and one directory:

  save  asyncckpt AsyncCheckpointer.save, asyncckpt.save (sync), torch.save, torch.save of a deep
        copy in a thread, torch.distributed.checkpoint.async_save (FileSystemWriter(sync_files=True)),
        safetensors save_file; limits: per-tensor copy_ into preallocated host buffers (staging
        floor) and os.write + fsync of the same bytes to the same directory (durability floor).
  load  (base configuration) cold and warm: asyncckpt.load, asyncckpt.restore into the existing
        model and optimizer, torch.load (+ load_state_dict), safetensors load_file, DCP load;
        limit: readinto of the same bytes into preallocated buffers (read floor).
  interference  steps/s of a ~50 ms/step CPU MLP without and with a checkpoint every K steps.
  memory        RSS over 100 consecutive AsyncCheckpointer saves.
  gpu           (CUDA only) D2H bandwidth vs the PCIe floor, lazy pre-hook vs eager copy, restore.

Medians with [min-max] over --repeat rounds; every ratio is taken within one round. Output: tables
on stdout, a JSON file (--out) and with --plot a PNG next to it (needs matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ckptbench import interference, report, system  # noqa: E402
from ckptbench.loading import CRC_FLOORS, LOAD_METHODS, LoadMethod, file_size  # noqa: E402
from ckptbench.saving import SAVE_METHODS, SaveMethod, available  # noqa: E402
from ckptbench.state import BenchState, build_state, format_size, parse_size  # noqa: E402
from ckptbench.stats import median, ratios, summary  # noqa: E402
from ckptbench.targets import evaluate_targets  # noqa: E402

PARTS = ("save", "load", "interference", "memory", "gpu")
PEERS_FOR_STALL = ("torch_save", "dcp_async")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="write_overhead.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    parser.add_argument(
        "--sizes", default="256M,1G,2G", help="state sizes for the size axis (default %(default)s)"
    )
    parser.add_argument(
        "--tensors", default="100,1000,10000", help="tensor counts for the count axis (default %(default)s)"
    )
    parser.add_argument(
        "--extra",
        default="32M:10000,256M:100000",
        help="more SIZE:COUNT configurations for the scaling part, e.g. small states in many tensors "
        "as every rank of a sharded run holds (default %(default)s; '' for none)",
    )
    parser.add_argument(
        "--base",
        default="1G:1000",
        help="SIZE:COUNT of the headline configuration, where the axes cross and loads are measured "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--loads-everywhere",
        action="store_true",
        help="run the load part at every configuration, not only the base one (the loader's "
        "microseconds per tensor at 10,000 and 100,000 tensors; every load method runs at every "
        "configuration, so name few --methods)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds for the base configuration")
    parser.add_argument(
        "--scaling-repeat", type=int, default=3, help="interleaved rounds for the other configurations"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    parser.add_argument("--dir", type=Path, default=None, help="directory to write in (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="JSON result file")
    parser.add_argument("--plot", action="store_true", help="also write a PNG next to --out (matplotlib)")
    parser.add_argument("--parts", default="save,load,interference,memory,gpu", help="parts to run")
    parser.add_argument(
        "--methods",
        default=",".join(n for n in SAVE_METHODS if not n.endswith("_nice10")),
        help="save methods to run (default: all but the *_nice10 twins, which run asyncckpt's "
        "writer 10 nice levels below the trainer: name them for the interference part)",
    )
    parser.add_argument("--every", type=int, default=20, help="interference: checkpoint every K steps")
    parser.add_argument("--steps", type=int, default=200, help="interference: steps per run")
    parser.add_argument("--interference-repeat", type=int, default=3, help="interference rounds")
    parser.add_argument("--step-ms", type=float, default=50.0, help="interference: target step time")
    parser.add_argument(
        "--mlp-batch", type=int, default=None, help="interference: fixed batch (no calibration)"
    )
    parser.add_argument("--mlp-width", type=int, default=interference.WIDTH, help="interference: MLP width")
    parser.add_argument("--mlp-depth", type=int, default=interference.DEPTH, help="interference: MLP depth")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for everything (default 1: on a small shared machine OpenMP's "
        "parallel copies are many times slower under contention; 0 keeps torch's default)",
    )
    parser.add_argument("--memory-saves", type=int, default=100, help="memory: consecutive saves")
    parser.add_argument("--memory-size", default="64M", help="memory: state size (base tensor count)")
    parser.add_argument("--gpu-size", default="1G", help="gpu: state size for bandwidth and restore")
    parser.add_argument("--gpu-width", type=int, default=4096, help="gpu: MLP width for the overlap test")
    parser.add_argument("--gpu-depth", type=int, default=6, help="gpu: MLP depth for the overlap test")
    parser.add_argument("--keep", action="store_true", help="keep the files written under --dir")
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        metavar="RESULT",
        help="measure nothing: re-render the tables, RESULT.md and (--plot) RESULT.png of a result file",
    )
    parser.add_argument("--note", default=None, help="with --from-json: a provenance line for RESULT.md")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(SAVE_METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(SAVE_METHODS)}")
    size, _, count = args.base.partition(":")
    args.base_bytes, args.base_tensors = parse_size(size), int(count or 1000)
    args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.tensor_list = [int(n) for n in args.tensors.split(",") if n.strip()]
    args.extra_list = []
    for item in (i.strip() for i in args.extra.split(",")):
        if item:
            size, _, count = item.partition(":")
            args.extra_list.append((parse_size(size), int(count or args.base_tensors)))
    return args


def log(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- save


def configurations(args: argparse.Namespace) -> list[tuple[int, int]]:
    """The base configuration first, then the size axis and the tensor-count axis around it."""
    configs = [(args.base_bytes, args.base_tensors)]
    configs += [(s, args.base_tensors) for s in args.size_list]
    configs += [(args.base_bytes, n) for n in args.tensor_list]
    configs += args.extra_list
    unique: list[tuple[int, int]] = []
    for config in configs:
        if config not in unique:
            unique.append(config)
    return unique


def run_saves(
    state: BenchState, directory: Path, names: list[str], *, repeat: int, warmup: int, keep_files: bool
) -> tuple[dict[str, Any], list[SaveMethod]]:
    methods = [SAVE_METHODS[name](state, directory) for name in names if available(name)]
    skipped = [name for name in names if not available(name)]
    if skipped:
        log(f"   (not installed, skipped: {', '.join(skipped)})")
    for method in methods:
        method.setup()
    runs: dict[str, list[Any]] = {m.name: [] for m in methods}
    for round_ in range(warmup + repeat):
        timed = round_ >= warmup
        for method in methods:
            os.sync()  # no dirty pages of the previous method left to write back (untimed)
            run = method.run(step=round_ + 1)
            last_round = round_ == warmup + repeat - 1
            method.cleanup(keep=method.last_path if (keep_files and last_round) else None)
            if timed:
                runs[method.name].append(run)
        label = "warm-up" if not timed else f"round {round_ - warmup + 1}/{repeat}"
        log(
            f"   {label}: " + ", ".join(f"{m.name} {runs[m.name][-1].stall_s:.3f}s" for m in methods if timed)
        )
    # One more, untimed round for memory: freed heap memory is handed back to the OS before each
    # method, so that its RSS peak counts what it allocates, not what an earlier method left free.
    memory: dict[str, int] = {}
    for method in methods:
        os.sync()
        system.release_free_memory()
        memory[method.name] = method.run(step=warmup + repeat + 1).peak_rss_delta
        method.cleanup(keep=method.last_path if keep_files else None)
    return summarize_saves(methods, runs, memory), methods


def summarize_saves(
    methods: list[SaveMethod], runs: dict[str, list[Any]], memory: dict[str, int]
) -> dict[str, Any]:
    stall = {name: [r.stall_s for r in rs] for name, rs in runs.items()}
    durable = {name: [r.durable_s for r in rs] for name, rs in runs.items()}
    out: dict[str, Any] = {}
    floors = [durable[f] for f in ("write_floor", "write_floor_direct") if f in durable]
    write_floor = [min(pair) for pair in zip(*floors, strict=True)]  # the faster, round by round
    for method in methods:
        name = method.name
        entry: dict[str, Any] = {
            "description": method.description,
            "stall_s": summary(stall[name]),
            "durable_s": summary(durable[name]) if name != "copy_floor" else summary([]),
            "peak_extra_rss_bytes": memory[name],
            # host memory kept allocated between saves (staging buffers)
            "held_bytes": method.state.nbytes if name == "copy_floor" else 0,
        }
        # per run, in order: what the kernel did meanwhile (direct reclaim, compaction, faults)
        entry["vmstat_runs"] = [r.extra.get("vmstat", {}) for r in runs[name]]
        if "copy_floor" in stall:
            entry["stall_vs_copy_floor"] = ratios(stall[name], stall["copy_floor"])
        if write_floor and name != "copy_floor":
            entry["durable_vs_write_floor"] = ratios(durable[name], write_floor)
        if "torch_save" in stall and not method.is_floor:
            entry["stall_vs_torch_save"] = ratios(stall[name], stall["torch_save"])
            entry["durable_vs_torch_save"] = ratios(durable[name], durable["torch_save"])
        if name.startswith("asyncckpt") and name != "asyncckpt_sync":
            for peer in PEERS_FOR_STALL:
                if peer in stall:
                    entry[f"{peer}_stall_over_this"] = ratios(stall[peer], stall[name])
            extras = [r.extra for r in runs[name]]
            entry["staging_bytes"] = extras[-1].get("staging_bytes") if extras else None
            entry["held_bytes"] = entry["staging_bytes"] or 0
            for key in ("write_ms", "fsync_ms", "writer_total_ms", "step_wait_s"):
                entry[key] = summary([e[key] for e in extras if key in e])
            # What a trainer whose optimizer step comes at once waits in all: stall + step wait.
            blocked = [r.stall_s + r.extra.get("step_wait_s", 0.0) for r in runs[name]]
            entry["blocked_s"] = summary(blocked)
            if "copy_floor" in stall:
                entry["blocked_vs_copy_floor"] = ratios(blocked, stall["copy_floor"])
        out[name] = entry
    return out


# --------------------------------------------------------------------------- load


def run_loads(state: BenchState, saved: list[SaveMethod], *, repeat: int, warmup: int) -> dict[str, Any]:
    files = {m.name: m.last_path for m in saved if m.last_path is not None}
    methods: list[LoadMethod] = []
    for cls in LOAD_METHODS.values():
        path = files.get(cls.source)
        if path is not None and path.exists():
            methods.append(cls(state, path))
    for method in methods:
        method.setup()
    cold: dict[str, list[Any]] = {m.name: [] for m in methods}
    warm: dict[str, list[Any]] = {m.name: [] for m in methods}
    control = "none"
    for round_ in range(warmup + repeat):
        for method in methods:
            control = system.evict(method.files())
            cold_run = method.run()
            system.warm(method.files())
            warm_run = method.run()
            gc.collect()
            if round_ >= warmup:
                cold[method.name].append(cold_run)
                warm[method.name].append(warm_run)
        if round_ >= warmup:
            log(
                f"   round {round_ - warmup + 1}/{repeat}: "
                + ", ".join(
                    f"{m.name} {cold[m.name][-1].seconds:.3f}/{warm[m.name][-1].seconds:.3f}s"
                    for m in methods
                )
            )
    memory: dict[str, int] = {}
    for method in methods:  # untimed, warm: what each method allocates (see run_saves)
        system.release_free_memory()
        memory[method.name] = method.run().peak_rss_delta
    return {
        "bytes": state.nbytes,
        "tensors": state.n_tensors,
        "repeat": repeat,
        "page_cache_control": control,
        "peak_extra_rss_bytes": memory,
        "file_bytes": {m.name: file_size(m.path) for m in methods},
        "descriptions": {
            **{m.name: m.description for m in methods},
            "read_crc_floor": "the fastest read_crc arrangement of each round (read + CRC32C floor)",
        },
        "cold": summarize_loads(cold),
        "warm": summarize_loads(warm),
    }


def summarize_loads(runs: dict[str, list[Any]]) -> dict[str, Any]:
    seconds = {name: [r.seconds for r in rs] for name, rs in runs.items()}
    arrangements = [seconds[name] for name in CRC_FLOORS if name in seconds]
    if arrangements:  # the read + CRC32C floor: the faster arrangement of each round
        seconds["read_crc_floor"] = [min(times) for times in zip(*arrangements, strict=True)]
    out: dict[str, Any] = {}
    for name in seconds:
        entry: dict[str, Any] = {"seconds": summary(seconds[name])}
        for floor in ("read_floor", "read_crc_floor"):
            if floor in seconds:
                entry[f"vs_{floor}"] = ratios(seconds[name], seconds[floor])
        for peer in ("torch_load", "torch_restore"):
            if peer in seconds:
                entry[f"{peer}_over_this"] = ratios(seconds[peer], seconds[name])
        out[name] = entry
    return out


# --------------------------------------------------------------------------- interference


def _last(values: list[float]) -> str:
    return f"{values[-1]:+.1f}%" if values else "-"


def run_interference(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    shape = {"width": args.mlp_width, "depth": args.mlp_depth}
    if args.mlp_batch:
        batch = args.mlp_batch
        step_s = interference.time_steps(interference.make_trainer(batch, **shape), 5) / 5
    else:
        batch, step_s = interference.calibrate(args.step_ms / 1000.0, **shape)
    trainer = interference.make_trainer(batch, **shape)
    state = trainer.state()
    log(f"   MLP batch {batch}: {step_s * 1e3:.0f} ms/step, state {format_size(state.nbytes)}")
    root = interference.method_dirs(directory)
    names = [n for n in args.methods if not SAVE_METHODS[n].is_floor and available(n)]
    methods = [SAVE_METHODS[name](state, root) for name in names]
    for method in methods:
        method.setup()
    baseline: list[float] = []
    rates: dict[str, list[float]] = {m.name: [] for m in methods}
    slowdown: dict[str, list[float]] = {m.name: [] for m in methods}
    in_run: dict[str, list[float]] = {m.name: [] for m in methods}
    stalls: dict[str, list[float]] = {m.name: [] for m in methods}
    writer: dict[str, list[float]] = {m.name: [] for m in methods}
    for round_ in range(args.interference_repeat):
        os.sync()
        base = interference.train(trainer, args.steps, args.every, None).steps_per_s
        baseline.append(base)
        for method in methods:
            os.sync()
            run = interference.train(trainer, args.steps, args.every, method)
            rates[method.name].append(run.steps_per_s)
            slowdown[method.name].append(100.0 * (1.0 - run.steps_per_s / base))
            if run.in_run_slowdown_pct is not None:
                in_run[method.name].append(run.in_run_slowdown_pct)
            stalls[method.name] += run.stall_s
            writer[method.name] += [ms / 1000.0 for ms in run.writer_ms]
            method.cleanup()
        log(
            f"   round {round_ + 1}/{args.interference_repeat}: none {base:.2f} steps/s, "
            + ", ".join(f"{n} {slowdown[n][-1]:+.1f}% (in run {_last(in_run[n])})" for n in rates)
        )
    for method in methods:
        method.close()
    return {
        "model": f"{args.mlp_depth}x{args.mlp_width}, batch {batch}, Adam",
        "step_ms": step_s * 1e3,
        "state_bytes": state.nbytes,
        "state_tensors": state.n_tensors,
        "every": args.every,
        "steps": args.steps,
        "repeat": args.interference_repeat,
        "baseline": {"steps_per_s": summary(baseline)},
        "methods": {
            name: {
                "steps_per_s": summary(rates[name]),
                "slowdown_pct": summary(slowdown[name]),
                "in_run_slowdown_pct": summary(in_run[name]) if in_run[name] else None,
                "stall_s": summary(stalls[name]),
                "writer_s": summary(writer[name]),
            }
            for name in rates
        },
    }


# --------------------------------------------------------------------------- memory


def run_memory(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    import asyncckpt

    state = build_state(parse_size(args.memory_size), args.base_tensors, seed=1)
    root = directory / "memory"
    samples: list[tuple[int, int]] = []
    started = time.perf_counter()
    with asyncckpt.AsyncCheckpointer(root, keep_last=3) as ckpt:
        handle = ckpt.save(0, state.objects())
        handle.result()
        gc.collect()
        start_rss = system.rss_bytes()
        samples.append((0, start_rss))
        for i in range(1, args.memory_saves + 1):
            handle = ckpt.save(i, state.objects())
            if i % 10 == 0 or i == args.memory_saves:
                samples.append((i, system.rss_bytes()))
        handle.result()
        gc.collect()
        end_rss = system.rss_bytes()
        stats = ckpt.stats()
    growth = end_rss - start_rss
    return {
        "saves": args.memory_saves,
        "state_bytes": state.nbytes,
        "tensors": state.n_tensors,
        "seconds": time.perf_counter() - started,
        "rss_start_bytes": start_rss,
        "rss_end_bytes": end_rss,
        "rss_growth_bytes": growth,
        "rss_max_bytes": max(r for _, r in samples),
        "samples": [{"save": i, "rss_bytes": r} for i, r in samples],
        "staging_allocations": stats.staging_allocations,
        "staging_bytes": stats.staging_bytes,
        "committed": stats.committed,
        "flat": growth <= max(16 << 20, start_rss // 100),
    }


# --------------------------------------------------------------------------- gpu


def run_gpu(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """Each GPU figure on its own: one that fails records its traceback and the others still run."""
    from ckptbench import gpu

    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    nbytes = parse_size(args.gpu_size)
    repeat = max(3, args.repeat)
    parts = {
        "bandwidth": lambda: gpu.bandwidth(nbytes, args.base_tensors, repeat),
        "overlap": lambda: gpu.overlap(
            directory / "gpu-overlap", width=args.gpu_width, depth=args.gpu_depth, steps=5, repeat=repeat
        ),
        "restore": lambda: gpu.restore_cuda(directory / "gpu-restore", nbytes, args.base_tensors, repeat),
    }
    for name, part in parts.items():
        log(f"   {name}")
        try:
            out[name] = part()
        except Exception:
            out[name] = {"error": traceback.format_exc()}
            log(out[name]["error"])
        gc.collect()
        torch.cuda.empty_cache()
    return out


def per_tensor(config: dict[str, Any]) -> dict[str, float | None]:
    """Microseconds per tensor of one configuration: ``save()`` (the stall), the writer (from the
    checkpointer's own stats), the sync ``asyncckpt.save`` and, where loads ran, warm load."""
    n = config["tensors"]
    save = config["save"]

    def us(value: float | None) -> float | None:
        return None if value is None else value / n * 1e6

    ours = save.get("asyncckpt", {})
    writer_ms = median(ours.get("writer_total_ms")) if ours else None
    load = config.get("load", {}).get("warm", {})
    return {
        "save": us(median(ours.get("stall_s"))) if ours else None,
        "copy_floor": us(median(save["copy_floor"]["stall_s"])) if "copy_floor" in save else None,
        "writer": None if writer_ms is None else writer_ms / 1e3 / n * 1e6,
        "sync_save": us(median(save["asyncckpt_sync"]["durable_s"])) if "asyncckpt_sync" in save else None,
        "torch_save_fsync": us(median(save["torch_save"]["durable_s"])) if "torch_save" in save else None,
        "load_warm": us(median(load["asyncckpt_load"]["seconds"])) if "asyncckpt_load" in load else None,
        "read_floor_warm": us(median(load["read_floor"]["seconds"])) if "read_floor" in load else None,
        "read_crc_floor_warm": (
            us(median(load["read_crc_floor"]["seconds"])) if "read_crc_floor" in load else None
        ),
    }


def scaling_notes(result: dict[str, Any]) -> dict[str, Any]:
    """Per-tensor overhead: how much the stall and the durable time grow from fewest to most tensors."""
    base_bytes = result["config"]["base_bytes"]
    configs = sorted(
        (c for c in result["configs"] if c["bytes_requested"] == base_bytes), key=lambda c: c["tensors"]
    )
    if len(configs) < 2:
        return {}
    lo, hi = configs[0], configs[-1]
    notes: dict[str, Any] = {"from_tensors": lo["tensors"], "to_tensors": hi["tensors"], "methods": {}}
    extra = hi["tensors"] - lo["tensors"]
    for name in hi["save"]:
        if name not in lo["save"]:
            continue
        entry = {}
        for key in ("stall_s", "durable_s"):
            a, b = median(lo["save"][name][key]), median(hi["save"][name][key])
            if a is None or b is None:
                continue
            entry[f"{key}_growth"] = b / a if a else None
            entry[f"{key}_per_extra_tensor_us"] = (b - a) / extra * 1e6
        notes["methods"][name] = entry
    return notes


# --------------------------------------------------------------------------- main


def render(result: dict[str, Any]) -> str:
    """Every table of a result, as printed on stdout."""
    parts = [report.save_table(config) for config in result["configs"]]
    if any("per_tensor_us" in config for config in result["configs"]):
        parts.append(report.per_tensor_table(result["configs"]))
    if result.get("load"):
        parts.append(report.load_table(result["load"]))
    parts += [report.load_table(c["load"]) for c in result["configs"][1:] if c.get("load")]
    if result.get("interference"):
        parts.append(report.interference_table(result["interference"]))
    if result.get("memory"):
        m = result["memory"]
        parts.append(
            f"== memory: {m['saves']} saves of {format_size(m['state_bytes'])}: RSS "
            f"{m['rss_start_bytes'] / (1 << 20):.0f} -> {m['rss_end_bytes'] / (1 << 20):.0f} MiB "
            f"(max {m['rss_max_bytes'] / (1 << 20):.0f}), staging allocations {m['staging_allocations']} =="
        )
    if result.get("gpu"):
        parts.append(report.gpu_text(result["gpu"]))
    parts.append(report.targets_table(result["targets"]))
    return "\n\n".join(parts)


def write_outputs(result: dict[str, Any], out: Path, *, plot: bool, note: str | None = None) -> None:
    """NAME.md (command, machine, tables) next to NAME.json, and NAME.png with ``plot``."""
    md = out.with_suffix(".md")
    md.write_text(report.markdown(result, render(result), title=out.stem, note=note))
    print(f"wrote {md}")
    if plot and len(result["configs"]) > 1:
        png = out.with_suffix(".png")
        report.plot(result, png)
        print(f"wrote {png}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        print(render(result))
        write_outputs(result, args.from_json, plot=args.plot, note=args.note)
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    command = "python " + " ".join(
        shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    )
    with contextlib.ExitStack() as stack:
        if args.dir is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="asyncckpt-bench-")))
        else:
            args.dir.mkdir(parents=True, exist_ok=True)
            directory = Path(tempfile.mkdtemp(prefix="asyncckpt-bench-", dir=args.dir))
            if not args.keep:
                stack.callback(lambda: system.remove(directory))
        result = run(args, directory, command)
    print()
    print(render(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.out}")
        write_outputs(result, args.out, plot=args.plot)
    return 0


def run(args: argparse.Namespace, directory: Path, command: str) -> dict[str, Any]:
    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": command,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**system.machine(directory), "torch_threads": torch.get_num_threads()},
        "config": {
            "base_bytes": args.base_bytes,
            "base_tensors": args.base_tensors,
            "sizes": args.size_list,
            "tensors": args.tensor_list,
            "extra": args.extra_list,
            "repeat": args.repeat,
            "scaling_repeat": args.scaling_repeat,
            "warmup": args.warmup,
            "parts": args.parts,
            "methods": args.methods,
        },
        "configs": [],
    }
    if "save" in args.parts or "load" in args.parts:
        for index, (nbytes, n_tensors) in enumerate(configurations(args)):
            base = index == 0
            if not base and "save" not in args.parts and not args.loads_everywhere:
                break
            repeat = args.repeat if base else args.scaling_repeat
            log(f"== {format_size(nbytes)} in {n_tensors} tensors: building the state")
            state = build_state(nbytes, n_tensors)
            with_loads = "load" in args.parts and (base or args.loads_everywhere)
            names = args.methods if "save" in args.parts else _sources_for_loads(args.methods)
            saves, methods = run_saves(
                state,
                directory / f"cfg{index}",
                names,
                repeat=repeat,
                warmup=args.warmup,
                keep_files=with_loads,
            )
            config = {
                "bytes_requested": nbytes,
                "bytes": state.nbytes,
                "tensors": state.n_tensors,
                "repeat": repeat,
                "save": saves,
            }
            result["configs"].append(config)
            if with_loads:
                log("== load: cold and warm")
                config["load"] = run_loads(state, methods, repeat=repeat, warmup=args.warmup)
                if base:
                    result["load"] = config["load"]
            config["per_tensor_us"] = per_tensor(config)
            for method in methods:
                method.close()
                method.cleanup()
            del state, methods
            gc.collect()
        result["scaling"] = scaling_notes(result)
    if "interference" in args.parts:
        log(f"== training interference (a checkpoint every {args.every} steps)")
        result["interference"] = run_interference(args, directory)
    if "memory" in args.parts:
        log(f"== memory over {args.memory_saves} saves")
        result["memory"] = run_memory(args, directory)
    if "gpu" in args.parts and torch.cuda.is_available():
        log("== gpu")
        result["gpu"] = run_gpu(args, directory)
    result["targets"] = evaluate_targets(result)
    result["machine"]["loadavg_end"] = system.loadavg()
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    return result


def _sources_for_loads(names: list[str]) -> list[str]:
    sources = {cls.source for cls in LOAD_METHODS.values()}
    return [n for n in names if n in sources]


if __name__ == "__main__":
    sys.exit(main())
