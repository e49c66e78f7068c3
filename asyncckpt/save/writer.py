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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from .. import events as ev
from .. import format as fmt
from ..catalog import committed
from ..errors import CheckpointError, CheckpointWriteError
from ..storage import Body, ReadHandle, Sink, Storage, StoredObject, Written
from .retention import prunable
from .snapshot import TensorSpec
from .staging import StagedCopy, StagingPool, StagingRaceError

ValidateMode = Literal["structure", "full", "none"]


@dataclass
class Job:
    """One staged checkpoint on its way to disk."""

    step: int
    name: str
    path: Path  # where ``name`` lives, for handles and messages
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
        storage: Storage,
        *,
        pool: StagingPool,
        validate: ValidateMode,
        keep_last: int,
        keep_every: int | None,
        log: ev.EventLog,
        errors: ErrorBox,
        stats: WriterStats,
        on_job_done: Callable[[Job], None] | None = None,
    ) -> None:
        self.storage = AbandonableStorage(storage)
        self.pool = pool
        self.validate = validate
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.log = log
        self.errors = errors
        self.stats = stats
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
        self.storage.abandoned.set()
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
        """Write → fsync → verify the durable bytes → commit (rename) → retention.

        Verifying before the commit means a file that does not read back never replaces a
        committed checkpoint of the same step (nor becomes the newest one).
        """
        started = time.perf_counter()
        written = self.storage.write(job.name, _encoder(job))
        try:
            self._verify(job, written)
        except BaseException:
            self.storage.discard(written)
            raise
        publish_s = self.storage.commit(written)
        total_ms = (time.perf_counter() - started) * 1000.0
        self._count(job, written, total_ms)
        self.log.info(
            ev.SAVE_COMMITTED,
            step=job.step,
            path=str(job.path),
            bytes=written.nbytes,
            write_ms=round(written.write_s * 1000.0, 3),
            fsync_ms=round(written.fsync_s * 1000.0, 3),
            publish_ms=round(publish_s * 1000.0, 3),
            total_ms=round(total_ms, 3),
            mb_s=round(self.stats.last_mb_s, 1),
        )
        self._retain(job.name)

    def _count(self, job: Job, written: Written, total_ms: float) -> None:
        with self.stats.lock:
            self.stats.committed += 1
            self.stats.bytes_written += written.nbytes
            self.stats.last_step = job.step
            self.stats.last_bytes = written.nbytes
            self.stats.last_write_ms = written.write_s * 1000.0
            self.stats.last_fsync_ms = written.fsync_s * 1000.0
            self.stats.last_total_ms = total_ms
            self.stats.last_mb_s = written.nbytes / 1e6 / max(total_ms / 1000.0, 1e-9)

    def _verify(self, job: Job, written: Written) -> None:
        if self.validate == "none":
            return
        where = str(job.path)
        try:
            with self.storage.open_written(written) as handle:
                file = cast(BinaryIO, handle.cursor())
                if self.validate == "structure":
                    # Prelude, trailer, size and header CRC: the bytes on disk are the ones
                    # written. Decoding the header again would only re-check our own encoder
                    # and hold the GIL against the trainer for ~20 us a tensor.
                    fmt.read_header_bytes(file, where)
                    return
                layout = fmt.read_layout(file, where)
                if layout.step != job.step:
                    raise CheckpointWriteError(
                        f"reads back step {layout.step}, wrote {job.step}", path=job.path, step=job.step
                    )
                fmt.verify_blobs(file, layout, path=where)
        except CheckpointError as exc:
            raise CheckpointWriteError(
                f"validation after write failed, nothing was published: {exc}", path=job.path, step=job.step
            ) from exc

    def _retain(self, protect: str) -> None:
        doomed = prunable(
            committed(self.storage),
            keep_last=self.keep_last,
            keep_every=self.keep_every,
            protect=Path(self.storage.where(protect)),
        )
        if not doomed:
            return
        try:
            self.storage.delete([info.path.name for info in doomed])
        except OSError as exc:
            # The new checkpoint is already committed: a file left over (or back after a power
            # loss) is retried at the next commit and must not turn this save into a failure.
            self.log.warning(ev.PRUNE_FAILED, steps=[c.step for c in doomed], error=str(exc))
            return
        for info in doomed:
            self.log.info(ev.PRUNED, step=info.step, path=str(info.path), bytes=info.size)


def _encoder(job: Job) -> Body:
    buffers = job.staged.buffers

    def body(sink: Sink) -> int:
        return fmt.write_checkpoint(
            sink,
            step=job.step,
            metadata=job.metadata,
            tree=job.tree,
            tensors=job.tensors,
            sizes=buffers.sizes,
            blobs=job.staged.blob_bytes(),  # each blob as soon as its copy is done
        )

    return body


class AbandonableStorage(Storage):
    """``storage`` until abandoned; then every call but clean-up fails with ``ECANCELED``.

    The write in progress keeps its worker thread, but its next sink write fails, so it never
    publishes its object.
    """

    def __init__(self, storage: Storage) -> None:
        self.inner = storage
        self.location = storage.location
        self.abandoned = threading.Event()

    def _check(self) -> None:
        if self.abandoned.is_set():
            raise OSError(errno.ECANCELED, "the checkpointer was closed while this write was stuck")

    def where(self, name: str) -> str:
        return self.inner.where(name)

    def write(self, name: str, body: Body) -> Written:
        self._check()

        def checked(sink: Sink) -> int:
            return body(_CheckedSink(sink, self._check))

        return self.inner.write(name, checked)

    def open_written(self, written: Written) -> ReadHandle:
        return self.inner.open_written(written)

    def commit(self, written: Written) -> float:
        try:
            self._check()
        except OSError as exc:
            self.inner.discard(written)
            raise CheckpointWriteError(f"not published: {exc}", path=self.where(written.name)) from exc
        return self.inner.commit(written)

    def discard(self, written: Written) -> None:
        self.inner.discard(written)

    def open(self, name: str) -> ReadHandle:
        return self.inner.open(name)

    def ls(self, under: str = "") -> list[StoredObject]:
        return self.inner.ls(under)

    def delete(self, names: Sequence[str]) -> None:
        self._check()
        self.inner.delete(names)

    def leftovers(self) -> list[str]:
        return self.inner.leftovers()

    def remove_leftovers(self, names: Sequence[str]) -> None:
        self.inner.remove_leftovers(names)

    def append_line(self, name: str, line: str) -> None:
        self.inner.append_line(name, line)


class _CheckedSink:
    def __init__(self, sink: Sink, check: Callable[[], None]) -> None:
        self._sink = sink
        self._check = check

    def write(self, data: memoryview | bytes) -> None:
        self._check()
        self._sink.write(data)


def _as_write_error(job: Job, exc: BaseException) -> CheckpointWriteError:
    if isinstance(exc, StagingRaceError):
        key = next((t.key for t in job.tensors if t.blob == exc.blob), f"blob {exc.blob}")
        error = CheckpointWriteError(
            f"step {job.step} was not written: {key} was changed in place after save() "
            "returned and before its copy was done, so the checkpoint would mix two training "
            "states. Only optimizer.step() waits for the copy by itself: call ckpt.wait_staged() "
            "before changing parameters or optimizer state any other way, or use "
            "AsyncCheckpointer(overlap=False).",
            path=job.path,
            key=key,
            step=job.step,
        )
        error.__cause__ = exc
        return error
    if isinstance(exc, CheckpointWriteError):
        if exc.step is None:
            exc.step = job.step
        return exc
    error = CheckpointWriteError(f"saving step {job.step} failed: {exc!r}", path=job.path, step=job.step)
    error.__cause__ = exc
    return error
