"""Overlapped staging: parameters and optimizer state are copied while the trainer runs on.

The copier is gated so that each test decides when the background copy may run: nothing here
depends on thread timing.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt import AsyncCheckpointer, CheckpointWriteError
from asyncckpt.format import tensor_bytes
from asyncckpt.overlap import step_guarded_blobs
from asyncckpt.snapshot import flatten
from asyncckpt.staging import Copier, StagedCopy, StagingPool, stage


class GatedCopier(Copier):
    """A copier whose background copies start only once ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.staged: list[StagedCopy] = []

    def submit(
        self, staged: StagedCopy, destinations: list[torch.Tensor], sources: list[torch.Tensor]
    ) -> None:
        self.staged.append(staged)
        super().submit(staged, destinations, sources)

    def run(self, staged: StagedCopy, destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        self.gate.wait()
        super().run(staged, destinations, sources)

    def close(self) -> None:
        self.gate.set()
        super().close()


def trainer(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    train_step(model, optimizer)  # creates Adam's state
    return model, optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(8, 16)).square().mean().backward()
    optimizer.step()


def snapshot_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()],
    }


def saved_matches(path: Path, expected: dict[str, Any]) -> bool:
    state = asyncckpt.load(path).state
    model_ok = all(torch.equal(state["model"][k], v) for k, v in expected["model"].items())
    moments = [state["optimizer"]["state"][i] for i in sorted(state["optimizer"]["state"])]
    optim_ok = all(
        torch.equal(saved[k], v)
        for saved, want in zip(moments, expected["optimizer"], strict=True)
        for k, v in want.items()
    )
    return model_ok and optim_ok


@pytest.fixture
def copier() -> GatedCopier:
    return GatedCopier()


def open_checkpointer(directory: Path, copier: Copier, **options: Any) -> AsyncCheckpointer:
    ckpt = AsyncCheckpointer(directory, keep_last=10, **options)
    ckpt._copier = copier  # the seam: tests decide when background copies run
    return ckpt


def test_save_returns_before_parameters_are_copied_and_the_step_waits(
    tmp_path: Path, copier: GatedCopier
) -> None:
    model, optimizer = trainer()
    expected = snapshot_of(model, optimizer)
    seen: dict[str, bool] = {}

    def open_gate_before_the_guard(*_: Any) -> None:
        # Registered before asyncckpt's own pre-hook, so it runs first: the copy is still
        # pending when the step begins, and asyncckpt's hook must wait for it.
        seen["copied_when_step_began"] = copier.staged[-1].background_done()
        copier.gate.set()

    optimizer.register_step_pre_hook(open_gate_before_the_guard)
    with open_checkpointer(tmp_path, copier) as ckpt:
        handle = ckpt.save(1, {"model": model, "optimizer": optimizer})
        assert not handle.done()
        assert copier.staged and copier.staged[-1].deferred  # parameters went to the copier
        train_step(model, optimizer)  # overwrites every parameter and moment
        path = handle.result(timeout=30)
    assert seen == {"copied_when_step_began": False}
    assert path is not None and saved_matches(path, expected)
    assert not saved_matches(path, snapshot_of(model, optimizer))  # the step did change them


def test_buffers_and_plain_tensors_are_copied_before_save_returns(
    tmp_path: Path, copier: GatedCopier
) -> None:
    model, optimizer = trainer()
    extra = {"ema": torch.arange(10.0)}
    running_mean = model[1].running_mean.clone()
    with open_checkpointer(tmp_path, copier) as ckpt:
        handle = ckpt.save(1, {"model": model, "optimizer": optimizer, "extra": extra})
        model(torch.randn(8, 16))  # forward updates BatchNorm's running statistics in place
        extra["ema"].mul_(2)
        copier.gate.set()
        path = handle.result(timeout=30)
    state = asyncckpt.load(path).state
    assert torch.equal(state["model"]["1.running_mean"], running_mean)
    assert not torch.equal(model[1].running_mean, running_mean)
    assert torch.equal(state["extra"]["ema"], torch.arange(10.0))


def test_changing_a_parameter_before_its_copy_fails_the_save_loudly(
    tmp_path: Path, copier: GatedCopier
) -> None:
    model, optimizer = trainer()
    with open_checkpointer(tmp_path, copier) as ckpt:
        first = ckpt.save(1, {"model": model, "optimizer": optimizer})
        copier.gate.set()
        first.result(timeout=30)
        copier.gate.clear()
        handle = ckpt.save(2, {"model": model, "optimizer": optimizer})
        with torch.no_grad():
            model[0].weight.add_(1.0)  # not through optimizer.step(): nothing waits for the copy
        copier.gate.set()
        with pytest.raises(CheckpointWriteError, match=r"model\.0\.weight was changed in place.*wait_staged"):
            handle.result(timeout=30)
        ckpt.flush()  # the failure was reported through the handle, and only there
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [1]
    assert not list(tmp_path.glob(".*tmp*"))


def test_wait_staged_lets_the_trainer_change_parameters_safely(tmp_path: Path, copier: GatedCopier) -> None:
    model, optimizer = trainer()
    expected = snapshot_of(model, optimizer)
    with open_checkpointer(tmp_path, copier) as ckpt:
        handle = ckpt.save(1, {"model": model, "optimizer": optimizer})
        opener = threading.Thread(target=copier.gate.set)
        opener.start()
        ckpt.wait_staged()  # returns only once the gated copy ran
        opener.join()
        assert copier.staged[-1].deferred and handle.path is not None
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()  # e.g. swapping in EMA weights for evaluation
        path = handle.result(timeout=30)
    assert saved_matches(path, expected)


def test_overlap_off_copies_everything_before_save_returns(tmp_path: Path, copier: GatedCopier) -> None:
    model, optimizer = trainer()
    expected = snapshot_of(model, optimizer)
    with open_checkpointer(tmp_path, copier, overlap=False) as ckpt:
        handle = ckpt.save(1, {"model": model, "optimizer": optimizer})
        with torch.no_grad():
            for param in model.parameters():
                param.add_(1.0)
        path = handle.result(timeout=30)  # the gate is never opened: nothing went to the copier
    assert copier.staged == []
    assert saved_matches(path, expected)


def test_state_dicts_without_optimizer_objects_are_copied_at_once(
    tmp_path: Path, copier: GatedCopier
) -> None:
    model, optimizer = trainer()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    expected = snapshot_of(model, optimizer)
    with open_checkpointer(tmp_path, copier) as ckpt:
        handle = ckpt.save(1, state)
        train_step(model, optimizer)
        path = handle.result(timeout=30)
    assert copier.staged == []
    assert saved_matches(path, expected)


def test_guarded_blobs_are_the_optimizers_parameters_and_state() -> None:
    model, optimizer = trainer()
    snapshot = flatten({"model": model, "optimizer": optimizer})
    guarded = step_guarded_blobs(snapshot, [optimizer])
    keys = {t.key for t in snapshot.tensors if t.blob in guarded}
    params = {f"model.{name}" for name, _ in model.named_parameters()}
    buffers = {f"model.{name}" for name, _ in model.named_buffers()}
    assert params <= keys
    assert not buffers & keys
    assert {k for k in keys if k.startswith("optimizer.state.")} == {
        t.key for t in snapshot.tensors if t.key.startswith("optimizer.state.")
    }
    assert step_guarded_blobs(snapshot, []) == frozenset()


def test_the_writer_gets_eager_blobs_while_the_background_copy_waits(copier: GatedCopier) -> None:
    model, optimizer = trainer()
    snapshot = flatten(
        {"extra": {"a": torch.ones(3), "b": torch.arange(5)}, "model": model, "optimizer": optimizer}
    )
    guarded = step_guarded_blobs(snapshot, [optimizer])
    pool = StagingPool(1, pin_memory=False)
    buffers = pool.acquire(snapshot.layout_key())
    assert buffers is not None
    staged = stage(snapshot, buffers, deferred=guarded, copier=copier)
    first_guarded = min(guarded)
    assert first_guarded == 2  # the two extras come first and were copied by stage()
    blobs = staged.blob_bytes()
    ready = [next(blobs) for _ in range(first_guarded)]  # the gate is shut: these did not wait
    copier.gate.set()
    rest = list(blobs)
    staged.wait()
    assert len(ready) + len(rest) == len(snapshot.blobs)
    for index, blob in enumerate(snapshot.blobs):
        assert bytes(buffers.blob_bytes()[index]) == bytes(tensor_bytes(blob.tensor.contiguous()))
    copier.close()
