"""Overlapped staging: parameters and optimizer state are copied while the trainer runs on.

The copier is gated so that each test decides when the background copy may run: nothing here
depends on thread timing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt import AsyncCheckpointer, CheckpointWriteError
from asyncckpt.format import tensor_bytes
from asyncckpt.loading import rollback as loader
from asyncckpt.saving.overlap import modules_in, step_guarded_blobs
from asyncckpt.saving.runner import SyncRunner
from asyncckpt.saving.snapshot import flatten
from asyncckpt.saving.staging import Copier, StagedCopy, StagingPool, stage


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


def trainer(seed: int = 0) -> tuple[torch.nn.Sequential, torch.optim.Optimizer]:
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


def saved_matches(path: Path | None, expected: dict[str, Any]) -> bool:
    assert path is not None
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
def copier() -> Iterator[GatedCopier]:
    gated = GatedCopier()
    yield gated
    gated.close()  # never leave a gated worker thread behind, even after a failed assertion


@pytest.fixture
def guard_opens_gate(copier: GatedCopier, monkeypatch: pytest.MonkeyPatch) -> GatedCopier:
    """Only asyncckpt's own wait (``StagedCopy.guard``) lets the background copy run.

    A test can then tell for certain whether that wait happened: if it did not, the copy has
    not even started.
    """
    guard = StagedCopy.guard

    def open_then_guard(staged: StagedCopy) -> None:
        copier.gate.set()
        guard(staged)

    monkeypatch.setattr(StagedCopy, "guard", open_then_guard)
    return copier


class GatedCheckpointer(AsyncCheckpointer):
    """Leaving opens the gate first: a failed assertion must not leave the exit's flush
    waiting for a copy that can never start."""

    def __init__(self, directory: Path, copier: GatedCopier, **options: Any) -> None:
        super().__init__(directory, keep_last=10, **options)
        self._stager.copier = copier  # the seam: tests decide when background copies run

    def __exit__(self, *exc_info: Any) -> None:
        assert isinstance(self._stager.copier, GatedCopier)
        self._stager.copier.gate.set()
        super().__exit__(*exc_info)


def open_checkpointer(directory: Path, copier: GatedCopier, **options: Any) -> AsyncCheckpointer:
    return GatedCheckpointer(directory, copier, **options)


def test_the_copier_is_woken_after_the_writer_has_the_job(
    tmp_path: Path, copier: GatedCopier, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Woken first, the copier thread took the GIL while the trainer's hand-off to the writer
    # released it, and save() waited for it to give the GIL back.
    order: list[str] = []
    queue = copier._queue
    monkeypatch.setattr(copier, "_queue", lambda *args: (order.append("copier"), queue(*args)))
    submit = SyncRunner.submit
    monkeypatch.setattr(SyncRunner, "submit", lambda *a, **k: (order.append("writer"), submit(*a, **k)))
    model, optimizer = trainer()
    with open_checkpointer(tmp_path, copier) as ckpt:
        copier.gate.set()
        ckpt.save(1, {"model": model, "optimizer": optimizer}).result(timeout=30)
    assert order == ["writer", "copier"]


def test_save_returns_before_parameters_are_copied_and_the_step_waits(
    tmp_path: Path, guard_opens_gate: GatedCopier
) -> None:
    copier = guard_opens_gate
    model, optimizer = trainer()
    expected = snapshot_of(model, optimizer)
    seen: list[bool] = []
    with open_checkpointer(tmp_path, copier) as ckpt:
        handle = ckpt.save(1, {"model": model, "optimizer": optimizer})
        # Registered after asyncckpt's own pre-hook, so it runs after it.
        optimizer.register_step_pre_hook(lambda *_: seen.append(copier.staged[-1].background_done()))
        assert not handle.done() and not copier.staged[-1].background_done()
        assert copier.staged[-1].deferred  # parameters and moments went to the copier
        train_step(model, optimizer)  # overwrites every parameter and moment
        assert seen == [True]  # the step began only after the copy was done
        path = handle.result(timeout=30)
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


def test_wait_staged_lets_the_trainer_change_parameters_safely(
    tmp_path: Path, guard_opens_gate: GatedCopier
) -> None:
    copier = guard_opens_gate
    model, optimizer = trainer()
    expected = snapshot_of(model, optimizer)
    with open_checkpointer(tmp_path, copier) as ckpt:
        handle = ckpt.save(1, {"model": model, "optimizer": optimizer})
        ckpt.wait_staged()
        assert copier.staged[-1].deferred and copier.staged[-1].background_done()
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()  # e.g. swapping in EMA weights for evaluation
        path = handle.result(timeout=30)
    assert saved_matches(path, expected)


def test_restore_waits_for_a_pending_copy_before_loading(
    tmp_path: Path, guard_opens_gate: GatedCopier, monkeypatch: pytest.MonkeyPatch
) -> None:
    copier = guard_opens_gate
    model, optimizer = trainer()
    with open_checkpointer(tmp_path, copier) as ckpt:
        copier.gate.set()
        ckpt.save(1, {"model": model, "optimizer": optimizer}).result(timeout=30)
        train_step(model, optimizer)
        expected = snapshot_of(model, optimizer)
        copier.gate.clear()
        handle = ckpt.save(2, {"model": model, "optimizer": optimizer})
        assert not copier.staged[-1].background_done()
        restore = loader.restore
        copied_first: list[bool] = []

        def checked_restore(*args: Any, **kwargs: Any) -> Any:
            copied_first.append(copier.staged[-1].background_done())
            return restore(*args, **kwargs)

        monkeypatch.setattr(loader, "restore", checked_restore)
        result = ckpt.restore({"model": model, "optimizer": optimizer})  # an in-process rollback
        assert copied_first == [True]
        path = handle.result(timeout=30)
    # Once the copy is done the writer runs on: step 2 may or may not be committed by the time
    # the restore lists the directory; either way it restored a committed step.
    assert result is not None and result.step in (1, 2)
    assert saved_matches(path, expected)


def test_a_view_of_a_parameter_in_the_state_still_catches_changes(
    tmp_path: Path, copier: GatedCopier
) -> None:
    model, optimizer = trainer()
    state = {"model": model, "optimizer": optimizer, "extra": {"row0": model[0].weight[0]}}
    with open_checkpointer(tmp_path, copier) as ckpt:
        handle = ckpt.save(1, state)  # the weight and its row share a storage: one span blob
        assert copier.staged[-1].deferred
        with torch.no_grad():
            model[0].weight.add_(1.0)
        copier.gate.set()
        with pytest.raises(CheckpointWriteError, match="changed in place"):
            handle.result(timeout=30)
    assert asyncckpt.list_checkpoints(tmp_path) == []


def test_weights_that_forward_renormalises_are_copied_before_save_returns(
    tmp_path: Path, copier: GatedCopier
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8, max_norm=0.5), torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)

    def step() -> None:
        optimizer.zero_grad()
        model(torch.arange(50)).sum().backward()  # forward renormalises every row in place
        optimizer.step()

    step()
    with torch.no_grad():
        model[0].weight.mul_(10)  # rows longer than max_norm again
    weight = model[0].weight.detach().clone()
    with open_checkpointer(tmp_path, copier) as ckpt:
        handle = ckpt.save(1, {"model": model, "optimizer": optimizer})
        model(torch.arange(50))  # the ordinary loop: forward before the copy ran
        assert not torch.equal(model[0].weight, weight)
        copier.gate.set()
        step()
        path = handle.result(timeout=30)
    assert torch.equal(asyncckpt.load(path).state["model"]["0.weight"], weight)


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


def test_state_dicts_overlap_when_overlap_with_names_their_objects(
    tmp_path: Path, copier: GatedCopier
) -> None:
    model, optimizer = trainer()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    expected = snapshot_of(model, optimizer)
    with open_checkpointer(tmp_path, copier) as ckpt:
        handle = ckpt.save(1, state, overlap_with=[model, optimizer])
        assert len(copier.staged) == 1  # the parameters and the moments wait for the gate
        assert not copier.staged[0].background_done()
        copier.gate.set()
        train_step(model, optimizer)  # the step waits for the copy
        path = handle.result(timeout=30)
    assert saved_matches(path, expected)


def test_guarded_blobs_leave_out_embeddings_with_max_norm() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, max_norm=1.0), torch.nn.EmbeddingBag(10, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshot = flatten({"model": model, "optimizer": optimizer})
    guarded = step_guarded_blobs(snapshot, [optimizer], modules_in({"model": model}))
    assert {t.key for t in snapshot.tensors if t.blob in guarded} == {"model.1.weight"}


def test_guarded_blobs_are_the_optimizers_parameters_and_state() -> None:
    model, optimizer = trainer()
    snapshot = flatten({"model": model, "optimizer": optimizer})
    guarded = step_guarded_blobs(snapshot, [optimizer], [model])
    keys = {t.key for t in snapshot.tensors if t.blob in guarded}
    params = {f"model.{name}" for name, _ in model.named_parameters()}
    buffers = {f"model.{name}" for name, _ in model.named_buffers()}
    moments = {t.key for t in snapshot.tensors if t.key.startswith("optimizer.state.")}
    assert keys == params | moments
    assert not buffers & keys
    assert step_guarded_blobs(snapshot, [], [model]) == frozenset()
    # Parameters reached only through a plain state dict: asyncckpt cannot see which module uses
    # them (forward might change them in place), so they are copied inside save().
    plain = flatten({"model": model.state_dict(), "optimizer": optimizer})
    guarded = step_guarded_blobs(plain, [optimizer], [])
    assert {t.key for t in plain.tensors if t.blob in guarded} == moments


def test_every_optimizer_step_waits_even_one_made_after_the_save(
    tmp_path: Path, guard_opens_gate: GatedCopier
) -> None:
    copier = guard_opens_gate
    model, optimizer = trainer()
    expected = snapshot_of(model, optimizer)
    with open_checkpointer(tmp_path, copier) as ckpt:
        handle = ckpt.save(1, {"model": model, "optimizer": optimizer})
        other = torch.optim.SGD(model.parameters(), lr=0.5)  # not in the state, made afterwards
        seen: list[bool] = []
        other.register_step_pre_hook(lambda *_: seen.append(copier.staged[-1].background_done()))
        model(torch.randn(8, 16)).sum().backward()
        other.step()
        assert seen == [True]
        path = handle.result(timeout=30)
    assert saved_matches(path, expected)


def test_an_optimizer_wrapper_without_hooks_guards_nothing(tmp_path: Path, copier: GatedCopier) -> None:
    class Wrapper(torch.optim.Optimizer):  # like accelerate's: never calls Optimizer.__init__
        def __init__(self, inner: torch.optim.Optimizer) -> None:
            self.inner = inner

        def step(self, closure: Any = None) -> Any:
            return self.inner.step(closure)

        def state_dict(self) -> dict[str, Any]:
            return self.inner.state_dict()

    model, optimizer = trainer()
    expected = snapshot_of(model, optimizer)
    with open_checkpointer(tmp_path, copier) as ckpt:
        path = ckpt.save(1, {"model": model, "optimizer": Wrapper(optimizer)}).result(timeout=30)
        assert copier.staged == []  # nothing to guard: everything was copied inside save()
        train_step(model, optimizer)
        path2 = ckpt.save(2, {"model": model, "optimizer": Wrapper(optimizer)}).result(timeout=30)
    assert saved_matches(path, expected)
    assert saved_matches(path2, snapshot_of(model, optimizer))


def test_the_writer_gets_eager_blobs_while_the_background_copy_waits(copier: GatedCopier) -> None:
    model, optimizer = trainer()
    snapshot = flatten(
        {"extra": {"a": torch.ones(3), "b": torch.arange(5)}, "model": model, "optimizer": optimizer}
    )
    guarded = step_guarded_blobs(snapshot, [optimizer], [model])
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


def test_saves_without_optimizer_steps_do_not_pile_up_pending_copies(tmp_path: Path) -> None:
    model, optimizer = trainer()
    with AsyncCheckpointer(tmp_path, keep_last=2) as ckpt:
        for step in range(20):  # e.g. an evaluation loop that saves but never steps
            ckpt.save(step, {"model": model, "optimizer": optimizer}).result(timeout=30)
        assert len(ckpt._stager.guard._pending) == 1  # only the newest, whose copy has ended anyway
        assert ckpt._stager.guard._pending[0].done()
