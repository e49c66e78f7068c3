"""The background writer: an anyio task that makes staged checkpoints durable, one at a time.

Per checkpoint, in a worker thread (file I/O, fsync and CRC32C release the GIL): write the temp
file, each blob as soon as its staging copy is done, then the header → fsync → rename → fsync
directory → validate → commit event → retention → release the buffers. A failure is logged at
once and handed to the trainer through the job's future and the checkpointer's error box; it
never escapes into another thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from . import events as ev
from . import format as fmt
from .checkpoint import write_snapshot
from .errors import CheckpointError, CheckpointWriteError
from .retention import prunable
from .snapshot import TensorSpec
from .staging import StagedCopy, StagingPool, StagingRaceError
from .storage import OS, FileOps, list_checkpoints, remove_durably

ValidateMode = Literal["structure", "full", "none"]


@dataclass
class Job:
    """One staged checkpoint on its way to disk."""

    step: int
    path: Path
    tree: Any
    tensors: list[TensorSpec]
    metadata: Any
    staged: StagedCopy
    future: concurrent.futures.Future[Path]
    stall_ms: float
    done_event: Any = None  # anyio.Event for awaiting handles in async use


@dataclass
class WriterStats:
    """Counters and the last save's figures; updated by the writer, read by ``stats()``."""

    committed: int = 0
    failed: int = 0
    bytes_written: int = 0
    last_step: int | None = None
    last_bytes: int = 0
    last_write_ms: float = 0.0
    last_fsync_ms: float = 0.0
    last_total_ms: float = 0.0
    last_mb_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class ErrorBox:
    """Background failures waiting to be raised in the trainer, oldest first."""

    def __init__(self) -> None:
        self._errors: list[CheckpointWriteError] = []
        self._lock = threading.Lock()

    def put(self, error: CheckpointWriteError) -> None:
        with self._lock:
            self._errors.append(error)

    def discard(self, error: CheckpointWriteError) -> None:
        """Forget ``error``: the trainer has seen it through its handle."""
        with self._lock:
            self._errors = [e for e in self._errors if e is not error]

    def raise_first(self) -> None:
        """Raise the oldest pending failure (the others are attached as notes) and clear all."""
        with self._lock:
            errors, self._errors = self._errors, []
        if not errors:
            return
        first = errors[0]
        for other in errors[1:]:
            first.add_note(f"also failed: {other}")
        raise first


class Writer:
    """Writes jobs received on a stream, in order. Same code for sync and async use."""

    def __init__(
        self,
        directory: Path,
        *,
        pool: StagingPool,
        validate: ValidateMode,
        keep_last: int,
        keep_every: int | None,
        log: ev.EventLog,
        errors: ErrorBox,
        stats: WriterStats,
        ops: FileOps = OS,
        on_job_done: Callable[[Job], None] | None = None,
    ) -> None:
        self.directory = directory
        self.pool = pool
        self.validate = validate
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.log = log
        self.errors = errors
        self.stats = stats
        self.ops: FileOps = _AbandonableOps(ops)
        self.on_job_done = on_job_done
        self._scope: anyio.CancelScope | None = None

    async def run(self, jobs: MemoryObjectReceiveStream[Job]) -> None:
        """Process jobs until the stream is closed and drained, or until :meth:`abandon`.

        Shielded: the caller's cancellation must not drop checkpoints already queued.
        """
        with anyio.CancelScope(shield=True) as scope:
            self._scope = scope
            async with jobs:
                async for job in jobs:
                    await anyio.to_thread.run_sync(self.process, job, abandon_on_cancel=True)
                    if job.done_event is not None:
                        job.done_event.set()
                    if self.on_job_done is not None:
                        self.on_job_done(job)

    def abandon(self) -> None:
        """Stop at once, leaving a stuck write behind (call it on the writer's event loop).

        The worker thread of the write in progress cannot be interrupted; it runs on, but every
        later file operation except clean-up (close, unlink) fails, so it never publishes its
        file: it removes its temp file if the storage recovers, else the next start does. Queued
        jobs are dropped; the caller settles their futures.
        """
        assert isinstance(self.ops, _AbandonableOps)
        self.ops.abandoned.set()
        if self._scope is not None:
            self._scope.cancel()

    def process(self, job: Job) -> None:
        """Make one job durable (in a worker thread); settle its future either way."""
        try:
            self._commit(job)
        except BaseException as exc:
            error = _as_write_error(job, exc)
            with self.stats.lock:
                self.stats.failed += 1
            self.log.error(ev.SAVE_FAILED, step=job.step, path=str(job.path), error=str(error))
            self.errors.put(error)
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # settled by abandon
                job.future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
        else:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                job.future.set_result(job.path)
        finally:
            job.staged.settle()  # no copy may still be filling the buffers when they are reused
            self.pool.release(job.staged.buffers)

    def _commit(self, job: Job) -> None:
        started = time.perf_counter()
        buffers = job.staged.buffers
        timings = write_snapshot(
            job.path,
            tree=job.tree,
            tensors=job.tensors,
            sizes=buffers.sizes,
            step=job.step,
            metadata=job.metadata,
            blobs=job.staged.blob_bytes(),  # each blob as soon as its copy is done
            ops=self.ops,
        )
        self._validate(job)
        total_ms = (time.perf_counter() - started) * 1000.0
        mb_s = timings.nbytes / 1e6 / max(total_ms / 1000.0, 1e-9)
        with self.stats.lock:
            self.stats.committed += 1
            self.stats.bytes_written += timings.nbytes
            self.stats.last_step = job.step
            self.stats.last_bytes = timings.nbytes
            self.stats.last_write_ms = timings.write_s * 1000.0
            self.stats.last_fsync_ms = timings.fsync_s * 1000.0
            self.stats.last_total_ms = total_ms
            self.stats.last_mb_s = mb_s
        self.log.info(
            ev.SAVE_COMMITTED,
            step=job.step,
            path=str(job.path),
            bytes=timings.nbytes,
            write_ms=round(timings.write_s * 1000.0, 3),
            fsync_ms=round(timings.fsync_s * 1000.0, 3),
            publish_ms=round(timings.publish_s * 1000.0, 3),
            total_ms=round(total_ms, 3),
            mb_s=round(mb_s, 1),
        )
        self._retain(job.path)

    def _validate(self, job: Job) -> None:
        if self.validate == "none":
            return
        try:
            with open(job.path, "rb", buffering=0) as file:
                if self.validate == "structure":
                    # Prelude, trailer, size and header CRC: the bytes on disk are the ones
                    # written. Decoding the header again would only re-check our own encoder
                    # and hold the GIL against the trainer for ~20 us a tensor.
                    fmt.read_header_bytes(file, str(job.path))
                    return
                layout = fmt.read_layout(file, str(job.path))
                if layout.step != job.step:
                    raise CheckpointWriteError(f"{job.path}: reads back step {layout.step}, wrote {job.step}")
                fmt.verify_blobs(file, layout, path=str(job.path))
        except CheckpointError as exc:
            # A committed file that does not read back is worse than none: take it away.
            remove_durably([job.path], self.directory, ops=self.ops)
            raise CheckpointWriteError(f"{job.path}: validation after write failed: {exc}") from exc

    def _retain(self, committed: Path) -> None:
        doomed = prunable(
            list_checkpoints(self.directory),
            keep_last=self.keep_last,
            keep_every=self.keep_every,
            protect=committed,
        )
        if not doomed:
            return
        try:
            remove_durably([c.path for c in doomed], self.directory, ops=self.ops)
        except OSError as exc:
            # The new checkpoint is already committed: a file left over (or back after a power
            # loss) is retried at the next commit and must not turn this save into a failure.
            self.log.warning(ev.PRUNE_FAILED, steps=[c.step for c in doomed], error=str(exc))
            return
        for info in doomed:
            self.log.info(ev.PRUNED, step=info.step, path=str(info.path), bytes=info.size)


class _AbandonableOps(FileOps):
    """``ops`` until abandoned; then every call but clean-up fails with ``ECANCELED``."""

    def __init__(self, ops: FileOps) -> None:
        self.inner = ops
        self.abandoned = threading.Event()

    def _check(self) -> None:
        if self.abandoned.is_set():
            raise OSError(errno.ECANCELED, "the checkpointer was closed while this write was stuck")

    def open_exclusive(self, path: Path) -> int:
        self._check()
        return self.inner.open_exclusive(path)

    def write(self, fd: int, data: memoryview | bytes) -> int:
        self._check()
        return self.inner.write(fd, data)

    def fsync(self, fd: int) -> None:
        self._check()
        self.inner.fsync(fd)

    def close(self, fd: int) -> None:
        self.inner.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        self._check()
        self.inner.rename(src, dst)

    def unlink(self, path: Path) -> None:
        self.inner.unlink(path)

    def fsync_dir(self, directory: Path) -> None:
        self._check()
        self.inner.fsync_dir(directory)


def _as_write_error(job: Job, exc: BaseException) -> CheckpointWriteError:
    if isinstance(exc, StagingRaceError):
        key = next((t.key for t in job.tensors if t.blob == exc.blob), f"blob {exc.blob}")
        error = CheckpointWriteError(
            f"{job.path}: step {job.step} was not written: {key} was changed in place after save() "
            "returned and before its copy was done, so the checkpoint would mix two training "
            "states. Only optimizer.step() waits for the copy by itself: call ckpt.wait_staged() "
            "before changing parameters or optimizer state any other way, or use "
            "AsyncCheckpointer(overlap=False).",
            step=job.step,
        )
        error.__cause__ = exc
        return error
    if isinstance(exc, CheckpointWriteError):
        if exc.step is None:
            exc.step = job.step
        return exc
    error = CheckpointWriteError(f"{job.path}: saving step {job.step} failed: {exc!r}", step=job.step)
    error.__cause__ = exc
    return error
