"""The CUDA staging path: pinned buffers, side-stream copies, optimizer pre-hook, record_stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import asyncckpt
from asyncckpt import AsyncCheckpointer
from asyncckpt.testing import states_equal

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 16)).cuda()


def test_cuda_state_round_trips_through_pinned_buffers(tmp_path: Path) -> None:
    model = _model()
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with AsyncCheckpointer(tmp_path) as ckpt:
        path = ckpt.save(1, {"model": model}).result(timeout=60)
        buffers = ckpt._pool._free[0]
        assert buffers is not None and buffers.data.is_pinned()
    assert path is not None
    loaded = asyncckpt.load(path)
    assert states_equal(loaded.state["model"], expected)
    on_gpu = asyncckpt.load(path, map_location="cuda")
    assert all(t.is_cuda for t in on_gpu.state["model"].values())


def test_optimizer_step_after_save_does_not_leak_into_the_checkpoint(tmp_path: Path) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    data = torch.randn(4096, 512, device="cuda")
    with AsyncCheckpointer(tmp_path) as ckpt:
        model(data).square().sum().backward()
        before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        handle = ckpt.save(1, {"model": model, "optimizer": optimizer})
        optimizer.step()  # the pre-hook orders this after the staging copy on the GPU
        path = handle.result(timeout=60)
    assert path is not None
    assert states_equal(asyncckpt.load(path).state["model"], before)
    after = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    assert not states_equal(after, before)


def test_freed_sources_are_not_reused_before_the_copy(tmp_path: Path) -> None:
    expected = torch.arange(1 << 22, dtype=torch.float32)
    with AsyncCheckpointer(tmp_path) as ckpt:
        source = expected.cuda()
        handle = ckpt.save(1, {"x": source})
        del source  # record_stream keeps its memory from being handed out before the copy ran
        torch.full((1 << 22,), -1.0, device="cuda")
        path = handle.result(timeout=60)
    assert path is not None
    assert torch.equal(asyncckpt.load(path).state["x"], expected)


def test_sync_save_of_cuda_tensors(tmp_path: Path) -> None:
    state = {"w": torch.randn(100, 7, device="cuda").t(), "tied": None}
    state["tied"] = state["w"]
    path = asyncckpt.save(tmp_path / "x.ckpt", state, step=3)
    loaded = asyncckpt.load(path)
    assert torch.equal(loaded.state["w"], state["w"].cpu())
    assert loaded.state["tied"] is loaded.state["w"]
