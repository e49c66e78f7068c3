"""saving/streaming.py: a state larger than the staging budget streams through it and stays consistent.

Every test takes the state's values at ``save()`` (what the file must hold), then goes on
training at once: optimizer steps (which the step hook makes wait) and forward passes that change
buffers in place (which ``save()`` must have copied before it returned).
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import asyncckpt
from asyncckpt import AsyncCheckpointer, CheckpointWriteError
from asyncckpt.errors import UsageError
from asyncckpt.saving.buffers import RingBuffers, StagingPool
from asyncckpt.saving.snapshot import flatten
from asyncckpt.saving.staging import StagingRaceError
from asyncckpt.saving.streaming import StreamedCopy, _cut, _cuts, stage_streamed
from asyncckpt.testing import FaultyOps


def make_model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.BatchNorm1d(256),  # running stats: forward changes them in place
        torch.nn.Linear(256, 256),
        torch.nn.BatchNorm1d(256),
        torch.nn.Linear(256, 64),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(8, 64)).square().mean().backward()
    optimizer.step()


def values_now(state: dict[str, Any]) -> dict[str, Any]:
    return {name: _clone(obj.state_dict()) for name, obj in state.items()}


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_clone(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def state_bytes(state: dict[str, Any]) -> int:
    return flatten(state).nbytes


@pytest.mark.parametrize("fraction", [4, 16])
@pytest.mark.parametrize("overlap", [True, False])
def test_a_state_streamed_through_a_fraction_of_its_size_is_the_state_at_save(
    tmp_path: Path, fraction: int, overlap: bool, assert_same_state: Any
) -> None:
    model, optimizer = make_model()
    state = {"model": model, "optimizer": optimizer}
    train_step(model, optimizer)
    budget = max(state_bytes(state) // fraction, 64 << 10)
    expected, paths = [], []
    with AsyncCheckpointer(tmp_path, keep_last=10, staging_budget=budget, overlap=overlap) as ckpt:
        for step in range(1, 4):
            expected.append(values_now(state))
            handle = ckpt.save(step, state)
            train_step(model, optimizer)  # forward changes the BN buffers; the step waits for the copy
            paths.append(handle.result(timeout=60))
        stats = ckpt.stats()
    assert stats.staging_bytes <= budget and stats.staging_allocations == 1
    for want, path in zip(expected, paths, strict=True):
        assert path is not None
        assert_same_state(want, asyncckpt.load(path).state)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(300_000, dtype=torch.float32),  # contiguous: cut into byte ranges
        lambda: torch.arange(300_000, dtype=torch.float64).view(600, 500).t(),  # rows of the transpose
        lambda: torch.arange(4 * 70_000, dtype=torch.int16).view(4, 70_000)[:, ::2],  # a row > the limit
        lambda: torch.arange(120_000, dtype=torch.float32)[10:110_010],  # a view with an offset
    ],
)
def test_a_tensor_larger_than_a_half_is_cut_into_parts_that_add_up(make: Any) -> None:
    tensor = make()
    limit = 64 << 10
    parts = list(_cuts(tensor, limit))
    got = torch.cat([_cut(tensor, cut).contiguous().reshape(-1).view(torch.uint8) for _, _, cut, _ in parts])
    want = tensor.contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(got, want)
    starts = [start for start, _, _, _ in parts]
    assert starts == [sum(n for _, n, _, _ in parts[:i]) for i in range(len(parts))]
    assert all(nbytes <= limit for _, nbytes, _, _ in parts[:-1]) or tensor.dim() > 1


def test_single_large_tensors_round_trip(tmp_path: Path, assert_same_state: Any) -> None:
    state = {
        "flat": torch.randn(200_000),
        "t": torch.randn(300, 400).t(),
        "stepped": torch.randn(4, 50_000)[:, ::2],
        "small": torch.ones(3),
        "empty": torch.empty(0, 4),
    }
    with AsyncCheckpointer(tmp_path, staging_budget=128 << 10) as ckpt:
        path = ckpt.save(1, state).result(timeout=60)
        assert ckpt.stats().staging_bytes <= 128 << 10
    assert path is not None
    assert_same_state(state, asyncckpt.load(path).state)


def test_a_state_that_fits_the_budget_gets_a_full_buffer_set(tmp_path: Path) -> None:
    pool = StagingPool(1, pin_memory=False, budget=1 << 20)
    small = flatten({"w": torch.ones(1000)})
    large = flatten({"w": torch.ones(1 << 19)})
    assert not isinstance(pool.try_acquire(small.layout_key()), RingBuffers)
    pool2 = StagingPool(1, pin_memory=False, budget=1 << 20)
    ring = pool2.try_acquire(large.layout_key())
    assert isinstance(ring, RingBuffers) and ring.nbytes <= 1 << 20


def test_the_budget_must_leave_room_to_stream(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="staging_budget must be at least 131072"):
        AsyncCheckpointer(tmp_path, staging_budget=100_000, max_pending=2)


def test_async_use_with_a_budget_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncCheckpointer(tmp_path, staging_budget=1 << 20):
            pass

    with pytest.raises(UsageError, match="staging_budget needs `with`"):
        anyio.run(main)


def test_a_failed_write_stops_the_stream_and_the_trainer_goes_on(tmp_path: Path) -> None:
    model, optimizer = make_model()
    state = {"model": model, "optimizer": optimizer}
    train_step(model, optimizer)
    disk = FaultyOps("write", err=errno.EIO, nth=3)
    with AsyncCheckpointer(tmp_path, staging_budget=64 << 10, ops=disk) as ckpt:
        handle = ckpt.save(1, state)
        train_step(model, optimizer)  # must not hang on the stopped stream
        with pytest.raises(CheckpointWriteError):
            handle.result(timeout=60)
        disk.enabled = False  # reported through the handle: the next save starts afresh
        path = ckpt.save(3, state).result(timeout=60)
    assert path is not None and asyncckpt.load(path).step == 3


def test_a_source_changed_in_place_before_its_piece_is_copied_fails_the_save() -> None:
    model, optimizer = make_model()
    train_step(model, optimizer)
    snapshot = flatten({"model": model, "optimizer": optimizer})
    deferred = frozenset(range(len(snapshot.structure.sizes)))
    ring = RingBuffers(snapshot.layout_key(), 64 << 10, pin_memory=False)
    started: list[Any] = []
    staged = stage_streamed(snapshot, ring, deferred=deferred, start=started.append)
    assert isinstance(staged, StreamedCopy) and len(staged.plan.pieces) > 2
    with torch.no_grad():
        model[4].weight.add_(1.0)  # not an optimizer step, and before its piece is copied
    copier = threading.Thread(target=started[0])
    copier.start()
    with pytest.raises(StagingRaceError):
        for _, _, then in staged._parts():  # the writer's side
            if then is not None:
                then()
    staged.settle()
    copier.join(timeout=30)
    assert staged.done() and not copier.is_alive()
