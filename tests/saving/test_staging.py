"""save/staging.py: the buffer pool, buffers laid out like the file, and the staged copy."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from asyncckpt import format as fmt
from asyncckpt.errors import UsageError
from asyncckpt.saving.fingerprint import StructureCache
from asyncckpt.saving.snapshot import flatten
from asyncckpt.saving.staging import (
    GROUP_BYTES,
    Copier,
    StagedCopy,
    StagingPool,
    StagingRaceError,
    _groups,
    stage,
)


def layout_of(state: Any) -> Any:
    return flatten(state).layout_key()


def test_pool_needs_a_slot() -> None:
    with pytest.raises(UsageError, match="max_pending must be >= 1, got 0"):
        StagingPool(0, pin_memory=False)


def test_pool_hands_out_at_most_its_slots() -> None:
    pool = StagingPool(2, pin_memory=False)
    layout = layout_of({"w": torch.ones(10)})
    first, second = pool.try_acquire(layout), pool.try_acquire(layout)

    assert first is not None and second is not None and first is not second
    assert pool.in_use == 2
    assert pool.try_acquire(layout) is None
    assert pool.acquire(layout, timeout=0.01) is None
    pool.release(first)
    assert pool.try_acquire(layout) is first and pool.in_use == 2


def test_a_waiting_acquire_gets_the_released_set() -> None:
    pool = StagingPool(1, pin_memory=False)
    layout = layout_of({"w": torch.ones(10)})
    held = pool.acquire(layout)
    assert held is not None
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(layout)))
    waiter.start()
    pool.release(held)
    waiter.join(30)
    assert got == [held]


def test_same_layout_is_reused_and_a_new_layout_reallocated() -> None:
    pool = StagingPool(1, pin_memory=False)
    small, large = layout_of({"w": torch.ones(10)}), layout_of({"w": torch.ones(5000)})
    for _ in range(3):
        buffers = pool.acquire(small)
        assert buffers is not None
        pool.release(buffers)
    assert pool.allocations == 1
    small_bytes = pool.nbytes

    buffers = pool.acquire(large)
    assert buffers is not None and buffers.layout == large
    assert pool.allocations == 2 and pool.nbytes > small_bytes
    assert pool.nbytes == buffers.nbytes  # the old set was dropped, not kept besides


def test_buffers_are_laid_out_like_the_file() -> None:
    snapshot = flatten(
        {"a": torch.ones(3), "b": torch.zeros(5000, dtype=torch.int16), "c": torch.tensor(2.0)}
    )
    pool = StagingPool(1, pin_memory=False)
    buffers = pool.acquire(snapshot.layout_key())
    assert buffers is not None

    file_offsets, end = fmt.blob_offsets([blob.nbytes for blob in snapshot.blobs])
    assert buffers.offsets == [offset - fmt.DATA_OFFSET for offset in file_offsets]
    assert buffers.sizes == [12, 10000, 4]
    assert all(offset % 4096 == 0 for offset in buffers.offsets)
    assert buffers.nbytes == end - fmt.DATA_OFFSET
    for destination, blob in zip(buffers.destinations, snapshot.blobs, strict=True):
        assert destination.dtype == blob.tensor.dtype and destination.shape == blob.tensor.shape


def test_stage_copies_every_blob_and_leaves_the_padding_zero() -> None:
    state = {
        "a": torch.arange(3.0),
        "t": torch.arange(12, dtype=torch.int64).view(3, 4).t(),
        "e": torch.empty(0),
    }
    snapshot = flatten(state)
    pool = StagingPool(1, pin_memory=False)
    buffers = pool.acquire(snapshot.layout_key())
    assert buffers is not None

    staged = stage(snapshot, buffers)

    assert staged.done() and staged.background_done()
    views = list(staged.blob_bytes())
    assert [bytes(view) for view in views] == [
        bytes(fmt.tensor_bytes(blob.tensor.contiguous())) for blob in snapshot.blobs
    ]
    used = sum(buffers.sizes)
    assert int(buffers.data.count_nonzero()) <= used
    padding = buffers.data[buffers.sizes[0] : buffers.offsets[1]]
    assert not padding.any()


def test_stage_without_a_copier_copies_deferred_blobs_at_once() -> None:
    snapshot = flatten({"w": torch.ones(8)})
    pool = StagingPool(1, pin_memory=False)
    buffers = pool.acquire(snapshot.layout_key())
    assert buffers is not None

    staged = stage(snapshot, buffers, deferred={0})

    assert staged.deferred == [] and staged.done()
    assert torch.equal(buffers.destinations[0], torch.ones(8))


def test_a_background_copy_publishes_each_blob_and_the_guard_waits() -> None:
    state = {"a": torch.ones(4), "b": torch.full((4,), 2.0)}
    snapshot = flatten(state)
    pool = StagingPool(1, pin_memory=False)
    buffers = pool.acquire(snapshot.layout_key())
    assert buffers is not None
    copier = Copier()
    try:
        staged = stage(snapshot, buffers, deferred={1}, copier=copier)
        staged.guard()  # the trainer's optimizer step waits here
        assert staged.background_done() and staged.done()
        staged.wait()
        assert torch.equal(buffers.destinations[1], state["b"])
    finally:
        copier.close()


def test_a_source_changed_before_its_copy_fails_the_staged_copy() -> None:
    source = torch.ones(4)
    buffers = StagingPool(1, pin_memory=False).acquire(flatten({"w": source}).layout_key())
    assert buffers is not None
    staged = StagedCopy(buffers, [0])
    staged.watch([(source,)])
    source.add_(1.0)  # after stage() noted the version, before the copier ran

    staged.run_deferred([staged.buffers.destinations[0]], [source])

    assert staged.background_done()
    with pytest.raises(StagingRaceError) as info:
        staged.wait_blob(0)
    assert info.value.blob == 0
    with pytest.raises(StagingRaceError):
        staged.wait()
    staged.guard()  # the trainer's hook only waits: the writer reports the failure


def test_background_copies_are_published_in_groups() -> None:
    assert list(_groups([])) == []
    assert list(_groups([1, 2, 3])) == [(0, 3)]
    half = GROUP_BYTES // 2
    assert list(_groups([half, half, half, 1, GROUP_BYTES])) == [(0, 2), (2, 5)]
    assert list(_groups([GROUP_BYTES, 1])) == [(0, 1), (1, 2)]


def test_every_blob_deferred_reuses_the_checks_versions_and_the_cached_groups() -> None:
    state = {"a": torch.ones(4), "b": torch.full((3,), 2.0), "c": torch.zeros(2, 2)}
    cache = StructureCache()
    cache.snapshot(state)
    snapshot, _ = cache.snapshot(state)  # cached: the check read the version counters
    assert snapshot.versions is not None
    buffers = StagingPool(1, pin_memory=False).acquire(snapshot.layout_key())
    assert buffers is not None
    copier = Copier()
    try:
        with copier.held():  # the copies start when the block ends
            staged = stage(snapshot, buffers, deferred={0, 1, 2}, copier=copier)
            assert staged._versions is snapshot.versions  # not remapped blob by blob
            assert staged.groups is buffers.plan[2].later_groups == [(0, 3)]  # computed once
            state["b"].add_(1.0)  # changed after save() noted its version: the copy must fail
        with pytest.raises(StagingRaceError) as info:
            staged.wait()
        assert info.value.blob == 1
        assert torch.equal(buffers.destinations[0], state["a"])
        again = stage(cache.snapshot(state)[0], buffers, deferred={0, 1, 2}, copier=copier)
        again.wait()
        assert again.groups is staged.groups
        assert all(torch.equal(buffers.destinations[i], state[k]) for i, k in enumerate("abc"))
    finally:
        copier.close()
