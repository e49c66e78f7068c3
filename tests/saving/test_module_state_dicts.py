"""saving/state_dicts.py: a module tree's state dict built directly equals torch's, and every
module torch's defaults do not describe gets its own ``state_dict()``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt.saving.state_dicts import module_state_dict, state_dict_of


class WithExtras(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.norm = torch.nn.BatchNorm1d(2)
        self.register_buffer("scratch", torch.zeros(4), persistent=False)
        self.register_buffer("kept", torch.ones(2))
        self.register_buffer("absent", None)
        self.register_parameter("missing", None)
        self.gone: torch.nn.Module | None = None
        self.blocks = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
        self.tied = torch.nn.Linear(3, 2)
        self.tied.weight = self.linear.weight
        self.shared = self.blocks[0]  # the same submodule under two names


def same_state_dict(built: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    assert built is not None
    assert list(built) == list(expected)
    for key, tensor in expected.items():
        mine = built[key]
        assert type(mine) is type(tensor) is torch.Tensor, key
        assert not mine.requires_grad, key
        assert mine.data_ptr() == tensor.data_ptr() and mine.shape == tensor.shape, key
        assert mine._version == tensor._version, key  # the same version counter


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.nn.Linear(4, 3),
        WithExtras,
        lambda: torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16),
        lambda: torch.nn.LSTM(3, 4, num_layers=2),
        lambda: torch.nn.Sequential(),
    ],
)
def test_a_plain_module_tree_gives_torchs_state_dict(make: Any) -> None:
    module = make()
    same_state_dict(module_state_dict(module), module.state_dict())
    same_state_dict(state_dict_of(module), module.state_dict())


def counted(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    original = module.state_dict

    def state_dict(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    module.state_dict = state_dict  # type: ignore[method-assign]
    return calls


class OwnStateDict(torch.nn.Linear):
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return {"renamed": self.weight.detach()}


class OwnSave(torch.nn.Linear):
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "w"] = self.weight.detach() * 2


class ExtraState(torch.nn.Linear):
    def get_extra_state(self) -> Any:
        return {"note": 1}


def with_pre_hook(module: torch.nn.Module) -> torch.nn.Module:
    module.register_state_dict_pre_hook(lambda *args: None)
    return module


def with_post_hook(module: torch.nn.Module) -> torch.nn.Module:
    def drop_bias(module: Any, state: Any, prefix: str, metadata: Any) -> None:
        state.pop(prefix + "bias", None)

    module.register_state_dict_post_hook(drop_bias)
    return module


@pytest.mark.parametrize(
    "make",
    [
        lambda: OwnStateDict(2, 2),
        lambda: OwnSave(2, 2),
        lambda: ExtraState(2, 2),
        lambda: with_pre_hook(torch.nn.Linear(2, 2)),
        lambda: with_post_hook(torch.nn.Linear(2, 2)),
    ],
)
def test_a_module_torchs_defaults_do_not_describe_gets_its_own_state_dict(make: Any) -> None:
    inner = make()
    outer = torch.nn.Sequential(torch.nn.Linear(2, 2), inner)
    assert module_state_dict(inner) is None
    assert module_state_dict(outer) is None  # anywhere in the tree
    for module in (inner, outer):
        got, expected = state_dict_of(module), module.state_dict()
        assert list(got) == list(expected)
        for key, value in expected.items():
            assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value


def test_a_state_dict_replaced_on_the_instance_is_called() -> None:
    module = torch.nn.Linear(2, 2)
    calls = counted(module)
    assert module_state_dict(module) is None
    state_dict_of(module)
    assert calls == [1]


def test_a_patched_module_state_dict_is_called(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = torch.nn.Module.state_dict

    def patched(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "state_dict", patched)
    state_dict_of(torch.nn.Linear(2, 2))
    assert calls == [1]


def test_a_module_inside_itself_is_left_to_torch() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(2, 2))
    module._modules["again"] = module
    assert module_state_dict(module) is None


def test_objects_that_are_not_modules_give_their_own_state_dict() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    assert state_dict_of(optimizer) == optimizer.state_dict()


def test_a_saved_module_reads_back_as_torchs_state_dict(tmp_path: Path) -> None:
    module = WithExtras()
    hooked = with_post_hook(torch.nn.Linear(3, 3))
    with asyncckpt.AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, {"model": module, "hooked": hooked}).result()
        ckpt.save(2, {"model": module, "hooked": hooked}).result()  # the structure reused
    loaded = asyncckpt.load(tmp_path / "step-0000000002.ckpt")
    expected = module.state_dict()
    assert list(loaded.state["model"]) == list(expected)
    for key, value in expected.items():
        assert torch.equal(loaded.state["model"][key], value), key
    assert list(loaded.state["hooked"]) == ["weight"]  # the hook ran: no bias


@pytest.mark.parametrize("name", ["state_dict", "_save_to_state_dict", "get_extra_state"])
def test_any_of_torchs_methods_set_on_the_instance_leaves_the_module_to_it(name: str) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    setattr(module[1], name, getattr(module[1], name))  # an instance attribute, torch's behaviour
    assert module_state_dict(module[0]) is not None
    assert module_state_dict(module) is None
