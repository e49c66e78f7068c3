"""AsyncCheckpointer in async use: the writer runs in the caller's task group."""

from __future__ import annotations

import errno
from pathlib import Path

import anyio
import pytest

import asyncckpt
from asyncckpt import AsyncCheckpointer, CheckpointBusyError, CheckpointWriteError
from asyncckpt.errors import UsageError
from asyncckpt.testing import FaultyOps, GatedOps, deterministic_state, states_equal


async def test_async_save_await_and_aflush(tmp_path: Path) -> None:
    async with AsyncCheckpointer(tmp_path, keep_last=5) as ckpt:
        handle = ckpt.save(1, deterministic_state(1))
        path = await handle
        assert path == tmp_path / "step-0000000001.ckpt"
        ckpt.save(2, deterministic_state(2))
        await ckpt.aflush()
        assert ckpt.stats().committed == 2
    loaded = asyncckpt.load(tmp_path / "step-0000000002.ckpt")
    assert states_equal(loaded.state, deterministic_state(2))


async def test_async_exit_flushes_pending(tmp_path: Path) -> None:
    async with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(4, deterministic_state(4))
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [4]


async def test_async_busy_save_refuses_to_block_the_loop_and_asave_waits(tmp_path: Path) -> None:
    ops = GatedOps()
    async with AsyncCheckpointer(tmp_path, ops=ops, keep_last=5) as ckpt:
        first = ckpt.save(1, deterministic_state(1))
        assert await anyio.to_thread.run_sync(ops.entered.wait, 30)
        with pytest.raises(CheckpointBusyError, match="asave"):
            ckpt.save(2, deterministic_state(2))
        async with anyio.create_task_group() as tg:
            results: list[asyncckpt.SaveHandle] = []

            async def second() -> None:
                results.append(await ckpt.asave(2, deterministic_state(2)))

            tg.start_soon(second)
            await anyio.wait_all_tasks_blocked()
            assert not results  # waiting for the slot, without blocking the loop
            ops.release()
        assert await first is not None
        assert await results[0] is not None
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [1, 2]


async def test_async_failure_is_raised_at_aflush(tmp_path: Path) -> None:
    async with AsyncCheckpointer(tmp_path, ops=FaultyOps("fsync", err=errno.EIO)) as ckpt:
        ckpt.save(1, deterministic_state(1))
        with pytest.raises(CheckpointWriteError, match="injected"):
            await ckpt.aflush()
    assert asyncckpt.list_checkpoints(tmp_path) == []


async def test_async_awaited_failure_raises_from_the_handle(tmp_path: Path) -> None:
    async with AsyncCheckpointer(tmp_path, ops=FaultyOps("write", err=errno.ENOSPC)) as ckpt:
        handle = ckpt.save(1, deterministic_state(1))
        with pytest.raises(CheckpointWriteError, match="No space left"):
            await handle
        assert await ckpt.save(2, deterministic_state(2)) is not None


async def test_async_busy_error_is_a_usage_error_naming_the_step(tmp_path: Path) -> None:
    ops = GatedOps()
    async with AsyncCheckpointer(tmp_path, ops=ops) as ckpt:
        ckpt.save(1, deterministic_state(1))
        assert await anyio.to_thread.run_sync(ops.entered.wait, 30)
        with pytest.raises(CheckpointBusyError) as info:
            ckpt.save(2, deterministic_state(2))
        assert isinstance(info.value, UsageError) and info.value.step == 2
        ops.release()


async def test_async_open_checkpointer_refuses_the_sync_close_and_stays_usable(tmp_path: Path) -> None:
    async with AsyncCheckpointer(tmp_path) as ckpt:
        with pytest.raises(UsageError, match="async with"):
            ckpt.close()
        with pytest.raises(UsageError, match="already open"):
            await ckpt.__aenter__()
        assert await ckpt.save(1, deterministic_state(1)) is not None
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [1]
