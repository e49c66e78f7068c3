"""save/pending.py: the saves handed to the writer and not yet settled."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path
from typing import Any

import anyio

from asyncckpt import events as ev
from asyncckpt.errors import CheckpointWriteError
from asyncckpt.saving.job import Job
from asyncckpt.saving.pending import PendingSaves


def job(step: int, *, done_event: Any = None) -> Job:
    name = f"step-{step:010d}.ckpt"
    return Job(
        step=step,
        name=name,
        path=Path("/run") / name,
        tree={},
        tensors=[],
        metadata={},
        staged=None,  # type: ignore[arg-type]  # never read here
        future=concurrent.futures.Future(),
        done_event=done_event,
    )


def test_a_save_leaves_when_its_future_settles() -> None:
    pending = PendingSaves()
    first, second = job(1), job(2)
    pending.add(first)
    pending.add(second)
    assert len(pending) == 2 and pending.futures() == [first.future, second.future]

    first.future.set_result(first.path)

    assert len(pending) == 1 and pending.futures() == [second.future]
    assert pending.wait(timeout=0) == 1
    second.future.set_exception(CheckpointWriteError("failed"))
    assert pending.wait(timeout=0) == 0 and len(pending) == 0


def test_an_already_settled_save_is_not_kept() -> None:
    pending = PendingSaves()
    done = job(1)
    done.future.set_result(done.path)
    pending.add(done)
    assert len(pending) == 0


async def test_abandon_fails_every_pending_save_oldest_first(tmp_path: Path) -> None:
    pending = PendingSaves()
    jobs = [job(step, done_event=anyio.Event()) for step in (30, 10, 20)]
    for each in jobs:
        pending.add(each)
    log = ev.EventLog(tmp_path / "events.jsonl")
    try:
        abandoned = pending.abandon("did not finish", log)
    finally:
        log.close()

    assert [each.step for each in abandoned] == [10, 20, 30]
    for each in jobs:
        error = each.future.exception(timeout=0)
        assert isinstance(error, CheckpointWriteError)
        assert error.reason == "did not finish; abandoned" and error.step == each.step
        assert error.path == str(each.path)
        assert each.done_event is not None and each.done_event.is_set()
    assert len(pending) == 0
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in lines] == [(ev.SAVE_FAILED, s) for s in (10, 20, 30)]
