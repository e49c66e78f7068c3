"""The writer's threads run at a lower CPU priority (``background_nice``); the trainer's do not."""

from __future__ import annotations

import functools
import json
import threading
import weakref
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import torch

import asyncckpt
from asyncckpt import AsyncCheckpointer, _priority
from asyncckpt.errors import UsageError
from asyncckpt.format import writing
from asyncckpt.testing import RecordingOps, deterministic_state

linux_only = pytest.mark.skipif(not _priority.SUPPORTED, reason="per-thread nice values are Linux's")


class NiceOps(RecordingOps):
    """Real OS calls; records the nice value of the thread of each fsync (the writer's), and of
    a thread that thread starts."""

    def __init__(self) -> None:
        super().__init__()
        self.fsync_nice: list[int] = []
        self.child_nice: list[int] = []

    def fsync(self, fd: int) -> None:
        self.fsync_nice.append(_priority.thread_nice())
        child: list[int] = []
        thread = threading.Thread(target=lambda: child.append(_priority.thread_nice()))
        thread.start()
        thread.join()
        self.child_nice += child
        super().fsync(fd)


class CrcThreads:
    """Stands in for ``crc32c`` in the format's writing module; records the checksum threads'
    nice values (large blobs are checksummed in a pool beside the write)."""

    def __init__(self) -> None:
        self.nice: list[int] = []
        self._real = writing.crc32c

    def crc32c(self, data: Any, value: int = 0) -> int:
        if threading.current_thread().name.startswith("asyncckpt-crc"):
            self.nice.append(_priority.thread_nice())
        result: int = self._real.crc32c(data, value)
        return result


def big_state() -> dict[str, torch.Tensor]:
    """One blob large enough to be checksummed in the pool (2 MiB)."""
    return {"weight": torch.arange(1 << 19, dtype=torch.float32)}


@linux_only
def test_writer_threads_run_nice_levels_below_the_trainer(tmp_path: Path, monkeypatch: Any) -> None:
    crc = CrcThreads()
    monkeypatch.setattr(writing, "crc32c", crc)
    ops = NiceOps()
    trainer = _priority.thread_nice()
    with AsyncCheckpointer(tmp_path, background_nice=7, ops=ops) as ckpt:
        ckpt.save(1, big_state()).result()
        assert _priority.thread_nice() == trainer  # the caller's thread is never lowered
    expected = min(19, trainer + 7)
    assert ops.fsync_nice and set(ops.fsync_nice) == {expected}  # the write, fsync, verify thread
    assert set(ops.child_nice) == {expected}  # threads it starts (upload, check pools) inherit it
    assert crc.nice and set(crc.nice) == {expected}  # the checksum pool
    assert _priority.thread_nice() == trainer


@linux_only
def test_zero_leaves_the_writer_threads_alone(tmp_path: Path, monkeypatch: Any) -> None:
    crc = CrcThreads()
    monkeypatch.setattr(writing, "crc32c", crc)
    ops = NiceOps()
    trainer = _priority.thread_nice()
    with AsyncCheckpointer(tmp_path, background_nice=0, ops=ops) as ckpt:
        ckpt.save(1, big_state()).result()
    assert set(ops.fsync_nice) == {trainer}
    assert set(crc.nice) == {trainer}


@linux_only
def test_the_default_leaves_the_writer_alone(tmp_path: Path) -> None:
    ops = NiceOps()
    trainer = _priority.thread_nice()
    with AsyncCheckpointer(tmp_path, ops=ops) as ckpt:
        assert ckpt.background_nice == 0
        ckpt.save(1, deterministic_state(1)).result()
    assert set(ops.fsync_nice) == {trainer}


@linux_only
async def test_async_use_lowers_a_thread_of_its_own_not_the_loops(tmp_path: Path) -> None:
    ops = NiceOps()
    trainer = _priority.thread_nice()
    async with AsyncCheckpointer(tmp_path, background_nice=5, ops=ops) as ckpt:
        await ckpt.save(1, deterministic_state(1))
        await ckpt.save(2, deterministic_state(2))
        # the event loop's worker threads are the caller's: they keep the caller's priority
        assert await anyio.to_thread.run_sync(_priority.thread_nice) == trainer
    assert set(ops.fsync_nice) == {min(19, trainer + 5)}
    assert len(ops.fsync_nice) >= 2
    assert _priority.thread_nice() == trainer
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [1, 2]


@pytest.mark.parametrize("bad", [-1, 20, 1.5, True, "10", None])
def test_bad_values_are_usage_errors(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(UsageError, match="background_nice"):
        AsyncCheckpointer(tmp_path, background_nice=bad)
    assert not list(tmp_path.iterdir())  # refused before anything is opened


def test_a_refused_setpriority_is_logged_and_saving_goes_on(tmp_path: Path, monkeypatch: Any) -> None:
    def refuse(*args: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(_priority, "SUPPORTED", True)
    monkeypatch.setattr(_priority.os, "getpriority", lambda *args: 0, raising=False)
    monkeypatch.setattr(_priority.os, "setpriority", refuse, raising=False)
    with AsyncCheckpointer(tmp_path, background_nice=3) as ckpt:
        ckpt.save(1, deterministic_state(1)).result()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    failed = [e for e in events if e["event"] == "checkpoint.writer.priority_failed"]
    assert len(failed) == 1 and failed[0]["nice"] == 3 and "not permitted" in failed[0]["error"]
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [1]


def test_off_linux_nothing_changes(monkeypatch: Any) -> None:
    monkeypatch.setattr(_priority, "SUPPORTED", False)
    assert _priority.background_level(10) is None
    assert _priority.lower_this_thread(10) is None
    assert _priority.thread_nice() == 0


@linux_only
def test_levels_stop_at_19_and_never_raise_a_thread() -> None:
    seen: dict[str, int] = {}

    def lower_twice() -> None:
        assert _priority.lower_this_thread(19) is None
        seen["lowered"] = _priority.thread_nice()
        assert _priority.lower_this_thread(4) is None  # would raise the priority: left alone
        seen["again"] = _priority.thread_nice()
        seen["level"] = _priority.background_level(10) or -1

    thread = threading.Thread(target=lower_twice)
    thread.start()
    thread.join()
    assert seen == {"lowered": 19, "again": 19, "level": 19}
    assert _priority.background_level(0) is None


async def test_background_thread_hands_back_results_and_errors() -> None:
    thread = _priority.BackgroundThread(name="test-background")
    try:
        assert await thread.run_sync(threading.current_thread) is not threading.current_thread()
        assert (await thread.run_sync(threading.current_thread)).name == "test-background"
        with pytest.raises(ZeroDivisionError):
            await thread.run_sync(lambda: 1 // 0)
    finally:
        thread.close()


# The writer's threads are gone when the checkpointer closes: a daemon thread of ours that
# still ran at the interpreter's exit freed the last job's staging tensors during finalization,
# which ended the thread inside torch's C++ code and aborted the process ("terminate called
# without an active exception"; 1 run in 15 of examples/train_hf_trainer.py at nice 10).


def new_threads(before: set[threading.Thread]) -> list[str]:
    return [t.name for t in threading.enumerate() if t not in before and t.is_alive()]


@pytest.mark.parametrize("nice", [0, 10])
def test_no_writer_thread_outlives_close(tmp_path: Path, nice: int) -> None:
    before = set(threading.enumerate())
    with AsyncCheckpointer(tmp_path, background_nice=nice, keep_last=1) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, big_state())
    assert new_threads(before) == []
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [3]


@linux_only
async def test_no_writer_thread_outlives_async_close(tmp_path: Path) -> None:
    async with AsyncCheckpointer(tmp_path, background_nice=10) as ckpt:
        await ckpt.save(1, big_state())
        ours = [t for t in threading.enumerate() if t.name == "asyncckpt-writer"]
        assert len(ours) == 1
    assert not ours[0].is_alive()


async def test_background_thread_drops_the_work_before_handing_back() -> None:
    class Held:
        pass

    held = Held()
    gone = weakref.ref(held)
    thread = _priority.BackgroundThread(name="test-background")
    try:
        await thread.run_sync(functools.partial(id, held))
        del held
        assert gone() is None  # not freed later in the thread, when the caller may be exiting
    finally:
        thread.close()
        thread.join()
    assert not thread._thread.is_alive()
