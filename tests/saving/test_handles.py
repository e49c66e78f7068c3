"""save/handles.py: SaveHandle, the outcome of one save()."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import anyio
import pytest

from asyncckpt.errors import CheckpointWriteError
from asyncckpt.saving.errorbox import ErrorBox
from asyncckpt.saving.handles import SaveHandle

PATH = Path("/run/step-0000000001.ckpt")


def pending() -> concurrent.futures.Future[Path]:
    return concurrent.futures.Future()


def test_a_skipped_save_is_settled_and_has_no_path_to_return() -> None:
    handle = SaveHandle(1, PATH, None)
    assert handle.skipped and handle.done() and handle.wait(timeout=0)
    assert handle.result() is None
    assert repr(handle) == "<SaveHandle step=1 skipped>"


def test_a_pending_save() -> None:
    handle = SaveHandle(1, PATH, pending())
    assert not handle.skipped and not handle.done()
    assert handle.wait(timeout=0) is False
    with pytest.raises(TimeoutError):
        handle.result(timeout=0)
    assert repr(handle) == "<SaveHandle step=1 pending>"


def test_a_committed_save_returns_its_path() -> None:
    future = pending()
    handle = SaveHandle(1, PATH, future)
    future.set_result(PATH)
    assert handle.done() and handle.wait(timeout=0) and handle.result(timeout=0) == PATH
    assert repr(handle) == "<SaveHandle step=1 done>"


def test_a_failure_seen_through_the_handle_leaves_the_error_box() -> None:
    box = ErrorBox()
    future = pending()
    handle = SaveHandle(1, PATH, future, errors=box)
    error = CheckpointWriteError("disk full", path=PATH, step=1)
    box.put(error)
    future.set_exception(error)

    assert handle.wait(timeout=0)  # waiting does not raise
    with pytest.raises(CheckpointWriteError) as info:
        handle.result()
    assert info.value is error
    box.raise_first()  # not raised a second time


async def test_awaiting_a_handle_with_a_done_event() -> None:
    future, done = pending(), anyio.Event()
    handle = SaveHandle(1, PATH, future, done_event=done)
    results: list[Path | None] = []

    async def wait() -> None:
        results.append(await handle)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        assert results == []
        future.set_result(PATH)
        done.set()
    assert results == [PATH]


async def test_awaiting_a_handle_without_a_done_event_waits_in_a_thread() -> None:
    future = pending()
    future.set_result(PATH)
    assert await SaveHandle(1, PATH, future) == PATH
    assert await SaveHandle(2, PATH, None) is None
