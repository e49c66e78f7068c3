"""DCP's state dicts built from names learned once per structure (asyncckpt.dist.dicts) equal
what DCP's get_model_state_dict / get_optimizer_state_dict return, and the names are learned
again whenever the structure changes."""

from __future__ import annotations

from pathlib import Path

import dicts_workers as dw
import pytest
import torch
from dist_harness import RankResult, run_world
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from asyncckpt.dist.dicts import StateDicts
from asyncckpt.testing import states_equal

pytestmark = pytest.mark.timeout(180)


def values(results: list[RankResult]) -> list[dict]:
    for result in results:
        assert result.ok, f"rank {result.rank} (exit {result.exitcode}): {result.error}: {result.message}"
    return [result.value for result in results]


def no_differences(found: dict) -> None:
    assert all(difference is None for difference in found.values()), found


def test_ddp_module_and_optimizer_with_several_groups_match_dcp() -> None:
    for rank in values(run_world(dw.ddp_matches_dcp, 2, deadline=120)):
        no_differences(rank["differences"])
        assert rank["learned"] == 2  # once for the model, once for the optimizer
        assert rank["keys"][0] == "0.weight"  # DDP's "module." prefix removed, as DCP does


def test_checkpointer_reuses_its_plans_until_a_param_group_is_added(tmp_path: Path) -> None:
    for rank in values(run_world(dw.ddp_reuses_its_plans, 2, str(tmp_path), deadline=150)):
        hits, misses, learned = rank["counts"][0]
        assert (hits, misses, learned) == (2, 1, 2)  # steps 2 and 3 reuse step 1's structure and names
        hits, misses, learned = rank["counts"][1]
        assert (misses, learned) == (2, 3)  # the new group: a new structure, the optimizer learned again
        assert rank["step"] == 4
        assert states_equal(rank["restored"], rank["saved"])


def test_fsdp2_dtensors_match_dcp_from_learned_names() -> None:
    for rank in values(run_world(dw.fsdp_matches_dcp, 2, deadline=120)):
        no_differences(rank["differences"])
        assert rank["learned"] == 2  # once for the model, once for the optimizer
        assert rank["learned names"]


def test_plain_module_and_several_groups_match_dcp() -> None:
    net = dw.model()
    optimizer = dw.two_groups(net)
    dw.train(net, optimizer)
    dicts = StateDicts()

    found = dw.compare(dicts, net, optimizer)

    no_differences(found["differences"])
    assert found["learned"] == 2
    assert dicts.learned_names("model") and dicts.learned_names("optimizer")


def test_optimizer_before_its_first_step_goes_to_dcp_then_is_learned() -> None:
    net = dw.model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    dicts = StateDicts()

    ours = dicts.optimizer("optimizer", net, optimizer)  # DCP's: it initializes the state
    assert dicts.learned == 0
    assert dw.same(ours, get_optimizer_state_dict(net, optimizer)) is None
    assert len(ours["state"]) == len(list(net.parameters()))

    again = dicts.optimizer("optimizer", net, optimizer)
    assert dicts.learned == 1
    assert dw.same(again, get_optimizer_state_dict(net, optimizer)) is None


def test_a_new_param_group_is_learned_again() -> None:
    net = dw.model()
    params = list(net.parameters())
    optimizer = torch.optim.Adam(params[:2], lr=1e-2)
    dw.train(net, optimizer)
    dicts = StateDicts()
    dicts.optimizer("optimizer", net, optimizer)
    dicts.optimizer("optimizer", net, optimizer)
    assert dicts.learned == 1

    optimizer.add_param_group({"params": params[2:], "lr": 1e-3})
    dw.train(net, optimizer)
    ours = dicts.optimizer("optimizer", net, optimizer)

    assert dicts.learned == 2
    assert dw.same(ours, get_optimizer_state_dict(net, optimizer)) is None
    assert len(ours["param_groups"]) == 2 and len(ours["state"]) == len(params)


def test_parameters_swapped_between_names_are_learned_again() -> None:
    net = dw.model()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    dw.train(net, optimizer)
    dicts = StateDicts()
    before = dicts.optimizer("optimizer", net, optimizer)
    assert dicts.learned == 1

    # The same keys, the same optimizer and parameter objects, under each other's names.
    net[0].bias, net[3][0].bias = net[3][0].bias, net[0].bias
    ours = dicts.optimizer("optimizer", net, optimizer)

    assert dicts.learned == 2
    assert dw.same(ours, get_optimizer_state_dict(net, optimizer)) is None
    assert ours["state"]["0.bias"] is before["state"]["3.0.bias"]


def test_a_new_module_object_with_the_same_keys_is_learned_again() -> None:
    dicts = StateDicts()
    first, second = dw.model(), dw.model()
    assert dw.same(dicts.model("model", first), get_model_state_dict(first)) is None
    assert dw.same(dicts.model("model", second), get_model_state_dict(second)) is None  # not first's
    assert dicts.learned == 2


def test_state_dict_replaced_on_the_object_goes_to_dcp() -> None:
    net = dw.model()
    only = torch.ones(2)
    net.state_dict = lambda *args, **kwargs: {"only": only}  # type: ignore[method-assign]
    dicts = StateDicts()
    for _ in range(2):
        assert dw.same(dicts.model("model", net), {"only": only}) is None
    assert dicts.learned == 0
