"""What restore does once instead of per check (issue 16): each module's ``state_dict()`` once
per restore (again only after a ``load_state_dict`` ran), the collector paused over a candidate,
and an optimizer's saved parameter ids looked up by set in torch's ``load_state_dict``. None of
it may change what a restore loads or refuses."""

from __future__ import annotations

import copy
import gc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt.catalog import checkpoint_name
from asyncckpt.loading import restore
from asyncckpt.loading.modules import LiveModules
from asyncckpt.loading.optimizers import ParamIds, optimizer_state

from .helpers import assert_same_state, mlp, trained


class Counted(torch.nn.Sequential):
    """A Sequential that counts its ``state_dict()`` calls (loading stays torch's default)."""

    calls = 0

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        Counted.calls += 1
        return super().state_dict(*args, **kwargs)


def counted(seed: int) -> Counted:
    torch.manual_seed(seed)
    return Counted(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


class Flaky:
    """An object whose ``load_state_dict`` refuses a state that says ``fail``; records whether
    the collector ran while it loaded."""

    def __init__(self) -> None:
        self.collector_on: list[bool] = []

    def state_dict(self) -> dict[str, Any]:
        return {"fail": False}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.collector_on.append(gc.isenabled())
        if state["fail"]:
            raise ValueError("this state says fail")


def save(directory: Path, step: int, model: torch.nn.Module, optimizer: Any, *, fail: bool) -> None:
    state = {"model": model, "optimizer": optimizer, "extra": {"fail": fail}}
    asyncckpt.save(directory / checkpoint_name(step), state, step=step)


def test_a_module_state_dict_is_taken_once_per_restore(tmp_path: Path) -> None:
    model = counted(0)
    optimizer = torch.optim.Adam(model.parameters())
    save(tmp_path, 1, model, optimizer, fail=False)
    fresh = counted(1)
    Counted.calls = 0

    restore(tmp_path, {"model": fresh, "optimizer": torch.optim.Adam(fresh.parameters()), "extra": Flaky()})

    assert Counted.calls == 1  # expected keys, live checks and in-place targets share one
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_after_a_candidate_fails_in_load_state_dict_the_modules_are_looked_at_again(tmp_path: Path) -> None:
    model = counted(0)
    optimizer = torch.optim.Adam(model.parameters())
    save(tmp_path, 1, model, optimizer, fail=False)
    newer = counted(2)
    save(tmp_path, 2, newer, torch.optim.Adam(newer.parameters()), fail=True)
    fresh, extra = counted(1), Flaky()
    Counted.calls = 0

    result = restore(
        tmp_path, {"model": fresh, "optimizer": torch.optim.Adam(fresh.parameters()), "extra": extra}
    )

    assert result.step == 1 and result.source == "fallback"
    assert "extra.load_state_dict refused" in result.diagnostics[0].reason
    assert Counted.calls == 2  # step 2's load_state_dict calls may have changed the modules
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_a_candidate_is_loaded_with_the_collector_paused(tmp_path: Path) -> None:
    model, optimizer = trained(seed=0)
    save(tmp_path, 1, model, optimizer, fail=False)
    fresh, fresh_optimizer = trained(seed=1)
    extra = Flaky()
    assert gc.isenabled()

    restore(tmp_path, {"model": fresh, "optimizer": fresh_optimizer, "extra": extra})

    assert extra.collector_on == [False]
    assert gc.isenabled()  # resumed afterwards


def test_live_modules_are_taken_once_until_touched() -> None:
    model = counted(0)
    live = LiveModules({"model": model, "other": Flaky()})
    Counted.calls = 0

    first = live.states()
    assert live.states() is first and list(first) == ["model"]
    live.touched()
    assert live.states() is not first
    assert Counted.calls == 2


def test_param_ids_answer_in_as_the_list_would() -> None:
    ids = ParamIds([3, 1, 2])

    assert ids == [3, 1, 2] and list(ids) == [3, 1, 2] and len(ids) == 3 and ids[0] == 3
    assert 1 in ids and 2.0 in ids and True in ids  # as the list: equal numbers are in it
    assert 4 not in ids and "1" not in ids and None not in ids
    copied = copy.deepcopy({"params": ids})["params"]
    assert type(copied) is list and copied == [3, 1, 2]


def test_only_torch_own_loading_gets_param_ids() -> None:
    model, optimizer = trained(seed=0)
    saved = optimizer.state_dict()

    given = optimizer_state(optimizer, saved)
    assert given is not saved and given["state"] is saved["state"]
    assert [type(g["params"]) for g in given["param_groups"]] == [ParamIds]
    assert saved["param_groups"][0]["params"] == given["param_groups"][0]["params"]
    assert type(saved["param_groups"][0]["params"]) is list  # the caller's state is untouched

    class Own(torch.optim.SGD):
        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            super().load_state_dict(state_dict)

    own = Own(model.parameters(), lr=0.1)
    assert optimizer_state(own, saved) is saved
    patched = torch.optim.SGD(model.parameters(), lr=0.1)
    patched.load_state_dict = lambda state: None  # type: ignore[method-assign]
    assert optimizer_state(patched, saved) is saved
    odd = {**saved, "param_groups": [{**saved["param_groups"][0], "params": ["a", "b"]}]}
    assert optimizer_state(optimizer, odd) is odd


@pytest.mark.parametrize("flag", ["capturable", "foreach"])
def test_restored_optimizer_state_is_what_torch_loads(tmp_path: Path, flag: str) -> None:
    """torch casts ``step`` for a capturable group (it finds the group by the param id): the
    cast still happens, and the groups hold the live parameters in plain lists."""
    model = mlp(seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    saved["param_groups"][0][flag] = True  # (a capturable Adam only steps on an accelerator)
    for entry in saved["state"].values():
        entry["step"] = entry["step"].to(torch.float64)
    state = {"model": model.state_dict(), "optimizer": saved}
    asyncckpt.save(tmp_path / checkpoint_name(1), state, step=1)
    fresh = mlp(seed=1)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.5, **{flag: True})
    reference = copy.deepcopy(fresh_optimizer)
    reference.load_state_dict(asyncckpt.load(tmp_path / checkpoint_name(1)).state["optimizer"])

    restore(tmp_path, {"model": fresh, "optimizer": fresh_optimizer})

    steps = [entry["step"].dtype for entry in fresh_optimizer.state.values()]
    assert steps == [entry["step"].dtype for entry in reference.state.values()]
    assert steps == [torch.float32 if flag == "capturable" else torch.float64] * 4
    group = fresh_optimizer.param_groups[0]
    assert type(group["params"]) is list and group["params"] == list(fresh.parameters())
    assert group["lr"] == 0.01
    assert_same_state(fresh_optimizer.state_dict()["state"], reference.state_dict()["state"])


def test_a_refusal_is_still_an_incompatible_checkpoint(tmp_path: Path) -> None:
    model, optimizer = trained(seed=0)
    save(tmp_path, 1, model, optimizer, fail=False)
    smaller = torch.nn.Sequential(torch.nn.Linear(4, 8))

    with pytest.raises(asyncckpt.NoValidCheckpointError) as caught:
        restore(tmp_path, {"model": smaller, "optimizer": torch.optim.Adam(smaller.parameters())})

    reason = caught.value.diagnostics[0].reason
    assert "unexpected model.2.bias" in reason and "unexpected model.2.weight" in reason
    assert reason.index("model.2.bias") < reason.index("model.2.weight")  # sorted by key
    assert "parameter groups of sizes [4] in the checkpoint, [2] expected" in reason
