"""restore() checks every tensor it puts into a live object against what is there (loading/live.py).

The reviewed case: a 33 KB-class hand-made file whose Adam ``exp_avg`` is float64 with shape
``[2**28]`` and stride ``[0]`` (a view of 8 bytes) made ``restore()`` allocate about 1.1 GiB and
report success; the next ``optimizer.step()`` raised.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt import IncompatibleCheckpointError
from asyncckpt.catalog import checkpoint_name
from asyncckpt.format import TensorRef

from .helpers import hand_made, save_objects, trained

W, B = "model.weight", "model.bias"


def linear() -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def adam_file(
    path: Path,
    exp_avg: list[Any],
    *,
    step_row: list[Any] | None = None,
    lr: Any = 0.01,
    exp_avg_sq_at: int = 128,
) -> Path:
    """A Linear(4, 2) + Adam checkpoint by hand; ``exp_avg`` is the weight's exp_avg row
    ``[dtype, shape, stride, offset]``."""
    _, optimizer = linear()
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    rows = [
        [W, "float32", [2, 4], [4, 1], 0, 0],
        [B, "float32", [2], [1], 0, 32],
        _row("optimizer.state.0.step", step_row or ["float32", [], [], 40]),
        _row("optimizer.state.0.exp_avg", [*exp_avg[:3], 64 + exp_avg[3]]),
        ["optimizer.state.0.exp_avg_sq", "float32", [2, 4], [4, 1], 0, exp_avg_sq_at],
    ]
    state = {"step": TensorRef(2), "exp_avg": TensorRef(3), "exp_avg_sq": TensorRef(4)}
    tree = {
        "model": {"weight": TensorRef(0), "bias": TensorRef(1)},
        "optimizer": {"state": {0: state}, "param_groups": [{**group, "lr": lr, "params": [0, 1]}]},
    }
    if not isinstance(lr, float):
        rows.append(_row("optimizer.param_groups.0.lr", [*lr[:3], 192 + lr[3]]))
        tree["optimizer"]["param_groups"][0]["lr"] = TensorRef(5)
    return hand_made(path, 2, rows, tree, bytes(256))


def _row(key: str, spec: list[Any]) -> list[Any]:
    dtype, shape, stride, offset = spec
    return [key, dtype, shape, stride, 0, offset]


def test_the_reviewed_stride_0_exp_avg_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = adam_file(tmp_path / checkpoint_name(2), ["float64", [2**28], [0], 48])
    assert path.stat().st_size < 33_000
    model, optimizer = linear()

    with pytest.raises(IncompatibleCheckpointError, match=r"exp_avg: a view of 268435456 elements") as caught:
        asyncckpt.restore(tmp_path, {"model": model, "optimizer": optimizer}, on_corrupt="fail")

    assert caught.value.key == "optimizer.state.0.exp_avg"
    assert optimizer.state == {}  # nothing was put into the optimizer


def test_a_restore_falls_back_past_it_and_the_optimizer_steps(tmp_path: Path) -> None:
    good_model, good_optimizer = trained(width=2)
    save_objects(tmp_path, 1, good_model, good_optimizer)
    model, optimizer = trained(width=2, seed=1, steps=0)
    hand = tmp_path / checkpoint_name(2)
    rows = [
        [f"model.{k}", "float32", list(v.shape), list(v.stride()), 0, 0]
        for k, v in model.state_dict().items()
    ]
    exp_avg = ["optimizer.state.0.exp_avg", "float64", [2**28], [0], 0, 0]
    tree = {
        "model": {k: TensorRef(i) for i, k in enumerate(model.state_dict())},
        "optimizer": {
            "state": {0: {"exp_avg": TensorRef(len(rows))}},
            "param_groups": [{**good_optimizer.state_dict()["param_groups"][0]}],
        },
    }
    hand_made(hand, 2, [*rows, exp_avg], tree)

    result = asyncckpt.restore(tmp_path, {"model": model, "optimizer": optimizer}, log=lambda *a, **k: None)

    assert result.step == 1 and result.source == "fallback"
    assert result.diagnostics[0].kind == "incompatible" and "exp_avg" in result.diagnostics[0].reason
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # the state fits: the step runs


@pytest.mark.parametrize(
    ("exp_avg", "words"),
    [
        (["float32", [8], [1], 0], r"shape \[8\] does not fit its parameter of shape \[2, 4\]"),
        (["float32", [2, 5], [5, 1], 0], "does not fit its parameter"),
        (["float32", [], [], 0], "does not fit its parameter"),  # broadcasts, but Adam updates in place
        (["float32", [2, 1], [1, 1], 0], "does not fit its parameter"),
        (["float32", [2, 4], [0, 0], 0], "updates its state in place"),  # a view, kept as such
        (["int32", [2, 4], [4, 1], 0], "dtype int32, its parameter is float32"),
        (["complex64", [2, 4], [4, 1], 0], "dtype complex64"),
    ],
)
def test_optimizer_state_must_fit_its_parameter(tmp_path: Path, exp_avg: list[Any], words: str) -> None:
    adam_file(tmp_path / checkpoint_name(2), exp_avg)
    model, optimizer = linear()
    with pytest.raises(IncompatibleCheckpointError, match=words):
        asyncckpt.restore(tmp_path, {"model": model, "optimizer": optimizer}, on_corrupt="fail")


@pytest.mark.parametrize(
    "exp_avg",
    [
        ["float32", [2, 4], [4, 1], 0],  # exact
        ["float64", [2, 4], [4, 1], 0],  # another float: converted, as load_state_dict does
    ],
)
def test_optimizer_state_that_fits_its_parameter_is_restored(tmp_path: Path, exp_avg: list[Any]) -> None:
    adam_file(tmp_path / checkpoint_name(2), exp_avg)
    model, optimizer = linear()
    result = asyncckpt.restore(tmp_path, {"model": model, "optimizer": optimizer}, on_corrupt="fail")
    assert result.step == 2
    assert optimizer.state[model.weight]["exp_avg"].shape == tuple(exp_avg[1])


@pytest.mark.parametrize(
    ("step_row", "words"),
    [
        (["float32", [4], [1], 40], "step holds one value"),
        (["complex64", [], [], 40], "step holds one value"),
        (["bits16", [], [], 40], "step holds one value"),  # found by the stress fuzz: item() raised
    ],
)
def test_a_step_holds_one_value(tmp_path: Path, step_row: list[Any], words: str) -> None:
    adam_file(tmp_path / checkpoint_name(2), ["float32", [2, 4], [4, 1], 0], step_row=step_row)
    model, optimizer = linear()
    with pytest.raises(IncompatibleCheckpointError, match=words):
        asyncckpt.restore(tmp_path, {"model": model, "optimizer": optimizer}, on_corrupt="fail")


@pytest.mark.parametrize("value", [-5.0, float("inf"), float("nan")])
def test_a_step_is_a_finite_number_not_negative(tmp_path: Path, value: float) -> None:
    model, optimizer = trained(width=2)
    state = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    state["optimizer"]["state"][0]["step"] = torch.tensor(value)
    asyncckpt.save(tmp_path / checkpoint_name(2), state, step=2)
    fresh, fresh_optimizer = trained(width=2, steps=0)
    with pytest.raises(IncompatibleCheckpointError, match="a step is a finite number") as caught:
        asyncckpt.restore(tmp_path, {"model": fresh, "optimizer": fresh_optimizer}, on_corrupt="fail")
    assert caught.value.key == "optimizer.state.0.step"


def test_optimizer_state_tensors_never_share_memory(tmp_path: Path) -> None:
    # Found by the restore fuzz: step, exp_avg and exp_avg_sq over the same bytes restored, and
    # Adam's in-place update of exp_avg turned the step into -6.8e35 (OverflowError next step).
    path = adam_file(tmp_path / checkpoint_name(2), ["float32", [2, 4], [4, 1], 0], exp_avg_sq_at=64)
    model, optimizer = linear()
    with pytest.raises(IncompatibleCheckpointError, match="exp_avg_sq: shares its memory with") as caught:
        asyncckpt.restore(tmp_path, {"model": model, "optimizer": optimizer}, on_corrupt="fail")
    assert caught.value.key == "optimizer.state.0.exp_avg_sq"
    assert path.exists()


def test_a_hyperparameter_tensor_holds_one_value(tmp_path: Path) -> None:
    adam_file(tmp_path / checkpoint_name(2), ["float32", [2, 4], [4, 1], 0], lr=["float32", [2**28], [0], 0])
    model, optimizer = linear()
    with pytest.raises(IncompatibleCheckpointError, match="param_groups.0.lr: a hyperparameter holds one"):
        asyncckpt.restore(tmp_path, {"model": model, "optimizer": optimizer}, on_corrupt="fail")


def test_state_of_no_parameter_is_refused(tmp_path: Path) -> None:
    model, optimizer = trained(width=2)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    state["optimizer"]["state"][99] = {"exp_avg": torch.zeros(3)}
    asyncckpt.save(tmp_path / checkpoint_name(2), state, step=2)
    fresh, fresh_optimizer = trained(width=2, steps=0)
    with pytest.raises(IncompatibleCheckpointError, match="state.99.exp_avg: belongs to no parameter"):
        asyncckpt.restore(tmp_path, {"model": fresh, "optimizer": fresh_optimizer}, on_corrupt="fail")


def test_live_optimizer_state_is_the_reference_when_there_is_some(tmp_path: Path) -> None:
    model, optimizer = trained(width=2)
    state = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    live = state["optimizer"]["state"][0]["exp_avg"]
    state["optimizer"]["state"][0]["exp_avg"] = live.reshape(-1)[:1].clone()  # broadcasts, but differs
    asyncckpt.save(tmp_path / checkpoint_name(2), state, step=2)
    with pytest.raises(IncompatibleCheckpointError, match=r"the live tensor has \[2, 4\]"):
        asyncckpt.restore(tmp_path, {"model": model, "optimizer": optimizer}, on_corrupt="fail")


def test_a_module_tensor_keeps_its_kind_of_dtype(tmp_path: Path) -> None:
    model, _ = linear()
    asyncckpt.save(
        tmp_path / checkpoint_name(2),
        {"model": {"weight": torch.ones(2, 4, dtype=torch.int64), "bias": torch.ones(2)}},
        step=2,
    )
    with pytest.raises(IncompatibleCheckpointError, match="model.weight: dtype int64 in the checkpoint"):
        asyncckpt.restore(tmp_path, {"model": model}, on_corrupt="fail")
    asyncckpt.save(
        tmp_path / checkpoint_name(3),
        {"model": {"weight": torch.ones(2, 4, dtype=torch.float64), "bias": torch.ones(2)}},
        step=3,
    )
    assert asyncckpt.restore(tmp_path, {"model": model}, on_corrupt="fail").step == 3  # float to float
    assert torch.equal(model.weight, torch.ones(2, 4))


def test_adafactor_factors_broadcast_to_their_parameter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adafactor(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    asyncckpt.save(tmp_path / checkpoint_name(2), {"model": model, "optimizer": optimizer}, step=2)
    fresh = torch.nn.Linear(4, 2)
    fresh_optimizer = torch.optim.Adafactor(fresh.parameters())
    asyncckpt.restore(tmp_path, {"model": fresh, "optimizer": fresh_optimizer}, on_corrupt="fail")
    assert fresh_optimizer.state[fresh.weight]["row_var"].shape == (2, 1)
    fresh(torch.randn(3, 4)).sum().backward()
    fresh_optimizer.step()


@pytest.mark.parametrize(
    "kind", ["SGD", "Adagrad", "ASGD", "NAdam", "RAdam", "Rprop", "RMSprop", "Adamax", "LBFGS"]
)
def test_every_torch_optimizer_restores_its_own_state(tmp_path: Path, kind: str) -> None:
    def make() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        options = {"momentum": 0.9} if kind == "SGD" else {}
        return model, getattr(torch.optim, kind)(model.parameters(), **options)

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = model(torch.ones(3, 4)).square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)

    model, optimizer = make()
    step(model, optimizer)
    asyncckpt.save(tmp_path / checkpoint_name(2), {"model": model, "optimizer": optimizer}, step=2)
    fresh, fresh_optimizer = make()
    asyncckpt.restore(tmp_path, {"model": fresh, "optimizer": fresh_optimizer}, on_corrupt="fail")
    step(fresh, fresh_optimizer)


class Custom(torch.optim.Adam):
    """An optimizer outside torch.optim: its state layout is its own business."""


def test_an_optimizer_outside_torch_optim_keeps_its_own_state_shapes(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2)
    optimizer = Custom(model.parameters())
    state = {
        "optimizer": {
            "state": {0: {"step": torch.tensor(0.0), "qmap": torch.zeros(256)}},
            "param_groups": optimizer.state_dict()["param_groups"],
        }
    }
    asyncckpt.save(tmp_path / checkpoint_name(2), state, step=2)
    asyncckpt.restore(tmp_path, {"optimizer": optimizer}, on_corrupt="fail")
    assert optimizer.state[model.weight]["qmap"].shape == (256,)


def test_an_optimizer_outside_torch_optim_gets_no_unbounded_view(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2)
    optimizer = Custom(model.parameters())
    group = {k: v for k, v in optimizer.state_dict()["param_groups"][0].items()}
    tree = {"optimizer": {"state": {0: {"qmap": TensorRef(0)}}, "param_groups": [group]}}
    hand_made(
        tmp_path / checkpoint_name(2), 2, [["optimizer.state.0.qmap", "float32", [2**28], [0], 0, 0]], tree
    )
    with pytest.raises(IncompatibleCheckpointError, match=r"a view of 268435456 elements over 1 stored"):
        asyncckpt.restore(tmp_path, {"optimizer": optimizer}, on_corrupt="fail")


class Buffer:
    """Any object with state_dict(): its tensors are its own business, but not unbounded views."""

    def __init__(self, n: int) -> None:
        self.data = torch.zeros(n)

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data = state["data"].clone()


@pytest.mark.parametrize(("live_size", "refused"), [(4, True), (2**20, False)])
def test_other_objects_get_an_overlapping_view_only_into_a_live_tensor_its_size(
    tmp_path: Path, live_size: int, refused: bool
) -> None:
    tree = {"buffer": {"data": TensorRef(0)}}
    hand_made(tmp_path / checkpoint_name(2), 2, [["buffer.data", "float32", [2**20], [0], 0, 0]], tree)
    buffer = Buffer(live_size)
    if refused:
        with pytest.raises(IncompatibleCheckpointError, match="buffer.data: a view of 1048576 elements"):
            asyncckpt.restore(tmp_path, {"buffer": buffer}, on_corrupt="fail")
    else:
        asyncckpt.restore(tmp_path, {"buffer": buffer}, on_corrupt="fail")
        assert buffer.data.shape == (2**20,)


def test_legacy_files_are_checked_the_same_way(tmp_path: Path) -> None:
    model, optimizer = trained(width=2)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 7}
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(1, dtype=torch.float64).expand(2**28)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (tmp_path / "model-7.pt").write_bytes(buffer.getvalue())
    fresh, fresh_optimizer = trained(width=2, steps=0)
    with pytest.raises(IncompatibleCheckpointError, match="exp_avg: a view of 268435456 elements"):
        asyncckpt.restore(tmp_path, {"model": fresh, "optimizer": fresh_optimizer}, on_corrupt="fail")


def test_a_nested_tensor_is_not_put_into_a_module(tmp_path: Path) -> None:
    model, _ = linear()
    nested = torch.nested.nested_tensor([torch.zeros(4), torch.zeros(4)])
    buffer = io.BytesIO()
    torch.save({"model": {"weight": nested, "bias": torch.zeros(2)}, "step": 3}, buffer)
    (tmp_path / "model-3.pt").write_bytes(buffer.getvalue())
    with pytest.raises(IncompatibleCheckpointError, match="nested"):
        asyncckpt.restore(tmp_path, {"model": model}, on_corrupt="fail")
