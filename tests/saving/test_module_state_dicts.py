"""saving/state_dicts.py: a module tree's state dict built directly equals torch's, and every
module torch's defaults do not describe gets its own ``state_dict()``."""

from __future__ import annotations

import datetime
import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt.format import encode as encode_module
from asyncckpt.saving.state_dicts import ModuleTrees, module_state_dict, state_dict_of


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


# ModuleTrees: a tree's walk remembered from one save to the next.


def remembered(trees: ModuleTrees, module: torch.nn.Module) -> dict[str, Any] | None:
    """The state dict ``trees`` gives for ``module`` (its own tensors, checked against torch's
    ``keep_vars`` result) when the memo gave it; None when the tree was walked."""
    hits = trees.hits
    got = trees.state_dict(module)
    if got is None:
        assert module_state_dict(module) is None  # a tree torch's defaults do not describe
        return None
    expected = module.state_dict(keep_vars=True)
    assert list(got) == list(expected)
    assert all(got[key] is tensor for key, tensor in expected.items())
    return got if trees.hits == hits + 1 else None


def test_an_unchanged_tree_is_built_from_the_memo() -> None:
    trees = ModuleTrees()
    module = WithExtras()
    assert remembered(trees, module) is None  # the first walk records
    assert remembered(trees, module) is not None
    assert remembered(trees, module) is not None
    assert trees.hits == 2


def replace_parameter(module: WithExtras) -> None:
    module.linear.weight = torch.nn.Parameter(torch.ones(2, 3))


def add_submodule(module: WithExtras) -> None:
    module.blocks.append(torch.nn.Linear(1, 1))


def buffer_made_non_persistent(module: WithExtras) -> None:
    module.register_buffer("kept", module.kept, persistent=False)


def buffer_made_persistent(module: WithExtras) -> None:
    module.register_buffer("scratch", module.scratch, persistent=True)


def parameter_set_to_none(module: WithExtras) -> None:
    module.blocks[2].bias = None


def attribute_deleted(module: WithExtras) -> None:
    del module.norm


def class_swapped(module: WithExtras) -> None:
    module.blocks[0].__class__ = OwnSave


def post_hook_added(module: WithExtras) -> None:
    with_post_hook(module.blocks[2])


def state_dict_set_on_an_instance(module: WithExtras) -> None:
    counted(module.tied)


def child_replaced(module: WithExtras) -> None:
    module.blocks[1] = torch.nn.Linear(2, 2)


@pytest.mark.parametrize(
    "change",
    [
        replace_parameter,
        add_submodule,
        buffer_made_non_persistent,
        buffer_made_persistent,
        parameter_set_to_none,
        attribute_deleted,
        class_swapped,
        post_hook_added,
        state_dict_set_on_an_instance,
        child_replaced,
    ],
)
def test_a_changed_tree_is_walked_again(change: Any) -> None:
    trees = ModuleTrees()
    module = WithExtras()
    remembered(trees, module)
    assert remembered(trees, module) is not None
    change(module)
    assert remembered(trees, module) is None  # torch's result, not the memo's
    if module_state_dict(module) is not None:
        assert remembered(trees, module) is not None  # the new tree remembered


def test_a_parameters_data_replaced_in_place_is_read_afresh() -> None:
    trees = ModuleTrees()
    module = WithExtras()
    remembered(trees, module)
    module.linear.bias.data = torch.full((2,), 7.0)  # no dict changes
    got = remembered(trees, module)
    assert got is not None and torch.equal(got["linear.bias"].detach(), torch.full((2,), 7.0))


def test_a_class_patched_after_the_walk_is_called(monkeypatch: pytest.MonkeyPatch) -> None:
    trees = ModuleTrees()
    module = WithExtras()
    remembered(trees, module)
    monkeypatch.setattr(torch.nn.Linear, "_save_to_state_dict", OwnSave._save_to_state_dict)
    assert remembered(trees, module) is None
    assert trees.state_dict(module) is None


def test_the_memo_keeps_no_module_alive() -> None:
    trees = ModuleTrees()
    module = WithExtras()
    remembered(trees, module)
    gone = weakref.ref(module.linear.weight)
    del module
    gc.collect()
    assert gone() is None
    other = torch.nn.Linear(2, 2)  # may take the freed root's id: its own state dict
    assert list(trees.state_dict(other) or ()) == ["weight", "bias"]


class FixedClock:
    """Stands for ``datetime`` in the header encoder: one creation time for every file."""

    @staticmethod
    def now(tz: Any) -> datetime.datetime:
        return datetime.datetime(2026, 1, 1, tzinfo=tz)


def test_a_module_saved_from_the_memo_writes_the_bytes_torchs_state_dict_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encode_module, "datetime", FixedClock)
    model = WithExtras()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    state = {"model": model, "optimizer": optimizer}
    with asyncckpt.AsyncCheckpointer(tmp_path / "reused") as ckpt:
        ckpt.save(1, state).result()
        ckpt.save(2, state).result()  # the cached structure, the module tree's own tensors
    with asyncckpt.AsyncCheckpointer(tmp_path / "fresh") as ckpt:
        ckpt.save(2, {"model": model.state_dict(), "optimizer": optimizer.state_dict()}).result()
    name = "step-0000000002.ckpt"
    assert (tmp_path / "reused" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    loaded = asyncckpt.load(tmp_path / "reused" / name).state["model"]
    assert all(type(t) is torch.Tensor and not t.requires_grad for t in loaded.values())
