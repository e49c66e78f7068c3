"""A tiny training run for the exact-resume test (tests/test_exact_resume.py).

Usage: python resume_trainer.py MODE CHECKPOINT_DIR OUT_FILE STEPS

MODE "straight" trains 2*STEPS steps and saves the final state to OUT_FILE; "first" trains STEPS
steps and saves a checkpoint (model, optimizer, rng) in CHECKPOINT_DIR; "resume" builds everything
from another seed, restores that checkpoint, trains STEPS more steps and saves the final state.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

import asyncckpt
from asyncckpt.catalog import checkpoint_name
from asyncckpt.loading import restore
from asyncckpt.rng import rng_state, set_rng_state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    seed_everything(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 4)
    )
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Random data drawing from every global generator: Python's, NumPy's and torch's."""
    size = random.randint(4, 12)
    inputs = torch.randn(size, 16) + float(np.random.normal())
    return inputs, torch.randint(0, 4, (size,))


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    model.train()
    for _ in range(steps):
        inputs, labels = batch()
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main(mode: str, checkpoints: Path, out: Path, steps: int) -> None:
    torch.set_num_threads(1)
    if mode == "resume":
        model, optimizer = build(seed=12345)  # restore must overwrite every bit of this
        result = restore(checkpoints, {"model": model, "optimizer": optimizer})
        assert result.step == steps, result.summary
        set_rng_state(result.state["rng"])
    else:
        model, optimizer = build(seed=0)
    train(model, optimizer, steps)
    state = {"model": model, "optimizer": optimizer, "rng": rng_state()}
    if mode == "first":
        asyncckpt.save(checkpoints / checkpoint_name(steps), state, step=steps)
        return
    if mode == "straight":
        train(model, optimizer, steps)
        state["rng"] = rng_state()
    asyncckpt.save(out, state, step=2 * steps)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
