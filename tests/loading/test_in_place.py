"""restore reads a module's tensors straight into it; a module that then holds its whole state,
and loads by torch's defaults, is not asked to ``load_state_dict`` it again (a copy of every
tensor onto itself, quadratic in the number of submodules in torch 2.x). Anything else still
goes through ``load_state_dict``: hooks, overrides, dtype conversions, extra state."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt.catalog import checkpoint_name
from asyncckpt.loading import restore
from loading.helpers import assert_same_state, save_objects, trained

LOAD_STATE_DICT = torch.nn.Module.load_state_dict


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The class names of the modules whose ``load_state_dict`` runs (torch's own, counted)."""
    calls: list[str] = []

    def counted(self: torch.nn.Module, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(type(self).__name__)
        return LOAD_STATE_DICT(self, state_dict, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", counted)
    yield calls


def many_layers(count: int, *, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(count)])


def test_a_module_read_wholly_in_place_is_not_loaded_again(tmp_path: Path, loads: list[str]) -> None:
    model, optimizer = trained(seed=0)
    save_objects(tmp_path, 4, model, optimizer)
    fresh, fresh_optimizer = trained(seed=1)
    pointers = [p.data_ptr() for p in fresh.parameters()]
    versions = [p._version for p in fresh.parameters()]
    result = restore(tmp_path, {"model": fresh, "optimizer": fresh_optimizer})
    assert loads == []  # neither the model nor (it is no Module) the optimizer through Module's
    assert_same_state(fresh.state_dict(), model.state_dict())
    assert [p.data_ptr() for p in fresh.parameters()] == pointers
    assert [p._version for p in fresh.parameters()] == versions  # nothing copied onto itself
    assert_same_state(fresh_optimizer.state_dict()["state"], optimizer.state_dict()["state"])
    assert result.state["model"]["0.weight"].data_ptr() == fresh[0].weight.data_ptr()
    loss = fresh(torch.randn(2, 4)).sum()  # the module still trains
    loss.backward()
    fresh_optimizer.step()


def test_many_submodules_restore_in_place(tmp_path: Path, loads: list[str]) -> None:
    saved = many_layers(300, seed=0)
    save_objects(tmp_path, 1, saved, torch.optim.SGD(saved.parameters(), lr=0.1))
    fresh = many_layers(300, seed=1)
    restore(tmp_path, {"model": fresh})
    assert loads == []
    assert_same_state(fresh.state_dict(), saved.state_dict())


class Hooked(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        self.seen: list[str] = []
        self.register_load_state_dict_post_hook(lambda module, keys: self.seen.append("post"))


class Custom(torch.nn.Linear):
    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        state_dict[prefix + "bias"] = state_dict[prefix + "bias"] + 1  # a module's own conversion
        super()._load_from_state_dict(state_dict, prefix, *args)


class WithExtra(torch.nn.Linear):
    def get_extra_state(self) -> Any:
        return {"scale": 2}

    def set_extra_state(self, state: Any) -> None:
        self.extra = state


def test_hooks_overrides_and_extra_state_still_load(tmp_path: Path, loads: list[str]) -> None:
    torch.manual_seed(0)
    models: dict[str, torch.nn.Module] = {
        "hooked": Hooked(),
        "custom": Custom(4, 2),
        "extra": WithExtra(4, 2),
        "norm": torch.nn.BatchNorm1d(3),  # overrides _load_from_state_dict
    }
    state = {name: model.state_dict() for name, model in models.items()}
    asyncckpt.save(tmp_path / checkpoint_name(2), dict(models), step=2)
    fresh = {
        "hooked": Hooked(),
        "custom": Custom(4, 2),
        "extra": WithExtra(4, 2),
        "norm": torch.nn.BatchNorm1d(3),
    }
    restore(tmp_path, fresh)
    assert sorted(loads) == ["BatchNorm1d", "Custom", "Hooked", "WithExtra"]
    assert fresh["hooked"].seen == ["post"]
    assert_same_state(fresh["custom"].bias, state["custom"]["bias"] + 1)
    assert fresh["extra"].extra == {"scale": 2}
    assert_same_state(fresh["norm"].state_dict(), state["norm"])


def test_a_method_replaced_on_an_instance_still_loads(tmp_path: Path, loads: list[str]) -> None:
    model, optimizer = trained(seed=0)
    save_objects(tmp_path, 4, model, optimizer)
    fresh = trained(seed=1)[0]
    seen: list[str] = []
    plain = fresh[0]._load_from_state_dict

    def patched(*args: Any) -> None:
        seen.append("patched")
        plain(*args)

    fresh[0]._load_from_state_dict = patched  # type: ignore[method-assign]
    restore(tmp_path, {"model": fresh})
    assert loads == ["Sequential"] and seen == ["patched"]
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_a_dtype_conversion_still_loads(tmp_path: Path, loads: list[str]) -> None:
    model, optimizer = trained(seed=0)
    save_objects(tmp_path, 4, model, optimizer)
    fresh = trained(seed=1)[0].double()  # float64 live tensors: nothing is read in place
    restore(tmp_path, {"model": fresh})
    assert loads == ["Sequential"]
    assert_same_state(fresh.state_dict(), {k: v.double() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("bit", ["conj", "neg"])
def test_a_live_state_tensor_with_a_view_bit_is_not_read_in_place(tmp_path: Path, bit: str) -> None:
    """A conjugate or negative view keeps its values transformed: the file's bytes read into its
    memory would not be its values (and torch cannot view it as bytes). Such a live tensor is
    replaced by ``load_state_dict`` like any tensor that does not fit; the restore loads."""
    weight = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    saved = torch.randn(3, dtype=torch.complex64)
    optimizer.state[weight]["momentum_buffer"] = saved.clone()
    asyncckpt.save(tmp_path / checkpoint_name(4), {"optimizer": optimizer}, step=4)
    fresh = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    base = torch.ones(3, dtype=torch.complex64)
    live = base.conj() if bit == "conj" else torch._neg_view(base)
    fresh.state[weight]["momentum_buffer"] = live
    restore(tmp_path, {"optimizer": fresh})
    loaded = fresh.state[weight]["momentum_buffer"]
    assert torch.equal(loaded.resolve_conj().resolve_neg(), saved)
    assert torch.equal(base, torch.ones(3, dtype=torch.complex64))  # the view's memory untouched
