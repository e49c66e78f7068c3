"""save/plan.py: what a save stages, checked and decided before any byte is copied."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from asyncckpt.errors import UnsupportedValueError
from asyncckpt.saving.plan import plan_save


def trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_plan_holds_the_snapshot_metadata_and_layout() -> None:
    state = {"w": torch.ones(3), "n": 1}
    plan = plan_save(5, state, {"lr": 0.1}, overlap=True)

    assert plan.step == 5 and plan.metadata == {"lr": 0.1}
    assert plan.layout == plan.snapshot.layout_key()
    assert plan.deferred == frozenset()  # no optimizer in the state
    assert not plan.uses_cuda


def test_overlap_defers_the_optimizers_parameters_and_state_only() -> None:
    model, optimizer = trained()
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "extra": torch.zeros(2)}

    plan = plan_save(1, state, None, overlap=True)
    keys = {t.key for t in plan.snapshot.tensors if t.blob in plan.deferred}

    params = {f"model.{name}" for name, _ in model.named_parameters()}
    moments = {t.key for t in plan.snapshot.tensors if t.key.startswith("optimizer.state.")}
    assert keys == params | moments
    assert plan_save(1, state, None, overlap=False).deferred == frozenset()


@pytest.mark.parametrize(
    ("step", "state", "metadata", "error", "pattern"),
    [
        (1, {"f": print}, None, UnsupportedValueError, r"^state\['f'\]: cannot store"),
        (1, {}, {"w": torch.ones(1)}, UnsupportedValueError, r"^metadata\['w'\]: tensors belong"),
        ("1", {}, None, TypeError, "step"),
        (-1, {}, None, ValueError, "step"),
    ],
)
def test_what_cannot_be_stored_is_refused_before_anything_is_copied(
    step: Any, state: Any, metadata: Any, error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        plan_save(step, state, metadata, overlap=True)
