"""Expect checks: a checkpoint that does not fit the expected state is incompatible; dtypes only noted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asyncckpt.errors import (
    NoValidCheckpointError,
)
from asyncckpt.loading import (
    load_latest,
)

from .helpers import make_state, save_objects, trained, write


def test_expect_lists_every_mismatch(tmp_path: Path) -> None:
    write(tmp_path, 100)
    changed = make_state(200, width=6)
    del changed["model"]["layers.1.weight"]
    changed["model"]["extra.bias"] = torch.zeros(3)
    write(tmp_path, 200, changed)
    result = load_latest(tmp_path, expect=make_state(0))
    assert (result.step, result.source) == (100, "fallback")
    [diagnostic] = result.diagnostics
    assert diagnostic.kind == "incompatible"
    assert "5 mismatches" in diagnostic.reason
    assert "shape of model.layers.0.weight is [6, 4] in the checkpoint, [8, 4] expected" in diagnostic.reason
    assert "shape of model.layers.0.bias is [6] in the checkpoint, [8] expected" in diagnostic.reason
    assert (
        "shape of optimizer.state.0.exp_avg is [6, 4] in the checkpoint, [8, 4] expected" in diagnostic.reason
    )
    assert "missing model.layers.1.weight" in diagnostic.reason
    assert "unexpected model.extra.bias" in diagnostic.reason


def test_expect_reports_dtype_differences_without_failing(tmp_path: Path) -> None:
    write(tmp_path, 100)
    expected = make_state(0)
    expected["model"]["layers.0.bias"] = expected["model"]["layers.0.bias"].double()
    result = load_latest(tmp_path, expect=expected)
    assert (result.step, result.source) == (100, "primary")
    assert "dtype differences" in result.summary
    assert "model.layers.0.bias is float32 in the checkpoint, float64 expected" in result.summary


def test_expect_is_scoped_to_its_top_level_keys(tmp_path: Path) -> None:
    write(tmp_path, 100)
    assert load_latest(tmp_path, expect={"model": make_state(0)["model"]}).step == 100
    with pytest.raises(NoValidCheckpointError) as caught:
        load_latest(tmp_path, expect={"model": make_state(0)["model"], "ema": torch.zeros(1)})
    assert caught.value.diagnostics[0].reason.startswith(
        "does not fit the expected state (1 mismatch: missing 'ema'"
    )


def test_expect_takes_modules_and_optimizers(tmp_path: Path) -> None:
    model, optimizer = trained(8)
    save_objects(tmp_path, 100, model, optimizer)
    fresh, fresh_opt = trained(8, seed=1, steps=0)
    assert load_latest(tmp_path, expect={"model": fresh, "optimizer": fresh_opt}).step == 100
    wide, wide_opt = trained(9, seed=1, steps=0)
    with pytest.raises(NoValidCheckpointError) as caught:
        load_latest(tmp_path, expect={"model": wide})
    assert "shape of model.0.weight is [8, 4] in the checkpoint, [9, 4] expected" in str(caught.value)
    fewer = torch.optim.Adam(list(fresh.parameters())[:2])
    with pytest.raises(
        NoValidCheckpointError, match=r"parameter groups of sizes \[4\] in the checkpoint, \[2\]"
    ):
        load_latest(tmp_path, expect={"optimizer": fewer})
