"""Slow and stuck storage: bounded memory, when_busy honored, nothing lost, bounded close.

A writer much slower than the trainer must not make memory grow (the staging buffer sets are the
bound: ``max_pending``), must skip or wait as configured, and every save must end committed,
skipped or failed: never silently lost. Leaving the context while a write is stuck fails within
``close_timeout`` and the stuck thread never keeps the interpreter alive.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest

import asyncckpt
from asyncckpt import AsyncCheckpointer, CheckpointWriteError, SaveHandle
from asyncckpt.catalog import checkpoint_name
from asyncckpt.errors import UsageError
from asyncckpt.testing import GatedOps, SlowOps, deterministic_state, states_equal, temp_files


class StuckOps(GatedOps):
    """Writes block until ``release()``; ``unlinked`` is set once a file was removed."""

    def __init__(self) -> None:
        super().__init__()
        self.unlinked = threading.Event()

    def unlink(self, path: Path) -> None:
        super().unlink(path)
        self.unlinked.set()


def tiny(step: int) -> dict[str, object]:
    return deterministic_state(step, tensors=2, numel=64)


def test_memory_stays_bounded_by_max_pending_while_the_writer_is_stuck(
    tmp_path: Path, faults: Counter[str]
) -> None:
    ops = GatedOps()
    with AsyncCheckpointer(tmp_path, max_pending=2, when_busy="skip", ops=ops) as ckpt:
        first = [ckpt.save(step, tiny(step)) for step in (1, 2)]
        assert ops.entered.wait(30)
        bound = ckpt.stats().staging_bytes
        assert bound > 0 and ckpt.stats().staging_allocations == 2
        for step in range(3, 203):
            assert ckpt.save(step, tiny(step)).skipped
            stats = ckpt.stats()
            assert stats.staging_bytes == bound and stats.staging_allocations == 2 and stats.pending == 2
        faults["slow storage: saves skipped while the writer was stuck"] += 200
        ops.release()
        assert [h.result(timeout=30) for h in first] == [tmp_path / checkpoint_name(s) for s in (1, 2)]
        stats = ckpt.stats()
    assert (stats.committed, stats.skipped, stats.failed) == (2, 200, 0)


def test_a_slow_writer_makes_save_wait_and_memory_stays_bounded(tmp_path: Path, faults: Counter[str]) -> None:
    ops = SlowOps(delay=0.001)  # per write and fsync
    with AsyncCheckpointer(tmp_path, max_pending=2, when_busy="wait", keep_last=2, ops=ops) as ckpt:
        handles = [ckpt.save(step, tiny(step)) for step in range(30)]
        stats = ckpt.stats()
        assert stats.staging_allocations == 2
        ckpt.flush(timeout=60)
        final = ckpt.stats()
    assert all(h.result(timeout=0) is not None for h in handles)
    assert final.committed == 30 and final.skipped == 0 and final.staging_bytes == stats.staging_bytes
    assert final.waits > 0  # save() waited for a slot instead of allocating a third set
    faults["slow storage: delayed writes and fsyncs"] += ops.names().count("write") + ops.names().count(
        "fsync"
    )


def rapid_saves(directory: Path, count: int, when_busy: str, faults: Counter[str]) -> None:
    ops = SlowOps(delay=0.0005)
    states = [tiny(step) for step in range(count)]
    handles: list[SaveHandle] = []
    with AsyncCheckpointer(directory, max_pending=2, when_busy=when_busy, keep_last=2, ops=ops) as ckpt:  # type: ignore[arg-type]
        for step, state in enumerate(states):
            handles.append(ckpt.save(step, state))
        ckpt.flush(timeout=300)
        stats = ckpt.stats()
    assert all(h.done() for h in handles)
    committed = [h for h in handles if not h.skipped]
    skipped = [h for h in handles if h.skipped]
    assert all(h.result(timeout=0) == directory / checkpoint_name(h.step) for h in committed)
    assert all(h.result(timeout=0) is None for h in skipped)
    assert len(committed) + len(skipped) == count  # none lost silently
    assert (stats.committed, stats.skipped, stats.failed) == (len(committed), len(skipped), 0)
    assert stats.saves == len(committed) and stats.staging_allocations <= 2
    newest = committed[-1].step
    assert asyncckpt.list_checkpoints(directory)[-1].step == newest
    assert states_equal(asyncckpt.load(directory / checkpoint_name(newest)).state, states[newest])
    lines = (directory / "events.jsonl").read_text().splitlines()
    assert sum('"checkpoint.save.skipped"' in line for line in lines) == len(skipped)
    assert sum('"checkpoint.save.committed"' in line for line in lines) == len(committed)
    faults[f"slow storage: rapid saves ({when_busy})"] += count
    if when_busy == "wait":
        assert not skipped


def test_a_thousand_rapid_saves_all_end_committed_or_skipped(tmp_path: Path, faults: Counter[str]) -> None:
    rapid_saves(tmp_path, 1000, "skip", faults)


@pytest.mark.stress
def test_a_thousand_rapid_saves_that_wait_all_commit(tmp_path: Path, faults: Counter[str]) -> None:
    rapid_saves(tmp_path, 1000, "wait", faults)


# --------------------------------------------------------------------------- stuck storage


def test_close_with_a_stuck_write_fails_within_close_timeout(tmp_path: Path, faults: Counter[str]) -> None:
    asyncckpt.save(tmp_path / checkpoint_name(1), tiny(1), step=1)
    before = (tmp_path / checkpoint_name(1)).read_bytes()
    ops = StuckOps()
    started = time.monotonic()
    stuck = r"step 2, 3 did not finish within close_timeout=0.3 s"
    checkpointer = AsyncCheckpointer(tmp_path, max_pending=2, close_timeout=0.3, ops=ops)
    with pytest.raises(CheckpointWriteError, match=stuck), checkpointer as ckpt:
        handles = [ckpt.save(step, tiny(step)) for step in (2, 3)]
        assert ops.entered.wait(30)
        started = time.monotonic()
    elapsed = time.monotonic() - started
    faults["stuck storage: close with a write blocked"] += 1
    assert elapsed < 10, f"close took {elapsed:.1f} s"
    for handle in handles:
        with pytest.raises(CheckpointWriteError, match="abandoned"):
            handle.result(timeout=0)
    assert len(temp_files(tmp_path)) == 1  # the stuck write's, still open in its thread
    ops.release()  # the storage recovers: the abandoned write removes its temp file, publishes nothing
    assert ops.unlinked.wait(30)
    assert temp_files(tmp_path) == []
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [1]
    assert (tmp_path / checkpoint_name(1)).read_bytes() == before


def test_the_next_start_removes_the_temp_file_of_a_write_still_stuck(tmp_path: Path) -> None:
    ops = StuckOps()
    try:
        with (
            pytest.raises(CheckpointWriteError),
            AsyncCheckpointer(tmp_path, close_timeout=0, ops=ops) as ckpt,
        ):
            ckpt.save(1, tiny(1))
            assert ops.entered.wait(30)
        assert len(temp_files(tmp_path)) == 1
        with AsyncCheckpointer(tmp_path) as again:
            assert len(temp_files(tmp_path)) == 1  # opening removes nothing; the first save does
            assert again.save(2, tiny(2)).result(timeout=30) is not None
            assert temp_files(tmp_path) == []
    finally:
        ops.release()
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [2]


def test_close_timeout_leaves_finished_saves_alone(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path, close_timeout=30) as ckpt:
        handle = ckpt.save(1, tiny(1))
    assert handle.result(timeout=0) == tmp_path / checkpoint_name(1)


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_close_timeout_must_be_a_duration(tmp_path: Path, bad: float) -> None:
    with pytest.raises(UsageError, match="close_timeout"):
        AsyncCheckpointer(tmp_path, close_timeout=bad)


STUCK_FOREVER = textwrap.dedent(
    """
    import sys
    from asyncckpt import AsyncCheckpointer, CheckpointWriteError
    from asyncckpt.testing import GatedOps, deterministic_state

    ops = GatedOps()  # never released: the storage is stuck for good
    try:
        with AsyncCheckpointer(sys.argv[1], close_timeout=0.2, ops=ops) as ckpt:
            ckpt.save(1, deterministic_state(1))
            ops.entered.wait()
    except CheckpointWriteError as exc:
        print("raised:", exc, flush=True)
    """
)


def test_a_write_stuck_forever_does_not_keep_the_interpreter_alive(tmp_path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-c", STUCK_FOREVER, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    assert "raised:" in child.stdout and "abandoned" in child.stdout


async def test_async_close_with_a_stuck_write_fails_within_close_timeout(tmp_path: Path) -> None:
    ops = StuckOps()
    try:
        with anyio.fail_after(30):
            with pytest.raises(CheckpointWriteError, match="step 1 did not finish"):
                async with AsyncCheckpointer(tmp_path, close_timeout=0.2, ops=ops) as ckpt:
                    handle = ckpt.save(1, tiny(1))
                    assert await anyio.to_thread.run_sync(ops.entered.wait, 30)
            with pytest.raises(CheckpointWriteError, match="abandoned"):
                await handle
    finally:
        ops.release()
    assert await anyio.to_thread.run_sync(ops.unlinked.wait, 30)
    assert asyncckpt.list_checkpoints(tmp_path) == []


async def test_a_cancelled_async_trainer_still_commits_its_queued_saves(tmp_path: Path) -> None:
    ops = GatedOps()
    with anyio.CancelScope() as scope:
        async with AsyncCheckpointer(tmp_path, max_pending=2, close_timeout=30, ops=ops) as ckpt:
            handles = [ckpt.save(step, tiny(step)) for step in (1, 2)]
            assert await anyio.to_thread.run_sync(ops.entered.wait, 30)
            scope.cancel()  # e.g. the trainer's task group is cancelled while saves are queued
            try:
                await anyio.sleep_forever()
            finally:
                ops.release()
    assert scope.cancelled_caught
    assert [h.result(timeout=0) for h in handles] == [tmp_path / checkpoint_name(s) for s in (1, 2)]
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [1, 2]
