"""What the ranks of the replica-share tests run (imported by the forkserver): DDP models whose
replicated tensors each rank stages only its share of."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.distributed as dist

import asyncckpt
from asyncckpt.modes import Distributed

TIMEOUT_S = 10.0
LAYERS = 8
WIDTH = 8


def ddp_model() -> torch.nn.Module:
    """The same ``LAYERS`` linear layers on every rank, wrapped in DDP."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)]
    return torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(*layers))


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    torch.manual_seed(1000 + step)  # the same batch on every rank (DDP averages the gradients anyway)
    model(torch.randn(4, WIDTH)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def copied(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A copy of the model's and optimizer's state, as they are now."""
    return {
        "model": {key: value.clone() for key, value in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
    }


def ddp_saves_its_share(rank: int, world: int, root: str) -> dict[str, Any]:
    """Train a DDP model with Adam, save steps 1 and 2 through the checkpointer (an optimizer
    step right after the second save), restore: the share figures, the state at the second
    save and the state restored."""
    model = ddp_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    options = {"process_group": dist.group.WORLD} if world == 1 else {}
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=TIMEOUT_S, **options) as ckpt:
        mode = ckpt._mode
        assert isinstance(mode, Distributed)
        share = mode.multirank.share  # the seam: this rank's share of the replicated tensors
        train(model, optimizer, 1)
        ckpt.save(1, {"model": model, "optimizer": optimizer})
        ckpt.flush()
        first = dataclasses.asdict(share.stats)
        train(model, optimizer, 2)
        saved = copied(model, optimizer)
        ckpt.save(2, {"model": model, "optimizer": optimizer, "rng": asyncckpt.rng_state()})
        # At once, no flush: the optimizer step waits for the background copies of the tensors
        # this rank staged (the overlap rule), so step 2 holds the state at save().
        train(model, optimizer, 3)
        ckpt.flush()
        restored = ckpt.restore({"model": model, "optimizer": optimizer})
    return {
        "stats": first,
        "decisions": share.decisions,
        "restored": None if restored is None else restored.step,
        "saved": saved,
        "state": copied(model, optimizer),
        "largest": max(p.numel() * p.element_size() for p in model.parameters()),
    }


def replicas_differ(rank: int, world: int, root: str) -> dict[str, Any]:
    """A module whose plain tensors differ between ranks (rank 1 has an extra buffer): the step
    fails on every rank before anything is written."""
    torch.manual_seed(0)
    model = torch.nn.Linear(WIDTH, WIDTH)
    if rank == 1:
        model.register_buffer("extra", torch.zeros(WIDTH))
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=TIMEOUT_S) as ckpt:
        ckpt.save(1, {"model": model})
        try:
            ckpt.flush()
        except asyncckpt.CheckpointWriteError as exc:
            return {"error": str(exc), "rank": exc.rank, "step": exc.step}
    return {"error": None}
