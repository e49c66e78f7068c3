"""More of what the ranks of the multi-rank tests run (imported by the forkserver): calls that
do not match, failures seen at the next save() and at exit, the trainer's collectives beside the
writer's, the step hook over DTensor shards, subgroups, per-rank objects, replicated placements,
each rank's own view of a run, and DCP's async_save through asyncckpt's writer."""

from __future__ import annotations

import os
import time
from typing import Any

import ckpt_workers as cw
import dist_workers as w
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import asyncckpt
import asyncckpt.testing
from asyncckpt import dist as adist
from asyncckpt.saving.staging import StagedCopy
from asyncckpt.testing import FaultyOps

# --------------------------------------------------------------------------- blocking save_step


def restore_against_save_step(rank: int, world: int, root: str) -> str:
    """Rank 0 restores while the others save step 1 (not the same collective call)."""
    group = adist.CoordinationGroup(timeout=w.TIMEOUT_S)
    model, optimizer = w.fsdp_trained(1, 1)
    state = {"model": model, "optimizer": optimizer}
    if rank == 0:
        adist.restore_latest(root, state, group=group)
        return "restored"
    adist.save_step(root, 1, state, group=group)
    return "saved"


def save_replicate_placed(rank: int, world: int, root: str) -> dict[str, int]:
    """A module whose parameters are DTensors placed ``Replicate()`` on a 1-D mesh (tensor
    parallelism's replicated parameters), saved through the checkpointer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)  # the same values on every rank, as a replicated placement holds
    module = torch.nn.Module()
    for name in ("a", "b"):
        whole = torch.randn(256, 256)
        module.register_parameter(name, torch.nn.Parameter(distribute_tensor(whole, mesh, [Replicate()])))
    options = {"process_group": dist.group.WORLD} if world == 1 else {}
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=w.TIMEOUT_S, **options) as ckpt:
        ckpt.save(1, {"model": module, "rng": asyncckpt.rng_state()})
    return {"param_bytes": sum(p.numel() * p.element_size() for p in module.parameters())}


def restore_each_from(rank: int, world: int, roots: list[str]) -> dict[str, Any]:
    """``restore_fsdp`` with each rank reading its own copy of the run (``roots[rank]``), as
    ranks on several nodes see their node's view of a shared directory."""
    return w.restore_fsdp(rank, world, roots[rank])


def dcp_async_round_trip(rank: int, world: int, root: str) -> bool:
    """``dcp.async_save`` with AsyncckptWriter (its future awaited), then ``dcp.load`` with
    AsyncckptReader into a fresh FSDP2 MLP + Adam: whether it holds the state saved (rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model, optimizer = w.fsdp_trained(1, 2)
    saved = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    expected = w.full_state(model, optimizer)
    future = dcp.async_save(saved, storage_writer=adist.AsyncckptWriter(root, step=8))
    future.result(timeout=4 * w.TIMEOUT_S)
    model2 = w.fsdp_mlp(3)
    optimizer2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    target = {
        "model": get_model_state_dict(model2),
        "optimizer": get_optimizer_state_dict(model2, optimizer2),
    }
    dcp.load(target, storage_reader=adist.AsyncckptReader(root))
    set_model_state_dict(model2, target["model"])
    set_optimizer_state_dict(model2, optimizer2, target["optimizer"])
    got = w.full_state(model2, optimizer2)
    return rank != 0 or asyncckpt.testing.states_equal(expected, got)


# --------------------------------------------------------------------------- AsyncCheckpointer


def restore_against_background_save(rank: int, world: int, root: str) -> dict[str, Any]:
    """Rank 0 restores while rank 1 saves step 1 in the background: what each one raised."""
    model, optimizer = w.fsdp_trained(1, 1)
    error = None
    started = time.monotonic()
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=cw.TIMEOUT_S) as ckpt:
        try:
            if rank == 0:
                ckpt.restore({"model": model, "optimizer": optimizer})
            else:
                ckpt.save(1, cw.state_of(model, optimizer))
                ckpt.flush()
        except asyncckpt.CheckpointError as exc:
            error = cw.outcome(exc)
    return {"error": error, "seconds": time.monotonic() - started}


def storage_fault_seen_at(rank: int, world: int, root: str, faulty_rank: int, where: str) -> dict[str, Any]:
    """Save step 1; step 2 with ``faulty_rank``'s writes failing (cw.ENOSPC), no flush: the error
    seen ``where`` (``"save"``: the next save(), once step 2's handle is done; ``"exit"``: the
    context exit), and where it was raised."""
    ops = FaultyOps("write", err=cw.ENOSPC)
    ops.enabled = False
    model, optimizer = w.fsdp_trained(1, 1)
    raised_at, error = None, None
    try:
        with asyncckpt.AsyncCheckpointer(root, ops=ops, coordination_timeout=cw.TIMEOUT_S) as ckpt:
            ckpt.save(1, cw.state_of(model, optimizer))
            ckpt.flush()
            ops.enabled = rank == faulty_rank
            handle = ckpt.save(2, cw.state_of(model, optimizer))
            if where == "save":
                assert handle.wait(4 * cw.TIMEOUT_S)  # done (failed) on this rank: the box holds it
                raised_at = "save"
                ckpt.save(3, cw.state_of(model, optimizer))
                raised_at = None
            raised_at = "exit"
    except asyncckpt.CheckpointWriteError as exc:
        error = cw.outcome(exc)
    return {"error": error, "raised_at": raised_at if error is not None else None}


def trainer_collectives_during_saves(rank: int, world: int, root: str) -> dict[str, Any]:
    """Background saves while the trainer runs its own all-reduces on the default group: which
    group asyncckpt coordinates on, and every all-reduce's result (each must be exact)."""
    from asyncckpt.modes import Distributed

    model, optimizer = w.fsdp_trained(1, 1)
    wrong = 0
    options: dict[str, Any] = {"max_pending": 2, "keep_last": 10, "coordination_timeout": cw.TIMEOUT_S}
    with asyncckpt.AsyncCheckpointer(root, **options) as ckpt:
        mode = ckpt._mode
        assert isinstance(mode, Distributed)
        group = mode.multirank.group().group  # the seam: asyncckpt's own process group
        own = group is not None and group is not dist.group.WORLD
        backend = dist.get_backend(group) if group is not None else None
        for step in range(1, 6):
            w.train(model, optimizer, step)  # FSDP2's own collectives on the default group
            ckpt.save(step, cw.state_of(model, optimizer))
            for i in range(40):  # while the writer runs its gathers in the background
                value = torch.full((64,), float(step * 1000 + i * world + rank))
                dist.all_reduce(value)
                expected = world * (step * 1000 + i * world) + world * (world - 1) / 2
                wrong += int(not torch.equal(value, torch.full((64,), expected)))
        ckpt.flush()
    return {
        "own": own,
        "backend": backend,
        "wrong": wrong,
        "committed": [c.step for c in asyncckpt.list_checkpoints(root)],
    }


def step_waits_for_the_copy(rank: int, world: int, root: str) -> dict[str, Any]:
    """save() of an FSDP2 MLP + Adam returns before its DTensor local shards are copied; the
    next training step (forward, backward, optimizer step) runs at once. Only the optimizer
    step's wait (the step hook) lets the copy run, so the step must find it done."""
    model, optimizer = w.fsdp_trained(1, 1)
    copier = cw.GatedCopier()
    guard = StagedCopy.guard

    def open_then_guard(staged: StagedCopy) -> None:
        copier.gate.set()
        guard(staged)

    StagedCopy.guard = open_then_guard  # type: ignore[method-assign]  # this process only
    expected = w.full_state(model, optimizer)
    seen: list[bool] = []
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=cw.TIMEOUT_S) as ckpt:
        ckpt._stager.copier = copier  # the seam: the test decides when background copies run
        handle = ckpt.save(1, cw.state_of(model, optimizer))
        staged = copier.staged[-1]
        deferred, done_at_return = len(staged.deferred), staged.background_done()
        hook = optimizer.register_step_pre_hook(lambda *_: seen.append(staged.background_done()))
        w.train(model, optimizer, 2)  # changes every local shard and moment
        hook.remove()
        handle.result(timeout=4 * cw.TIMEOUT_S)
    return {
        "deferred": deferred,
        "done_at_return": done_at_return,
        "seen": seen,
        "expected": expected,
        "after": w.full_state(model, optimizer),
    }


def pairs_save_apart(rank: int, world: int, root: str) -> dict[str, Any]:
    """Four ranks as two pairs ({0, 1} and {2, 3}), each pair checkpointing into its own folder
    through ``process_group=`` its subgroup, then restoring: the step and this rank's values."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both, in order
    mine = pairs[rank // 2]
    torch.manual_seed(rank // 2)  # the same weights within a pair (replicated in its group)
    model = torch.nn.Linear(4, 4)
    folder = os.path.join(root, f"pair-{rank // 2}")
    options: dict[str, Any] = {"process_group": mine, "coordination_timeout": cw.TIMEOUT_S}
    with asyncckpt.AsyncCheckpointer(folder, **options) as ckpt:
        ckpt.save(3 + rank // 2, {"model": model, "rank": {"global": rank}})
        ckpt.flush()
        fresh = torch.nn.Linear(4, 4)
        restored = ckpt.restore({"model": fresh})
    assert restored is not None
    return {
        "step": restored.step,
        "state": restored.state,
        "equal": all(
            torch.equal(a, b)
            for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
        ),
    }


def mismatch_then_agree(rank: int, world: int, root: str) -> dict[str, Any]:
    """Each rank saves another step (every flush raises), then every rank saves step 12."""
    model, optimizer = w.fsdp_trained(1, 1)
    error = None
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=cw.TIMEOUT_S) as ckpt:
        ckpt.save(10 + rank, cw.state_of(model, optimizer))
        try:
            ckpt.flush()
        except asyncckpt.CheckpointWriteError as exc:
            error = cw.outcome(exc)
        w.train(model, optimizer, 12)
        ckpt.save(12, cw.state_of(model, optimizer))
        ckpt.flush()
        restored = ckpt.restore({"model": model, "optimizer": optimizer})
    return {"error": error, "restored": None if restored is None else restored.step}


class Loader:
    """A per-rank data loader's position: an object with state_dict() / load_state_dict()."""

    def __init__(self, position: int = -1) -> None:
        self.position = position
        self.loaded = 0

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]
        self.loaded += 1


def loader_per_rank(rank: int, world: int, root: str, save: bool) -> dict[str, Any]:
    """Save (``save``) step 1 with a data loader at position 100 + rank on each rank; restore
    into a fresh loader: its position afterwards and how often it was loaded."""
    model, optimizer = w.fsdp_trained(1, 1)
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=cw.TIMEOUT_S) as ckpt:
        if save:
            ckpt.save(1, {"model": model, "optimizer": optimizer, "loader": Loader(100 + rank)})
            ckpt.flush()
        loader = Loader()
        restored = ckpt.restore({"model": model, "optimizer": optimizer, "loader": loader})
    assert restored is not None
    return {"position": loader.position, "loaded": loader.loaded, "state": restored.state}
