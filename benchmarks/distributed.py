"""Multi-rank checkpoints: asyncckpt's AsyncCheckpointer against ``dcp.async_save`` in one run.

Every world size (``--worlds``) runs as one set of processes on this machine (gloo, CPU); in
each, for every layout (``--layouts``: ``fsdp`` = FSDP2 ``fully_shard``, every tensor sharded;
``ddp`` = ``DistributedDataParallel``, every tensor replicated) and tensor count
(``--tensors``), a fixed total state (``--size``: the model's parameters and SGD's momentum, half
each) is saved ``--rounds`` times by each method, interleaved, after ``--warmup`` untimed rounds:

- ``asyncckpt``: ``AsyncCheckpointer.save(step, {"model": m, "optimizer": o})`` (distributed
  mode; the coordination group is asyncckpt's own gloo group). stall = ``save()`` returns;
  stall+wait = and ``wait_staged()`` returns (the next optimizer step's wait, with no
  forward/backward to hide the background copy); durable = ``handle.result()`` returns (every
  shard durable and verified, the commit record durable, the outcome known on this rank).
- ``floor``: each rank ``os.write``s its share of the state's bytes (its FSDP2 shards; every
  world-th replicated tensor) from the live tensors to a new file and ``fsync``s it and its
  directory: the time to durable through the page cache with no copy, no checksum, no read-back
  and no commit. ``floor_direct``: the same bytes, laid out once (untimed) in page-aligned
  memory, written with ``O_DIRECT`` in 8 MiB pieces and fsynced: the disk's own limit, which
  asyncckpt's direct writes approach. The faster of the two is the floor the ratios use.
- ``dcp_async``: ``get_model_state_dict`` + ``get_optimizer_state_dict`` +
  ``dcp.async_save(..., storage_writer=FileSystemWriter(sync_files=True))`` on a gloo group of
  its own; stall = ``async_save`` returns; durable = its future completes.

Per round the figure is the slowest rank's; the tables give medians over rounds. commit = the
coordinator's last step (asyncckpt: check every shard's header against its digest, write and
verify the commit record; DCP: ``FileSystemWriter.finish``, writing ``.metadata``). restore =
``ckpt.restore(...)`` (agreement, verification of every blob read, DCP load, apply) against
``dcp.load`` + ``set_*_state_dict`` of the same state. The coordination figures (one step
agreement, i.e. an all-gather on asyncckpt's gloo group; one shard header check) feed the
scaling estimate in docs/MULTI_GPU.md.

    python benchmarks/distributed.py --size 256M --worlds 1,2,4 --tensors 1000,10000 \\
        --out benchmarks/results/dist-cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import pickle
import shutil
import socket
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ckptbench.direct import aligned_copy, write_direct  # noqa: E402
from ckptbench.state import parse_size  # noqa: E402

METHODS = ("floor", "floor_direct", "asyncckpt", "dcp_async")


# --------------------------------------------------------------------------- in each rank


def build(layout: str, tensors: int, size: int, world: int) -> tuple[Any, Any, Any]:
    """A model of ``tensors // 2`` fp32 parameters (``size // 2`` bytes) and SGD with momentum
    (one buffer per parameter): ``tensors`` tensors, ``size`` bytes of state in total."""
    import torch
    from torch.distributed.fsdp import fully_shard

    count = max(tensors // 2, 1)
    numel = max(size // 2 // 4 // count, 1)
    rows = max(world * 4, 8)
    torch.manual_seed(0)

    class Params(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            shape = (rows, max(numel // rows, 1))
            self.weights = torch.nn.ParameterList(
                torch.nn.Parameter(torch.randn(shape)) for _ in range(count)
            )

    model: Any = Params()
    if layout == "fsdp":
        fully_shard(model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()  # the momentum buffers exist
    optimizer.zero_grad()
    nbytes = sum(t.numel() * 4 for t in (model.state_dict().values()))
    return model, optimizer, nbytes * 2


def measure(rank: int, world: int, layout: str, tensors: int, options: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this rank: both methods, interleaved; this rank's figures."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    import asyncckpt

    model, optimizer, state_bytes = build(layout, tensors, options["size"], world)
    dcp_group = dist.new_group(backend="gloo")
    root = Path(options["dir"]) / f"{layout}-{tensors}-w{world}"
    figures: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    class TimedWriter(dcp.FileSystemWriter):
        def finish(self, *args: Any, **kwargs: Any) -> None:
            started = time.perf_counter()
            super().finish(*args, **kwargs)
            note("dcp_async.commit", time.perf_counter() - started)

    state = {"model": model, "optimizer": optimizer}
    share = floor_share(model, optimizer, rank, world)
    aligned = aligned_copy(memoryview(t.detach().contiguous().numpy()).cast("B") for t in share)
    group_option = {"process_group": dist.group.WORLD} if world == 1 else {}
    dcp_paths = []
    with asyncckpt.AsyncCheckpointer(
        root / "asyncckpt", keep_last=1, coordination_timeout=900, **group_option
    ) as ckpt:
        for round_ in range(options["warmup"] + options["rounds"]):
            timed = round_ >= options["warmup"]
            dist.barrier()
            started = time.perf_counter()
            floor_write(floor_share(model, optimizer, rank, world), root / "floor" / f"rank-{rank}.bin")
            if timed:
                note("floor.durable", time.perf_counter() - started)
            dist.barrier()
            started = time.perf_counter()
            floor_write_direct(aligned, root / "floor" / f"direct-{rank}.bin")
            if timed:
                note("floor_direct.durable", time.perf_counter() - started)
            dist.barrier()
            started = time.perf_counter()
            handle = ckpt.save(round_ + 1, state)
            stalled = time.perf_counter()
            ckpt.wait_staged()
            waited = time.perf_counter()
            handle.result()
            durable = time.perf_counter()
            if timed:
                note("asyncckpt.stall", stalled - started)
                note("asyncckpt.stall_wait", waited - started)
                note("asyncckpt.durable", durable - started)
            dist.barrier()
            path = root / "dcp" / f"step-{round_ + 1}"
            started = time.perf_counter()
            sd = {
                "model": get_model_state_dict(model),
                "optimizer": get_optimizer_state_dict(model, optimizer),
            }
            future = dcp.async_save(
                sd, storage_writer=TimedWriter(str(path), sync_files=True), process_group=dcp_group
            )
            stalled = time.perf_counter()
            future.result()
            durable = time.perf_counter()
            if timed:
                note("dcp_async.stall", stalled - started)
                note("dcp_async.durable", durable - started)
            else:
                figures.pop("dcp_async.commit", None)
            dcp_paths.append(path)
            dist.barrier()
            if rank == 0 and len(dcp_paths) > 1:
                shutil.rmtree(dcp_paths[-2], ignore_errors=True)
        for _ in range(options["rounds"]):
            dist.barrier()
            started = time.perf_counter()
            ckpt.restore(state)
            note("asyncckpt.restore", time.perf_counter() - started)
            dist.barrier()
            started = time.perf_counter()
            sd = {
                "model": get_model_state_dict(model),
                "optimizer": get_optimizer_state_dict(model, optimizer),
            }
            dcp.load(sd, checkpoint_id=str(dcp_paths[-1]), process_group=dcp_group)
            set_model_state_dict(model, sd["model"])
            set_optimizer_state_dict(model, optimizer, sd["optimizer"])
            note("dcp_async.restore", time.perf_counter() - started)
        coordination(ckpt, root / "asyncckpt", options["rounds"] + options["warmup"], note)
    figures.update(commit_figures(root / "asyncckpt"))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    del model, optimizer, state
    gc.collect()
    return {"state_bytes": state_bytes, "figures": figures}


def floor_share(model: Any, optimizer: Any, rank: int, world: int) -> list[Any]:
    """This rank's share of the state's tensors: its local shards (FSDP2), or every world-th
    tensor (replicated), as asyncckpt and DCP both write each replicated tensor once."""
    from torch.distributed.tensor import DTensor

    tensors = [*model.parameters()]
    tensors += [state["momentum_buffer"] for state in optimizer.state.values()]
    if any(isinstance(t, DTensor) for t in tensors):
        return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return tensors[rank::world]


def floor_write(tensors: list[Any], path: Path) -> None:
    """Write the tensors' bytes to a new ``path``, fsync it and its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for tensor in tensors:
            view = memoryview(tensor.detach().contiguous().numpy()).cast("B")
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def floor_write_direct(area: memoryview, path: Path) -> None:
    """Write ``area`` to a new ``path`` around the page cache, fsync it and its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    write_direct(area, path)
    fsync_directory(path.parent)


def coordination(ckpt: Any, root: Path, step: int, note: Any) -> None:
    """The scaling estimate's inputs: one step agreement (an all-gather on asyncckpt's gloo
    group), and on rank 0 one shard header check and the commit record's size."""
    from asyncckpt import catalog
    from asyncckpt.dist.shards import header_digest
    from asyncckpt.storage import PosixStorage

    group = ckpt._mode.multirank.group()  # the distributed mode's coordination group
    for _ in range(20):
        started = time.perf_counter()
        group.agree("save", step)
        note("agree", time.perf_counter() - started)
    if group.rank != 0:
        return
    storage = PosixStorage(root)
    for rank in range(group.world_size):
        name = catalog.shard_name(step, rank)
        started = time.perf_counter()
        with storage.open(name) as handle:
            header_digest(handle, storage.where(name), rank)
        note("header_check", time.perf_counter() - started)
    note("record_bytes", float((root / catalog.commit_record_name(step)).stat().st_size))


def commit_figures(root: Path) -> dict[str, list[float]]:
    """asyncckpt's commit times (the coordinator's ``commit_ms`` events, timed rounds only)."""
    found = []
    events = root / "events.jsonl"
    if events.exists():
        for line in events.read_text().splitlines():
            event = json.loads(line)
            if event.get("event") == "checkpoint.save.committed" and event.get("commit_ms") is not None:
                found.append(event["commit_ms"] / 1000.0)
    return {"asyncckpt.commit": found}


def rank_main(rank: int, world: int, port: int, options: dict[str, Any], out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(options["threads"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for layout in options["layouts"]:
        for tensors in options["tensors"]:
            if layout == "ddp" and world == 1:
                continue  # DDP at one rank is the FSDP case without sharding: nothing new
            results.append(
                {"layout": layout, "tensors": tensors, **measure(rank, world, layout, tensors, options)}
            )
    with open(out, "wb") as file:
        pickle.dump(results, file)
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- the driver


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn_ranks(target: Any, world: int, args: tuple[Any, ...]) -> list[Any]:
    """Run ``target(rank, *args, out)`` in ``world`` spawned processes and return, by rank, what
    each pickled to its ``out`` path; a rank that fails raises :class:`RuntimeError`."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="asyncckpt-distbench-") as out:
        paths = [f"{out}/rank-{rank}.pickle" for rank in range(world)]
        procs = [context.Process(target=target, args=(rank, *args, paths[rank])) for rank in range(world)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(proc.exitcode != 0 for proc in procs):
            raise RuntimeError(f"world {world}: exit codes {[p.exitcode for p in procs]}")
        results = []
        for path in paths:
            with open(path, "rb") as file:
                results.append(pickle.load(file))  # the ranks' own figures, written just now
        return results


def run_world(world: int, options: dict[str, Any]) -> list[list[dict[str, Any]]]:
    return spawn_ranks(rank_main, world, (world, free_port(), options))


def slowest(per_rank: list[dict[str, list[float]]], name: str) -> list[float]:
    """Per round, the slowest rank's value."""
    runs = [figures.get(name, []) for figures in per_rank]
    runs = [r for r in runs if r]
    if not runs:
        return []
    return [max(values) for values in zip(*runs, strict=False)]


def aggregate(world: int, ranks: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for config in zip(*ranks, strict=True):
        per_rank = [c["figures"] for c in config]
        row: dict[str, Any] = {"world": world, "layout": config[0]["layout"], "tensors": config[0]["tensors"]}
        row["state_bytes"] = config[0]["state_bytes"]
        for method in METHODS:
            for figure in ("stall", "stall_wait", "durable", "commit", "restore"):
                values = slowest(per_rank, f"{method}.{figure}")
                if values:
                    row[f"{method}.{figure}"] = {"median": statistics.median(values), "runs": values}
        for figure in ("agree", "header_check", "record_bytes"):
            values = [v for figures in per_rank for v in figures.get(figure, [])]
            if values:
                row[figure] = statistics.median(values)
        rows.append(row)
    return rows


def _median(row: dict[str, Any], name: str) -> float:
    return float(row.get(name, {}).get("median") or float("nan"))


def _pair(row: dict[str, Any], ours: str, theirs: str, scale: float = 1.0, digits: int = 3) -> str:
    a, b = _median(row, ours) * scale, _median(row, theirs) * scale
    return f"{a:.{digits}f} / {b:.{digits}f} ({a / b:.2f}x)"


def _floor(row: dict[str, Any]) -> str:
    cached, direct = _median(row, "floor.durable"), _median(row, "floor_direct.durable")
    floor = min(cached, direct) if direct == direct else cached  # NaN: an older result file
    ours, theirs = _median(row, "asyncckpt.durable"), _median(row, "dcp_async.durable")
    return f"{cached:.3f} / {direct:.3f} ({ours / floor:.2f}x, {theirs / floor:.2f}x)"


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: asyncckpt / DCP, and their ratio, per configuration."""
    head = [
        "world",
        "layout",
        "tensors",
        "state",
        "stall s",
        "stall+wait s",
        "durable s",
        "floor s: page cache / direct (ours, DCP / faster)",
        "GB/s",
        "commit ms",
        "restore s (vs dcp.load)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gb = r["state_bytes"] / 1e9
        speeds = f"{gb / _median(r, 'asyncckpt.durable'):.2f} / {gb / _median(r, 'dcp_async.durable'):.2f}"
        cells = [
            str(r["world"]),
            r["layout"],
            str(r["tensors"]),
            f"{r['state_bytes'] / (1 << 20):.0f} MiB",
            _pair(r, "asyncckpt.stall", "dcp_async.stall"),
            f"{_median(r, 'asyncckpt.stall_wait'):.3f}",
            _pair(r, "asyncckpt.durable", "dcp_async.durable"),
            _floor(r),
            speeds,
            _pair(r, "asyncckpt.commit", "dcp_async.commit", 1e3, 1),
            _pair(r, "asyncckpt.restore", "dcp_async.restore"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def coordination_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| world | layout | tensors | agree (all-gather) ms | shard header read+decode ms "
        "| commit record bytes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        agree, check = r.get("agree", float("nan")) * 1e3, r.get("header_check", float("nan")) * 1e3
        lines.append(
            f"| {r['world']} | {r['layout']} | {r['tensors']} | {agree:.3f} | {check:.3f} | "
            f"{r.get('record_bytes', 0):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="1G", help="total state bytes per configuration (1G, 256M, ...)")
    parser.add_argument("--worlds", default="1,2,4", help="world sizes, comma-separated")
    parser.add_argument("--tensors", default="1000,10000", help="tensor counts, comma-separated")
    parser.add_argument("--layouts", default="fsdp,ddp", help="fsdp (FSDP2-sharded), ddp (DDP-replicated)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir, removed)")
    parser.add_argument("--out", default=None, help="JSON results; NAME.md beside it gets the tables")
    parser.add_argument("--note", default="", help="a note for the report")
    args = parser.parse_args()

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="asyncckpt-distbench-"))
    options = {
        "size": parse_size(args.size),
        "tensors": [int(t) for t in args.tensors.split(",")],
        "layouts": args.layouts.split(","),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "threads": args.threads,
        "dir": str(base),
    }
    from ckptbench import system

    started = datetime.now(UTC)
    machine = system.machine(base)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for world in [int(w) for w in args.worlds.split(",")]:
        rows += aggregate(world, run_world(world, options))
        print(table(rows[-len(options["layouts"]) * len(options["tensors"]) :]), flush=True)
    took = time.perf_counter() - t0
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    command = "python benchmarks/distributed.py " + " ".join(sys.argv[1:])
    report = [
        f"# {Path(args.out).stem if args.out else 'distributed'}",
        "",
        f"- command: `{command}`",
        f"- started: {started.isoformat(timespec='seconds')} UTC, took {took:.1f} s",
        f"- machine: {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['mem_total_gib']} GiB RAM, "
        f"{machine['platform']}; every rank a process on this machine, gloo over loopback",
        f"- directory: {machine['directory']} ({machine['filesystem']})",
        f"- python {machine['python']}, torch {machine['torch']}, asyncckpt {machine.get('asyncckpt')} "
        f"at commit {machine.get('git_commit')}",
        f"- load average at start: {machine['loadavg_start']}"
        + (f"; note: {args.note}" if args.note else ""),
        "",
        "Medians over rounds of the slowest rank (see benchmarks/distributed.py for the definitions).",
        "",
        "Each cell: asyncckpt / dcp.async_save (ratio); GB/s = state bytes / durable.",
        "",
        table(rows),
        "",
        "Coordination (inputs of the scaling estimate in docs/MULTI_GPU.md):",
        "",
        coordination_table(rows),
    ]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.write_text(
            json.dumps({"command": command, "machine": machine, "options": options, "rows": rows}, indent=1)
        )
        out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
