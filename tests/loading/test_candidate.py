"""Loading one candidate: legacy files; restore into modules and optimizers, straight into their
memory, on the CPU and on CUDA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt.catalog import checkpoint_name
from asyncckpt.errors import (
    NoValidCheckpointError,
)
from asyncckpt.loading import (
    load_latest,
    restore,
)

from .helpers import assert_same_state, make_state, mlp, save_objects, trained, write_steps


def test_a_newer_legacy_file_takes_part(tmp_path: Path) -> None:
    write_steps(tmp_path, 100, 200)
    legacy = {**make_state(250), "step": 250}
    torch.save(legacy, tmp_path / "model.pt")
    result = load_latest(tmp_path)
    assert (result.step, result.version, result.path.name) == (250, "0.x", "model.pt")
    assert "resuming from step 250 (legacy format 0.x" in result.summary
    assert_same_state(result.state, legacy)


def test_restore_from_a_legacy_file(tmp_path: Path) -> None:
    model, optimizer = trained()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 7}, tmp_path / "a.pt"
    )
    fresh, fresh_opt = trained(seed=1, steps=0)
    result = restore(tmp_path, {"model": fresh, "optimizer": fresh_opt})
    assert (result.step, result.version) == (7, "0.x")
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_restore_loads_modules_and_optimizers(tmp_path: Path) -> None:
    model, optimizer = trained()
    save_objects(tmp_path, 100, model, optimizer)
    fresh, fresh_opt = trained(seed=1, steps=0)
    result = restore(tmp_path, {"model": fresh, "optimizer": fresh_opt})
    assert (result.step, result.source) == (100, "primary")
    assert_same_state(fresh.state_dict(), model.state_dict())
    assert_same_state(fresh_opt.state_dict(), optimizer.state_dict())
    assert result.state["step"] == 100


def test_restore_reads_straight_into_the_module_memory(tmp_path: Path) -> None:
    model, optimizer = trained()
    save_objects(tmp_path, 100, model, optimizer)
    fresh, fresh_opt = trained(seed=1, steps=0)
    pointers = {name: p.data_ptr() for name, p in fresh.state_dict().items()}
    result = restore(tmp_path, {"model": fresh, "optimizer": fresh_opt})
    for name, tensor in fresh.state_dict().items():
        assert tensor.data_ptr() == pointers[name]
        assert result.state["model"][name].data_ptr() == pointers[name]  # no second copy was made
        assert torch.equal(tensor, model.state_dict()[name])


def test_restore_reads_straight_into_an_optimizers_existing_state(tmp_path: Path) -> None:
    model, optimizer = trained()
    save_objects(tmp_path, 100, model, optimizer)
    fresh, fresh_opt = trained(seed=1, steps=2)  # its Adam state exists: an in-process rollback
    before = {
        (i, key): value.data_ptr()
        for i, per_param in fresh_opt.state_dict()["state"].items()
        for key, value in per_param.items()
    }
    assert before
    result = restore(tmp_path, {"model": fresh, "optimizer": fresh_opt})
    after = fresh_opt.state_dict()["state"]
    for (i, key), pointer in before.items():
        assert after[i][key].data_ptr() == pointer
        assert result.state["optimizer"]["state"][i][key].data_ptr() == pointer  # no second copy
    assert_same_state(fresh_opt.state_dict(), optimizer.state_dict())
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_restore_into_an_optimizer_whose_state_dict_refuses(tmp_path: Path) -> None:
    class Unconsolidated(torch.optim.Adam):  # like ZeroRedundancyOptimizer before consolidation
        def state_dict(self) -> dict[str, Any]:
            raise RuntimeError("optimizer state has not been consolidated")

    model, optimizer = trained()
    save_objects(tmp_path, 100, model, optimizer)
    fresh, _ = trained(seed=1, steps=0)
    target = Unconsolidated(fresh.parameters())
    result = restore(tmp_path, {"model": fresh, "optimizer": target})
    assert result.step == 100
    saved = optimizer.state_dict()["state"]
    for index, param in enumerate(fresh.parameters()):
        assert torch.equal(target.state[param]["exp_avg"], saved[index]["exp_avg"])


def test_restore_checks_shapes_before_touching_the_model(tmp_path: Path) -> None:
    save_objects(tmp_path, 100, *trained(8))
    wide, wide_opt = trained(9, seed=3, steps=0)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(NoValidCheckpointError) as caught:
        restore(tmp_path, {"model": wide, "optimizer": wide_opt})
    [diagnostic] = caught.value.diagnostics
    assert diagnostic.kind == "incompatible"
    assert "shape of model.0.weight is [8, 4] in the checkpoint, [9, 4] expected" in diagnostic.reason
    assert_same_state(wide.state_dict(), before)


def test_restore_needs_every_object_in_the_checkpoint(tmp_path: Path) -> None:
    model, optimizer = trained()
    save_objects(tmp_path, 100, model, optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    with pytest.raises(NoValidCheckpointError, match="missing 'scheduler'"):
        restore(tmp_path, {"model": model, "scheduler": scheduler})


def test_restore_keeps_tied_weights_tied(tmp_path: Path) -> None:
    def tied(seed: int) -> torch.nn.ModuleDict:
        torch.manual_seed(seed)
        model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 4), "head": torch.nn.Linear(4, 10)})
        model["head"].weight = model["embed"].weight
        return model

    saved = tied(0)
    asyncckpt.save(tmp_path / checkpoint_name(1), {"model": saved}, step=1)
    fresh = tied(1)
    restore(tmp_path, {"model": fresh})
    assert fresh["head"].weight is fresh["embed"].weight
    assert_same_state(fresh.state_dict(), saved.state_dict())


def test_restore_converts_other_dtypes(tmp_path: Path) -> None:
    model, optimizer = trained()
    save_objects(tmp_path, 100, model, optimizer)
    fresh = mlp(seed=1).double()
    result = restore(tmp_path, {"model": fresh})
    assert result.step == 100
    for name, tensor in fresh.state_dict().items():
        assert tensor.dtype == torch.float64
        assert torch.equal(tensor, model.state_dict()[name].double())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_restore_into_a_cuda_module(tmp_path: Path) -> None:
    model, optimizer = trained()
    save_objects(tmp_path, 100, model, optimizer)
    fresh = mlp(seed=1).cuda()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    pointers = {name: p.data_ptr() for name, p in fresh.state_dict().items()}
    result = restore(tmp_path, {"model": fresh, "optimizer": fresh_opt})
    for name, tensor in fresh.state_dict().items():
        assert tensor.is_cuda and tensor.data_ptr() == pointers[name]
        assert result.state["model"][name].data_ptr() == pointers[name]
        assert torch.equal(tensor.cpu(), model.state_dict()[name])
    assert fresh_opt.state_dict()["state"][0]["exp_avg"].is_cuda
    loaded = load_latest(tmp_path, map_location="cuda")
    assert loaded.state["model"]["0.weight"].is_cuda
