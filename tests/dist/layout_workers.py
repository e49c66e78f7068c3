"""What the ranks of the step-layout tests run (imported by the forkserver): a module with a
DTensor parameter and plain (replicated) tensors, saved again after each change of structure and
restored at once into fresh objects; what a save leaves alive behind it."""

from __future__ import annotations

import gc
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import asyncckpt
from asyncckpt.modes import Distributed

TIMEOUT_S = 10.0


def _dtensor(local: torch.Tensor, placement: Any) -> torch.nn.Parameter:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return torch.nn.Parameter(DTensor.from_local(local, mesh, [placement], run_check=False))


def _module(local: torch.Tensor, placement: Any, bias: torch.Tensor) -> torch.nn.Module:
    module = torch.nn.Module()
    module.w = _dtensor(local, placement)
    module.b = torch.nn.Parameter(bias)
    module.c = torch.nn.Parameter(torch.randn(3))
    return module


def _zeros_like(module: torch.nn.Module) -> torch.nn.Module:
    """A module of the same structure (placements, shapes, buffers), every value zero."""
    fresh = torch.nn.Module()
    for name, param in module.named_parameters():
        if isinstance(param, DTensor):
            local = torch.zeros_like(param.to_local())
            setattr(fresh, name, _dtensor(local, param.placements[0]))
        else:
            setattr(fresh, name, torch.nn.Parameter(torch.zeros_like(param)))
    for name, buffer in module.named_buffers():
        fresh.register_buffer(name, torch.zeros_like(buffer))
    return fresh


def _differences(ours: torch.nn.Module, theirs: torch.nn.Module) -> list[str]:
    """The names whose values (local shards and placements for DTensors) differ."""
    a, b = dict(ours.state_dict()), dict(theirs.state_dict())
    if list(a) != list(b):
        return [f"keys {list(a)} != {list(b)}"]
    differ = []
    for key, value in a.items():
        other = b[key]
        if isinstance(value, DTensor):
            if value.placements != other.placements or not torch.equal(value.to_local(), other.to_local()):
                differ.append(key)
        elif not torch.equal(value, other):
            differ.append(key)
    return differ


def layout_follows_changes(rank: int, world: int, root: str) -> dict[str, Any]:
    """Two saves of the same structure (the second reuses the first's layout), then one save
    after each change and one more without a change, each restored at once into fresh objects
    of the new structure. Per save: the layout cache's hits and misses after it and what the
    restore got wrong (nothing)."""
    torch.manual_seed(0)  # the same values on every rank: a valid Replicate() later
    module = _module(torch.randn(4, 3), Shard(0), torch.randn(5))
    state = {"model": module}

    def replace_bias() -> None:
        module.b = torch.nn.Parameter(torch.randn(5))  # the same shape, another tensor

    def grow_bias() -> None:
        module.b = torch.nn.Parameter(torch.randn(7))

    def add_buffer() -> None:
        module.register_buffer("extra", torch.arange(4.0))

    def replicate() -> None:  # the same local tensor (memory, shape), another placement
        module.w = _dtensor(module.w.to_local(), Replicate())

    def in_place() -> None:  # values only: the layout is reused
        with torch.no_grad():
            module.b.add_(1.0)
            module.w.to_local().mul_(2.0)

    def again() -> None:  # the same structure as the save before: its layout is reused
        pass

    changes: list[tuple[str, Callable[[], None]]] = [
        ("same", again),
        ("in place", in_place),
        ("tensor replaced", replace_bias),
        ("again", again),
        ("shape", grow_bias),
        ("again", again),
        ("keys", add_buffer),
        ("again", again),
        ("placements", replicate),
        ("again", again),
    ]
    options = {"process_group": dist.group.WORLD} if world == 1 else {}
    saves = []
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=TIMEOUT_S, keep_last=2, **options) as ckpt:
        mode = ckpt._mode
        assert isinstance(mode, Distributed)
        layouts = mode.multirank.planner.layouts  # the seam: the last save's layout, reused
        ckpt.save(1, state)
        ckpt.flush()
        for step, (name, change) in enumerate(changes, start=2):
            change()
            ckpt.save(step, state)
            ckpt.flush()
            fresh = _zeros_like(module)
            restored = ckpt.restore({"model": fresh})
            saves.append(
                {
                    "change": name,
                    "step": None if restored is None else restored.step,
                    "counts": (layouts.hits, layouts.misses),
                    "differences": _differences(fresh, module),
                }
            )
    return {"saves": saves}


def item_records_left(rank: int, world: int, root: str) -> dict[str, Any]:
    """Two saves of a module of 40 plain tensors, then a full collection: how many item
    locations (one per saved tensor, in the commit record) are still alive on this rank."""
    from asyncckpt.dist.record import ItemLocation

    torch.manual_seed(0)
    module = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(20)))
    options = {"process_group": dist.group.WORLD} if world == 1 else {}
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=TIMEOUT_S, **options) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"model": module})
            ckpt.flush()
        gc.collect()
        left = sum(isinstance(o, ItemLocation) for o in gc.get_objects())
    return {"left": left}


def rng_every_save(rank: int, world: int, root: str) -> dict[str, Any]:
    """Twelve saves of a module and a fresh ``asyncckpt.rng_state()`` (its values change on every
    save: no layout is ever reused); the layout cache's counts, and the last save restored."""
    torch.manual_seed(0)
    random.seed(0)  # the same on every rank: the replicated bias stays the same everywhere
    module = _module(torch.randn(4, 3), Shard(0), torch.randn(5))
    options = {"process_group": dist.group.WORLD} if world == 1 else {}
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=TIMEOUT_S, keep_last=2, **options) as ckpt:
        mode = ckpt._mode
        assert isinstance(mode, Distributed)
        layouts = mode.multirank.planner.layouts
        for step in range(1, 13):
            with torch.no_grad():
                module.b.add_(random.random())  # Python's RNG state (plain values) moves on
            ckpt.save(step, {"model": module, "rng": asyncckpt.rng_state()})
        ckpt.flush()
        fresh = _zeros_like(module)
        restored = ckpt.restore({"model": fresh})
    return {
        "counts": (layouts.hits, layouts.misses, layouts.skipped),
        "step": None if restored is None else restored.step,
        "differences": _differences(fresh, module),
    }


def changing_numbers(rank: int, world: int, root: str) -> dict[str, Any]:
    """Saves of a module and an epoch that changes, then stays: each save restored at once.
    Per save: the epoch saved and the epoch restored, and what the restore got wrong."""
    torch.manual_seed(0)
    module = _module(torch.randn(4, 3), Shard(0), torch.randn(5))
    options = {"process_group": dist.group.WORLD} if world == 1 else {}
    saves = []
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=TIMEOUT_S, keep_last=2, **options) as ckpt:
        for step, epoch in enumerate([1, 2, 2, 3, 3, 3], start=1):
            ckpt.save(step, {"model": module, "epoch": epoch, "lr": 0.1 * epoch})
            ckpt.flush()
            fresh = _zeros_like(module)
            restored = ckpt.restore({"model": fresh})
            assert restored is not None
            saved = {"epoch": epoch, "lr": 0.1 * epoch}
            got = {"epoch": restored.state.get("epoch"), "lr": restored.state.get("lr")}
            saves.append({"saved": saved, "restored": got, "differences": _differences(fresh, module)})
    return {"saves": saves}
