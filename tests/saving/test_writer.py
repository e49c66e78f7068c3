"""save/writer.py: write → verify the durable bytes → commit → retention, one job at a time.

The writer is driven directly (``process`` runs one job in the calling thread; ``run`` takes jobs
from a stream), over storages that misbehave on purpose.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import asyncckpt
from asyncckpt import events as ev
from asyncckpt import format as fmt
from asyncckpt.catalog import checkpoint_name
from asyncckpt.errors import CheckpointWriteError
from asyncckpt.saving.errorbox import ErrorBox
from asyncckpt.saving.job import Job
from asyncckpt.saving.plan import plan_save
from asyncckpt.saving.staging import StagingPool, stage
from asyncckpt.saving.stats import SaveStats
from asyncckpt.saving.writer import VerifyMode, Writer
from asyncckpt.storage import Body, PosixStorage, Sink, Written
from asyncckpt.testing import deterministic_state, states_equal


class FlipOnWrite(PosixStorage):
    """Flips the byte at file offset ``at`` on its way to disk while ``armed``; records commits."""

    def __init__(self, root: Path, *, at: int) -> None:
        super().__init__(root)
        self.at = at
        self.armed = False
        self.commits: list[str] = []

    def write(self, name: str, body: Body) -> Written:
        if not self.armed:
            return super().write(name, body)
        return super().write(name, lambda sink: body(_FlippingSink(sink, self.at)))

    def commit(self, written: Written) -> float:
        self.commits.append(written.name)
        return super().commit(written)


class _FlippingSink:
    def __init__(self, sink: Sink, at: int) -> None:
        self._sink = sink
        self._at = at
        self._position = 0

    def write(self, data: memoryview | bytes) -> None:
        start, self._position = self._position, self._position + len(data)
        if start <= self._at < self._position:
            flipped = bytearray(data)
            flipped[self._at - start] ^= 0xFF
            data = bytes(flipped)
        self._sink.write(data)


class RefusingDelete(PosixStorage):
    """A storage whose deletes fail (a read-only snapshot of the directory, say)."""

    def delete(self, names: Sequence[str]) -> None:
        raise OSError(errno.EROFS, "read-only file system")


@pytest.fixture
def log(tmp_path: Path) -> Iterator[ev.EventLog]:
    event_log = ev.EventLog(tmp_path / "events.jsonl")
    yield event_log
    event_log.close()


def events(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]


def make_writer(
    storage: PosixStorage, log: ev.EventLog, *, verify: VerifyMode = "structure", keep_last: int = 10
) -> Writer:
    return Writer(
        storage,
        pool=StagingPool(4, pin_memory=False),
        verify=verify,
        keep_last=keep_last,
        keep_every=None,
        log=log,
        errors=ErrorBox(),
        stats=SaveStats(),
    )


def make_job(writer: Writer, step: int, state: Any) -> Job:
    """Plan and stage ``state`` as ``save()`` does, into a slot of the writer's pool."""
    plan = plan_save(step, state, {"note": "test"}, overlap=False)
    buffers = writer.pool.acquire(plan.layout, timeout=0)
    assert buffers is not None
    name = checkpoint_name(step)
    return Job(
        step=step,
        name=name,
        path=Path(writer.storage.where(name)),
        tree=plan.snapshot.tree,
        tensors=plan.snapshot.tensors,
        metadata=plan.metadata,
        staged=stage(plan.snapshot, buffers),
        future=concurrent.futures.Future(),
    )


def temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if ".tmp-" in p.name]


def test_a_job_is_committed_and_counted(tmp_path: Path, log: ev.EventLog) -> None:
    writer = make_writer(PosixStorage(tmp_path), log)
    job = make_job(writer, 7, deterministic_state(7))

    writer.process(job)

    assert job.future.result(timeout=0) == tmp_path / "step-0000000007.ckpt"
    loaded = asyncckpt.load(job.path)
    assert loaded.step == 7 and loaded.metadata == {"note": "test"}
    assert states_equal(loaded.state, deterministic_state(7))
    assert writer.pool.in_use == 0  # the buffers went back to the pool
    stats = writer.stats.report(pending=0, staging_bytes=0, staging_allocations=0)
    assert (stats.committed, stats.failed, stats.last_step) == (1, 0, 7)
    assert stats.last_bytes == job.path.stat().st_size == stats.bytes_written
    committed = [e for e in events(tmp_path) if e["event"] == ev.SAVE_COMMITTED]
    assert committed and committed[0]["step"] == 7 and committed[0]["bytes"] == stats.last_bytes


@pytest.mark.parametrize(
    ("verify", "at"),
    [
        ("structure", 20),  # inside the prelude: its CRC no longer matches
        ("full", fmt.DATA_OFFSET + 100),  # inside the first blob: only "full" reads the blobs
    ],
)
def test_a_file_that_does_not_read_back_never_replaces_the_committed_step(
    tmp_path: Path, log: ev.EventLog, verify: VerifyMode, at: int
) -> None:
    storage = FlipOnWrite(tmp_path, at=at)
    writer = make_writer(storage, log, verify=verify)
    first = make_job(writer, 5, {"w": torch.zeros(256)})
    writer.process(first)
    assert first.future.result(timeout=0) is not None

    storage.armed = True
    again = make_job(writer, 5, {"w": torch.ones(256)})
    writer.process(again)

    error = again.future.exception(timeout=0)
    assert isinstance(error, CheckpointWriteError)
    assert "verification after write failed, nothing was published" in str(error)
    assert error.step == 5 and error.path == str(tmp_path / "step-0000000005.ckpt")
    assert storage.commits == ["step-0000000005.ckpt"]  # only the first one was ever committed
    assert torch.equal(asyncckpt.load(tmp_path / "step-0000000005.ckpt").state["w"], torch.zeros(256))
    assert temp_files(tmp_path) == []
    assert writer.pool.in_use == 0
    with pytest.raises(CheckpointWriteError) as raised:
        writer.errors.raise_first()  # the failure waits for the trainer too
    assert raised.value is error
    failed = [e for e in events(tmp_path) if e["event"] == ev.SAVE_FAILED]
    assert failed and failed[0]["step"] == 5


def test_structure_verification_does_not_read_the_blobs(tmp_path: Path, log: ev.EventLog) -> None:
    storage = FlipOnWrite(tmp_path, at=fmt.DATA_OFFSET + 100)
    storage.armed = True
    writer = make_writer(storage, log, verify="structure")
    job = make_job(writer, 1, {"w": torch.zeros(256)})

    writer.process(job)

    assert job.future.result(timeout=0) is not None  # what "full" is for
    with pytest.raises(asyncckpt.CorruptedCheckpointError):
        asyncckpt.load(job.path)


def test_a_failed_write_settles_the_job_and_keeps_the_error(tmp_path: Path, log: ev.EventLog) -> None:
    writer = make_writer(PosixStorage(tmp_path / "missing" / "dir"), log)
    job = make_job(writer, 3, deterministic_state(3))

    writer.process(job)

    error = job.future.exception(timeout=0)
    assert isinstance(error, CheckpointWriteError) and isinstance(error.__cause__, OSError)
    assert error.step == 3
    assert writer.stats.failed == 1 and writer.stats.committed == 0
    assert writer.pool.in_use == 0
    with pytest.raises(CheckpointWriteError):
        writer.errors.raise_first()


def test_retention_runs_after_each_commit(tmp_path: Path, log: ev.EventLog) -> None:
    writer = make_writer(PosixStorage(tmp_path), log, keep_last=2)
    for step in (1, 2, 3, 4):
        job = make_job(writer, step, {"s": step})
        writer.process(job)
        job.future.result(timeout=0)

    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert [e["step"] for e in events(tmp_path) if e["event"] == ev.PRUNED] == [1, 2]


def test_a_prune_failure_is_a_warning_not_a_failed_save(tmp_path: Path, log: ev.EventLog) -> None:
    writer = make_writer(RefusingDelete(tmp_path), log, keep_last=1)
    for step in (1, 2):
        job = make_job(writer, step, {"s": step})
        writer.process(job)
        assert job.future.result(timeout=0) is not None

    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [1, 2]
    warned = [e for e in events(tmp_path) if e["event"] == ev.PRUNE_FAILED]
    assert warned and warned[0]["steps"] == [1] and warned[0]["level"] == "warning"


def test_after_abandon_nothing_is_published(tmp_path: Path, log: ev.EventLog) -> None:
    writer = make_writer(PosixStorage(tmp_path), log)
    job = make_job(writer, 1, deterministic_state(1))

    writer.abandon()
    writer.process(job)

    error = job.future.exception(timeout=0)
    assert isinstance(error, CheckpointWriteError)
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.ECANCELED
    assert asyncckpt.list_checkpoints(tmp_path) == [] and temp_files(tmp_path) == []


async def test_run_writes_jobs_in_order_and_reports_each(tmp_path: Path, log: ev.EventLog) -> None:
    writer = make_writer(PosixStorage(tmp_path), log)
    jobs = [
        dataclasses.replace(make_job(writer, step, {"s": step}), done_event=anyio.Event())
        for step in (1, 2, 3)
    ]
    done: list[int] = []

    def on_done(job: Job) -> None:
        assert job.done_event is not None and job.done_event.is_set()
        done.append(job.step)

    send, receive = anyio.create_memory_object_stream[Job](len(jobs))
    for job in jobs:
        send.send_nowait(job)
    send.close()
    await writer.run(receive, on_done)

    assert done == [1, 2, 3]
    assert [e["step"] for e in events(tmp_path) if e["event"] == ev.SAVE_COMMITTED] == [1, 2, 3]
    assert all(job.future.result(timeout=0) == job.path for job in jobs)
