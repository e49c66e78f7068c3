"""What the ranks of the multi-rank tests run (imported by the forkserver, so by name)."""

from __future__ import annotations

import errno
import os
import pickle
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

import asyncckpt
from asyncckpt import dist as adist
from asyncckpt.storage import FileOps, PosixStorage
from asyncckpt.testing import FaultyOps

TIMEOUT_S = 10.0
WIDTH = 8


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.ReLU(), torch.nn.Linear(2 * WIDTH, WIDTH)
    )


def fsdp_mlp(seed: int) -> torch.nn.Module:
    """The MLP sharded with FSDP2 over the default group (CPU, gloo)."""
    model = mlp(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """One step on data drawn from the global RNG (so resuming needs the RNG state)."""
    x = torch.randn(4, WIDTH)
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The whole model and optimizer state on rank 0 (None elsewhere); collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {
        "model": get_model_state_dict(model, options=options),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
    }
    return state if dist.get_rank() == 0 else None


def fsdp_trained(seed: int, steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = fsdp_mlp(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        train(model, optimizer, step)
    return model, optimizer


# --------------------------------------------------------------------------- workers


def save_fsdp(rank: int, world: int, root: str, steps: list[int], train_to: int = 0) -> dict[str, Any]:
    """Train an FSDP2 MLP + Adam up to ``train_to`` (default: the last of ``steps``), saving after
    each step of ``steps``. The full state at the end (rank 0) and the RNG state last saved."""
    group = adist.CoordinationGroup(timeout=TIMEOUT_S)
    torch.manual_seed(100 + rank)
    model = fsdp_mlp(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    saved_rng = None
    for step in range(1, max(*steps, train_to) + 1):
        train(model, optimizer, step)
        if step in steps:
            saved_rng = asyncckpt.rng_state()
            state = {"model": model, "optimizer": optimizer, "rng": saved_rng, "rank": rank}
            adist.save_step(root, step, state, group=group)
    return {"full": full_state(model, optimizer), "rng": saved_rng}


def restore_fsdp(rank: int, world: int, root: str) -> dict[str, Any]:
    """Restore into a fresh FSDP2 MLP + Adam; the step, the per-rank state and the full state."""
    group = adist.CoordinationGroup(timeout=TIMEOUT_S)
    model = fsdp_mlp(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    restored = adist.restore_latest(root, {"model": model, "optimizer": optimizer}, group=group)
    assert restored is not None
    return {
        "step": restored.step,
        "per_rank_restored": restored.per_rank_restored,
        "rng": restored.state.get("rng"),
        "rank": restored.state.get("rank"),
        "diagnostics": [(d.path, d.kind, d.reason) for d in restored.diagnostics],
        "full": full_state(model, optimizer),
    }


def resume_and_train(rank: int, world: int, root: str, steps: int) -> dict[str, Any] | None:
    """Restore, put the RNG back, train up to ``steps``; the full state at the end."""
    group = adist.CoordinationGroup(timeout=TIMEOUT_S)
    model = fsdp_mlp(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    restored = adist.restore_latest(root, {"model": model, "optimizer": optimizer}, group=group)
    assert restored is not None and restored.per_rank_restored
    asyncckpt.set_rng_state(restored.state["rng"])
    for step in range(restored.step + 1, steps + 1):
        train(model, optimizer, step)
    return full_state(model, optimizer)


def save_then_fail(rank: int, world: int, root: str, faulty_rank: int) -> dict[str, Any]:
    """Save step 1; then step 2 with ``faulty_rank``'s fsync failing (EIO); then restore."""
    group = adist.CoordinationGroup(timeout=TIMEOUT_S)
    model, optimizer = fsdp_trained(1, 1)
    state = {"model": model, "optimizer": optimizer}
    adist.save_step(root, 1, state, group=group)
    train(model, optimizer, 2)
    ops: FileOps = FaultyOps("fsync", err=errno.EIO) if rank == faulty_rank else FileOps()
    error = None
    try:
        adist.save_step(PosixStorage(root, ops=ops), 2, state, group=group)
    except asyncckpt.CheckpointWriteError as exc:
        error = {"rank": exc.rank, "step": exc.step, "message": str(exc)}
    restored = adist.restore_latest(root, {"model": model, "optimizer": optimizer}, group=group)
    return {"error": error, "restored": restored.step if restored else None}


class KillAfterShard(FileOps):
    """SIGKILL this process once its shard file is committed (renamed, directory fsynced)."""

    def __init__(self) -> None:
        self.renamed = False

    def rename(self, src: Path, dst: Path) -> None:
        super().rename(src, dst)
        self.renamed = self.renamed or dst.name.startswith("rank-")

    def fsync_dir(self, directory: Path) -> None:
        super().fsync_dir(directory)
        if self.renamed:
            os.kill(os.getpid(), signal.SIGKILL)


def save_and_die(rank: int, world: int, root: str, victim: int) -> str:
    """Save step 1; at step 2 ``victim`` dies (kill -9) right after its shard is durable."""
    group = adist.CoordinationGroup(timeout=TIMEOUT_S)
    model, optimizer = fsdp_trained(1, 1)
    adist.save_step(root, 1, {"model": model, "optimizer": optimizer}, group=group)
    storage = PosixStorage(root, ops=KillAfterShard() if rank == victim else FileOps())
    adist.save_step(storage, 2, {"model": model, "optimizer": optimizer}, group=group)
    return "saved"


def mismatched_steps(rank: int, world: int, root: str) -> str:
    group = adist.CoordinationGroup(timeout=TIMEOUT_S)
    model, optimizer = fsdp_trained(1, 1)
    adist.save_step(root, 10 + rank, {"model": model, "optimizer": optimizer}, group=group)
    return "saved"


def one_rank_absent(rank: int, world: int, root: str, call: str = "save") -> str:
    """Rank 0 saves (or restores: ``call``); the others wait on the trainer's group until rank 0
    has given up."""
    group = adist.CoordinationGroup(timeout=2.0)
    model = torch.nn.Linear(4, 4)
    try:
        if rank == 0 and call == "save":
            adist.save_step(root, 1, {"model": model}, group=group)
        elif rank == 0:
            adist.restore_latest(root, {"model": model}, group=group)
    finally:
        dist.barrier()  # the trainer's own group: never blocked by asyncckpt's
    return "saved"


def save_replicated(rank: int, world: int, root: str) -> dict[str, int]:
    """A DDP-style replicated model (same parameters on every rank), saved once."""
    group = adist.CoordinationGroup(timeout=TIMEOUT_S)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    )
    adist.save_step(root, 1, {"model": model, "rng": asyncckpt.rng_state()}, group=group)
    return {"param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def dcp_round_trip(rank: int, world: int, root: str, ours: bool) -> bool:
    """``dcp.save`` / ``dcp.load`` with AsyncckptWriter / AsyncckptReader, on the default group;
    with asyncckpt's planners (``ours``) or DCP's default ones."""
    import torch.distributed.checkpoint as dcp

    model, optimizer = fsdp_trained(1, 2)
    saved = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    expected = full_state(model, optimizer)
    planners = (adist.SavePlanner(), adist.LoadPlanner()) if ours else (None, None)
    dcp.save(saved, storage_writer=adist.AsyncckptWriter(root, step=7), planner=planners[0])
    model2 = fsdp_mlp(3)
    optimizer2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    target = {
        "model": get_model_state_dict(model2),
        "optimizer": get_optimizer_state_dict(model2, optimizer2),
    }
    dcp.load(target, storage_reader=adist.AsyncckptReader(root, step=7), planner=planners[1])
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model2, target["model"])
    set_optimizer_state_dict(model2, optimizer2, target["optimizer"])
    got = full_state(model2, optimizer2)
    if rank != 0:
        return True
    return asyncckpt.testing.states_equal(expected, got)


class KillAfterOps(FileOps):
    """SIGKILL this process at its ``n``-th file operation (any kind)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def _tick(self) -> None:
        self.left -= 1
        if self.left <= 0:
            os.kill(os.getpid(), signal.SIGKILL)

    def open_exclusive(self, path: Path) -> int:
        self._tick()
        return super().open_exclusive(path)

    def write(self, fd: int, data: memoryview | bytes) -> int:
        self._tick()
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._tick()
        super().fsync(fd)

    def rename(self, src: Path, dst: Path) -> None:
        self._tick()
        super().rename(src, dst)

    def fsync_dir(self, directory: Path) -> None:
        self._tick()
        super().fsync_dir(directory)


def save_loop_and_die(rank: int, world: int, root: str, victim: int, ops: int, first: int) -> str:
    """Save steps ``first`` .. ``first + 3``; ``victim`` dies at its ``ops``-th file operation."""
    group = adist.CoordinationGroup(timeout=TIMEOUT_S)
    model, optimizer = fsdp_trained(1, 1)
    storage = PosixStorage(root, ops=KillAfterOps(ops) if rank == victim else FileOps())
    for step in range(first, first + 4):
        train(model, optimizer, step)
        adist.save_step(
            storage, step, {"model": model, "optimizer": optimizer, "rng": asyncckpt.rng_state()}, group=group
        )
    return "saved"


def collective_payloads(rank: int, world: int, root: str) -> list[str]:
    """Save two steps of an FSDP2 MLP + Adam and restore; the type of every object pickled
    through a collective meanwhile (``list[X]*N`` for a list of N X, ``Metadata#N`` for DCP's
    metadata of N entries), in order."""
    import torch.distributed.distributed_c10d as c10d

    seen: list[str] = []
    real = c10d._object_to_tensor

    def spy(obj: Any, *args: Any, **kwargs: Any) -> Any:
        inner = f"[{type(obj[0]).__name__}]*{len(obj)}" if isinstance(obj, list) and obj else ""
        if hasattr(obj, "state_dict_metadata"):  # DCP's Metadata: how many entries travel
            sent = pickle.loads(pickle.dumps(obj))  # what the other ranks get (our own object)
            inner = f"#{len(sent.state_dict_metadata)}"
        seen.append(type(obj).__name__ + inner)
        return real(obj, *args, **kwargs)

    group = adist.CoordinationGroup(timeout=TIMEOUT_S)
    model, optimizer = fsdp_trained(1, 1)
    c10d._object_to_tensor = spy  # type: ignore[attr-defined]
    try:
        for step in (1, 2):
            adist.save_step(root, step, {"model": model, "optimizer": optimizer}, group=group)
        adist.restore_latest(root, {"model": model, "optimizer": optimizer}, group=group)
    finally:
        c10d._object_to_tensor = real  # type: ignore[attr-defined]
    return seen


def lookup_without_to_local(rank: int, world: int) -> dict[str, int]:
    """asyncckpt's SavePlanner resolves every DTensor item of an FSDP2 state: how many items, how
    many resolved to the DTensor's own local tensor (equal bytes), how many ``to_local()`` calls."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    model = fsdp_mlp(1)
    state = {"model": get_model_state_dict(model)}
    planner = adist.SavePlanner()
    planner.set_up_planner(state, is_coordinator=rank == 0)
    plan = planner.create_local_plan()
    calls = 0
    real = DTensor.to_local

    def counting(self: DTensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return real(self, *args, **kwargs)

    DTensor.to_local = counting  # type: ignore[method-assign]
    try:
        resolved = [(item, planner.resolve_data(item)) for item in plan.items]
    finally:
        DTensor.to_local = real  # type: ignore[method-assign]
    own = 0
    for item, tensor in resolved:
        dtensor = planner.state_dict[item.index.fqn]
        own += tensor is dtensor._local_tensor and torch.equal(tensor, dtensor.to_local())
    return {"items": len(resolved), "own": own, "to_local": calls}


def restore_failing_on(rank: int, world: int, root: str, victim: int) -> str:
    """Restore after a save; rank ``victim``'s read fails after the vote. What this rank raised."""
    save_fsdp(rank, world, root, [1])
    group = adist.CoordinationGroup(timeout=TIMEOUT_S)
    model = fsdp_mlp(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if rank == victim:

        def broken(self: Any, plan: Any, planner: Any) -> Any:
            raise OSError(errno.EIO, "injected read failure")

        adist.AsyncckptReader.read_data = broken  # type: ignore[method-assign]
    try:
        adist.restore_latest(root, {"model": model, "optimizer": optimizer}, group=group)
    except asyncckpt.CheckpointError as exc:
        return f"{type(exc).__name__}|{exc.rank}|{exc.reason}"
    return "restored"


def wider_mlp() -> torch.nn.Module:
    """The MLP's keys, every tensor of another shape, sharded with FSDP2 as a whole."""
    model = torch.nn.Sequential(
        torch.nn.Linear(WIDTH, 3 * WIDTH), torch.nn.ReLU(), torch.nn.Linear(3 * WIDTH, 2 * WIDTH)
    )
    fully_shard(model)
    return model


def write_items_kept(rank: int, world: int, root: str) -> dict[str, Any]:
    """Three saves through one WriteItems: the same FSDP2 MLP twice, then one of other shapes
    under the same keys; the kept items' hits and misses of each, and whether the last restores."""
    from asyncckpt.dist.items import WriteItems
    from asyncckpt.dist.save import Prepared, write_step
    from asyncckpt.dist.state import split_state

    group = adist.CoordinationGroup(timeout=TIMEOUT_S)
    kept = WriteItems()
    counts = []

    def save(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        def prepare() -> Prepared:
            split = split_state({"model": model, "optimizer": optimizer})
            return Prepared(split.sharded, split.per_rank)

        write_step(root, step, prepare, group=group, plan_caching=True, write_items=kept)
        counts.append((kept.hits, kept.misses))

    model, optimizer = fsdp_trained(1, 1)
    save(1, model, optimizer)
    train(model, optimizer, 2)
    save(2, model, optimizer)
    torch.manual_seed(3)
    wider = wider_mlp()
    wider_optimizer = torch.optim.Adam(wider.parameters(), lr=1e-2)
    train(wider, wider_optimizer, 1)
    save(3, wider, wider_optimizer)
    saved = full_state(wider, wider_optimizer)
    torch.manual_seed(4)
    fresh = wider_mlp()
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    train(fresh, fresh_optimizer, 1)
    restored = adist.restore_latest(root, {"model": fresh, "optimizer": fresh_optimizer}, group=group)
    assert restored is not None and restored.step == 3
    return {"counts": counts, "saved": saved, "restored": full_state(fresh, fresh_optimizer)}


def save_step_twice(rank: int, world: int, root: str) -> list[str]:
    """Save step 1, train, save step 1 again; the names in the step's folder afterwards."""
    group = adist.CoordinationGroup(timeout=TIMEOUT_S)
    model = fsdp_mlp(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        train(model, optimizer, 1)
        adist.save_step(root, 1, {"model": model, "optimizer": optimizer}, group=group)
    dist.barrier()  # every rank has dropped what its commits replaced
    return sorted(name for folder in Path(root).iterdir() if folder.is_dir() for name in os.listdir(folder))
