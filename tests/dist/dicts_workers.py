"""What the ranks of the state-dict tests run (imported by the forkserver), and the comparison
of two state dicts both sides use: ``StateDicts`` against DCP's own functions."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import asyncckpt
from asyncckpt.dist.dicts import StateDicts
from asyncckpt.modes import Distributed

TIMEOUT_S = 10.0


def same(ours: Any, theirs: Any, path: str = "") -> str | None:
    """Where ``ours`` and ``theirs`` differ (None: nowhere): the same keys in the same order,
    the same types, tensors viewing the same memory with equal values."""
    if type(ours) is not type(theirs):
        return f"{path}: {type(ours).__name__} != {type(theirs).__name__}"
    if isinstance(ours, dict):
        if list(ours) != list(theirs):
            return f"{path}: keys {list(ours)} != {list(theirs)}"
        return next((d for k in ours if (d := same(ours[k], theirs[k], f"{path}/{k}")) is not None), None)
    if isinstance(ours, list | tuple):
        if len(ours) != len(theirs):
            return f"{path}: {len(ours)} items != {len(theirs)}"
        pairs = zip(ours, theirs, strict=True)
        return next(
            (d for i, (a, b) in enumerate(pairs) if (d := same(a, b, f"{path}/{i}")) is not None), None
        )
    if isinstance(ours, DTensor):
        return same(ours.to_local(), theirs.to_local(), path) or (
            None if ours.placements == theirs.placements else path
        )
    if isinstance(ours, torch.Tensor):
        if (ours.data_ptr(), ours.shape, ours.stride(), ours.dtype) != (
            theirs.data_ptr(),
            theirs.shape,
            theirs.stride(),
            theirs.dtype,
        ):
            return f"{path}: another tensor"
        return None if torch.equal(ours, theirs) else f"{path}: values"
    return None if ours == theirs else f"{path}: {ours!r} != {theirs!r}"


def model() -> torch.nn.Module:
    """A small model with nested modules, buffers (one not persistent) and two groups' worth of
    parameters, the same on every rank."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Linear(8, 2)),
    )
    net.register_buffer("scratch", torch.zeros(3), persistent=False)
    return net


def two_groups(net: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam over ``net``: the first layer in one group, the rest in another (its own lr)."""
    first = list(net.parameters())[:2]
    rest = list(net.parameters())[2:]
    return torch.optim.Adam([{"params": first}, {"params": rest, "lr": 1e-3}], lr=1e-2)


def train(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    torch.manual_seed(1)
    net(torch.randn(6, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def compare(dicts: StateDicts, net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Ours against DCP's, twice (the second from the learned names); the learned count."""
    found = {}
    for attempt in ("first", "again"):
        found[f"model {attempt}"] = same(dicts.model("model", net), get_model_state_dict(net))
        found[f"optimizer {attempt}"] = same(
            dicts.optimizer("optimizer", net, optimizer), get_optimizer_state_dict(net, optimizer)
        )
    return {"differences": found, "learned": dicts.learned}


def ddp_matches_dcp(rank: int, world: int) -> dict[str, Any]:
    """A DDP-wrapped model and Adam with two groups: ours equals DCP's, learned once each."""
    net = torch.nn.parallel.DistributedDataParallel(model())
    optimizer = two_groups(net)
    train(net, optimizer)
    result = compare(StateDicts(), net, optimizer)
    result["keys"] = list(get_model_state_dict(net))
    return result


def fsdp_matches_dcp(rank: int, world: int) -> dict[str, Any]:
    """An FSDP2 model (DTensor parameters) and its optimizer: ours equals DCP's, learned once
    each; after another training step (the same structure, new values) still."""
    net = model()
    fully_shard(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    train(net, optimizer)
    dicts = StateDicts()
    result = compare(dicts, net, optimizer)
    train(net, optimizer)
    again = compare(dicts, net, optimizer)
    result["differences"].update({f"{key}, trained": d for key, d in again["differences"].items()})
    result["learned"] = again["learned"]
    result["learned names"] = dicts.learned_names("model") and dicts.learned_names("optimizer")
    return result


def ddp_reuses_its_plans(rank: int, world: int, root: str) -> dict[str, Any]:
    """Three saves of a DDP model and Adam over its first layer, then a param group added and a
    fourth save; a restore of the fourth into fresh objects. The planner's counts after the
    third and the fourth save, the optimizer's state at the fourth save and restored."""
    net = torch.nn.parallel.DistributedDataParallel(model())
    params = list(net.parameters())
    optimizer = torch.optim.Adam(params[:2], lr=1e-2)
    state = {"model": net, "optimizer": optimizer}
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=TIMEOUT_S) as ckpt:
        mode = ckpt._mode
        assert isinstance(mode, Distributed)
        planner = mode.multirank.planner  # the seam: what the last save decided
        for step in (1, 2, 3):
            train(net, optimizer)
            ckpt.save(step, state)
        ckpt.flush()
        counts = [(planner.layouts.hits, planner.layouts.misses, planner.dicts.learned)]
        optimizer.add_param_group({"params": params[2:], "lr": 1e-3})
        train(net, optimizer)
        saved = copy.deepcopy(optimizer.state_dict())
        ckpt.save(4, state)
        ckpt.flush()
        counts.append((planner.layouts.hits, planner.layouts.misses, planner.dicts.learned))
    fresh = torch.nn.parallel.DistributedDataParallel(model())
    fresh_params = list(fresh.parameters())
    restored = two_groups(fresh)
    assert [len(g["params"]) for g in restored.param_groups] == [2, len(fresh_params) - 2]
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=TIMEOUT_S) as ckpt:
        result = ckpt.restore({"model": fresh, "optimizer": restored})
    return {
        "counts": counts,
        "step": None if result is None else result.step,
        "saved": saved,
        "restored": restored.state_dict(),
    }
