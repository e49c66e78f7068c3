"""AsyncCheckpointer: the trainer-facing object that wires snapshot, staging, writer and loader.

``save()`` flattens the state, copies it into a reused staging buffer set and queues it for the
background writer. The optimizers' state and the parameters of the modules and optimizers in the
state are copied while the trainer runs on (CPU: a background thread; CUDA: a side stream) and the
next optimizer step waits for that copy; everything else is copied before ``save()`` returns.
Sync use runs the writer in a background thread with an anyio event loop (a blocking portal);
async use runs it in a task group of the caller's event loop.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.from_thread
import torch
from anyio.abc import TaskGroup
from anyio.from_thread import BlockingPortal
from anyio.streams.memory import MemoryObjectSendStream

from . import events as ev
from . import loader
from .catalog import checkpoint_name
from .checkpoint import MapLocation
from .errors import CheckpointBusyError, CheckpointError, CheckpointWriteError, NoValidCheckpointError
from .format import check_step
from .loader import LoadResult, OnCorrupt
from .preemption import CallsInProgress, SigtermFlusher
from .save.handles import SaveHandle
from .save.overlap import StepGuard, modules_in, optimizers_in, step_guarded_blobs
from .save.snapshot import flatten, flatten_metadata, gc_paused
from .save.staging import Copier, StagingPool, stage
from .save.writer import ErrorBox, Job, ValidateMode, Writer, WriterStats
from .storage import OS, FileOps, PosixStorage

WhenBusy = Literal["wait", "skip"]


@dataclass(frozen=True)
class CheckpointerStats:
    """Counters and the last save's figures (milliseconds, bytes, MB/s)."""

    saves: int
    committed: int
    failed: int
    skipped: int
    waits: int
    pending: int
    bytes_written: int
    last_step: int | None
    last_stall_ms: float
    last_wait_ms: float
    last_write_ms: float
    last_fsync_ms: float
    last_total_ms: float
    last_bytes: int
    last_mb_s: float
    staging_bytes: int
    staging_allocations: int


class AsyncCheckpointer:
    """Asynchronous, durable checkpoints of a training run into ``directory``, one file per step.

    Use as ``with`` (sync trainers) or ``async with`` (async trainers). Options:

    - ``keep_last`` / ``keep_every``: retention (the newest valid checkpoint is never deleted).
    - ``max_pending``: staging buffer sets, i.e. checkpoints in flight; the memory bound.
    - ``when_busy``: ``"wait"`` blocks ``save()`` until a slot frees, ``"skip"`` drops the save.
    - ``validate``: after each commit re-open the file and check prelude, trailer, size and header
      CRC (``"structure"``), also decode the header and re-check every blob's checksum
      (``"full"``), or not at all (``"none"``).
    - ``event_log``: JSON-lines event file (default ``<directory>/events.jsonl``).
    - ``overlap``: copy the optimizers' state, and the parameters of the modules and optimizers
      found in the state, while forward and backward run; while such a copy is pending, every
      optimizer step waits for it first (a global step pre-hook, held while the checkpointer
      is open). Between ``save()`` and that step, change those tensors in place only after
      :meth:`wait_staged` (e.g. swapping in EMA weights for evaluation); a change the copy
      catches fails the save with :class:`CheckpointWriteError`. ``False`` copies everything
      before ``save()`` returns (on CUDA: orders the trainer's stream after it).
    - ``handle_sigterm``: on SIGTERM commit the pending saves (and a ``save()`` the signal
      interrupted) in a helper thread, then hand the signal to the previous handler or the default
      action. The trainer is not blocked meanwhile; saves it begins after the signal may be cut
      short by the exit (their temp files are removed at the next start).
    - ``close_timeout``: how long leaving the context waits for pending saves (default: as long as
      the storage takes). When it passes, the stuck saves are abandoned and leaving raises
      :class:`CheckpointWriteError` naming them; older checkpoints stay intact. A stuck OS call
      cannot be interrupted: its worker thread is a daemon thread, so it never keeps the
      interpreter from exiting, and it never publishes the abandoned file; its temp file is
      removed if the storage recovers, else at the next start.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int = 3,
        keep_every: int | None = None,
        max_pending: int = 1,
        when_busy: WhenBusy = "wait",
        validate: ValidateMode = "structure",
        event_log: str | os.PathLike[str] | None = None,
        handle_sigterm: bool = False,
        close_timeout: float | None = None,
        overlap: bool = True,
        ops: FileOps = OS,
    ) -> None:
        if when_busy not in ("wait", "skip"):
            raise ValueError(f"when_busy must be 'wait' or 'skip', got {when_busy!r}")
        if validate not in ("structure", "full", "none"):
            raise ValueError(f"validate must be 'structure', 'full' or 'none', got {validate!r}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every must be >= 1 or None, got {keep_every}")
        if close_timeout is not None and not close_timeout >= 0:
            raise ValueError(f"close_timeout must be >= 0 or None, got {close_timeout}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.when_busy = when_busy
        self.validate: ValidateMode = validate
        self.event_log_path = Path(event_log) if event_log is not None else self.directory / ev.EVENTS_FILE
        self.handle_sigterm = handle_sigterm
        self.close_timeout = close_timeout
        self.overlap = overlap
        self._storage = PosixStorage(self.directory, ops=ops)
        self._pool = StagingPool(max_pending, pin_memory=torch.cuda.is_available())
        self._errors = ErrorBox()
        self._writer_stats = WriterStats()
        self._mode: Literal["sync", "async"] | None = None
        self._log: ev.EventLog | None = None
        self._send: MemoryObjectSendStream[Job] | None = None
        self._portal_cm: Any = None
        self._portal: BlockingPortal | None = None
        self._writer_done: concurrent.futures.Future[None] | None = None
        self._task_group: TaskGroup | None = None
        self._writer: Writer | None = None
        self._pending: dict[concurrent.futures.Future[Path], Job] = {}
        self._pending_lock = threading.Lock()
        self._slot_freed: Any = None  # anyio.Event, async use only
        self._counts = {"saves": 0, "skipped": 0, "waits": 0}
        self._last_stall_ms = 0.0
        self._last_wait_ms = 0.0
        self._side_stream: Any = None
        self._copier = Copier()
        self._guard = StepGuard()
        self._saves_in_progress = CallsInProgress()
        self._sigterm: SigtermFlusher | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> AsyncCheckpointer:
        writer = self._open("sync")
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        send, receive = anyio.create_memory_object_stream[Job](math.inf)
        self._send = send
        self._writer_done = self._portal.start_task_soon(writer.run, receive)
        if self.handle_sigterm:
            self._sigterm = SigtermFlusher(
                pending=self._pending_futures, saves=self._saves_in_progress, log=self._log_warning
            )
            self._sigterm.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._finish(exc, self._flush_for_close)
        finally:
            self._stop_sync_writer()

    async def __aenter__(self) -> AsyncCheckpointer:
        writer = self._open("async")
        self._slot_freed = anyio.Event()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        send, receive = anyio.create_memory_object_stream[Job](math.inf)
        self._send = send
        self._task_group.start_soon(writer.run, receive)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        abandoned: CheckpointWriteError | None = None
        try:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(self.close_timeout) as deadline:
                    await self._drain_async()
                if deadline.cancelled_caught:
                    assert self._writer is not None
                    self._writer.abandon()
                    abandoned = self._abandon_pending()
        finally:
            assert self._send is not None and self._task_group is not None
            self._send.close()
            await self._task_group.__aexit__(None, None, None)
            self._close()

        def raise_failures() -> None:
            if abandoned is not None:
                raise abandoned
            self._errors.raise_first()

        self._finish(exc, raise_failures)

    def close(self) -> None:
        """Flush pending saves and stop the writer (what leaving ``with`` does)."""
        self.__exit__(None, None, None)

    def _open(self, mode: Literal["sync", "async"]) -> Writer:
        if self._mode is not None:
            raise CheckpointError("this AsyncCheckpointer is already open")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._mode = mode
        self._log = ev.EventLog(self.event_log_path)
        self._log.info(
            ev.WRITER_STARTED, directory=str(self.directory), mode=mode, max_pending=self._pool.slots
        )
        self._remove_temp_files()
        self._writer = Writer(
            self._storage,
            pool=self._pool,
            validate=self.validate,
            keep_last=self.keep_last,
            keep_every=self.keep_every,
            log=self._log,
            errors=self._errors,
            stats=self._writer_stats,
            on_job_done=self._on_job_done if mode == "async" else None,
        )
        return self._writer

    def _remove_temp_files(self) -> None:
        assert self._log is not None
        leftovers = self._storage.leftovers()
        self._storage.remove_leftovers(leftovers)
        for name in leftovers:
            self._log.warning(ev.TMP_REMOVED, path=self._storage.where(name))

    def _flush_for_close(self) -> None:
        try:
            self.flush(self.close_timeout)
        except TimeoutError:
            assert self._portal is not None and self._writer is not None
            self._portal.call(self._writer.abandon)
            raise self._abandon_pending() from None

    def _abandon_pending(self) -> CheckpointWriteError:
        """Fail every pending save after ``close_timeout``; return the error for the trainer."""
        assert self._log is not None
        with self._pending_lock:
            jobs = sorted(self._pending.values(), key=lambda job: job.step)
        reason = f"did not finish within close_timeout={self.close_timeout} s (the storage seems stuck)"
        for job in jobs:
            error = CheckpointWriteError(f"{job.path}: {reason}; abandoned", step=job.step)
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                job.future.set_exception(error)
            if job.done_event is not None:
                job.done_event.set()
            self._log.error(ev.SAVE_FAILED, step=job.step, path=str(job.path), error=str(error))
        steps = ", ".join(str(job.step) for job in jobs)
        error = CheckpointWriteError(
            f"{self.directory}: checkpoint saves of step {steps} {reason}; they were abandoned and "
            "never publish; older checkpoints are intact and the next start removes any temp file",
            step=jobs[-1].step if jobs else None,
        )
        try:
            self._errors.raise_first()
        except CheckpointWriteError as earlier:
            error.add_note(f"also failed: {earlier}")
        return error

    def _finish(self, body_error: BaseException | None, flush: Any) -> None:
        """Flush on exit; a flush failure never hides the body's own exception."""
        try:
            flush()
        except CheckpointWriteError as error:
            if body_error is None:
                raise
            body_error.add_note(f"asyncckpt: a pending checkpoint failed too: {error}")

    def _stop_sync_writer(self) -> None:
        try:
            if self._portal is not None and self._send is not None:
                self._portal.call(self._send.close)
            if self._writer_done is not None:
                self._writer_done.result()
        finally:
            if self._portal_cm is not None:
                self._portal_cm.__exit__(None, None, None)
            self._portal = self._portal_cm = None
            self._close()

    def _close(self) -> None:
        if self._sigterm is not None:
            self._sigterm.uninstall()
            self._sigterm = None
        self._guard.remove()
        self._copier.close()
        if self._log is not None:
            self._log.info(ev.WRITER_STOPPED, committed=self._writer_stats.committed)
            self._log.close()
        self._mode = None

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state: Any, *, metadata: dict[str, Any] | None = None) -> SaveHandle:
        """Stage ``state`` for step ``step`` and queue it for the background writer.

        Returns when the state is staged (CPU: copied; CUDA: copies enqueued). Raises
        ``TypeError`` naming the key path of a value that cannot be stored (nothing is queued),
        and :class:`CheckpointWriteError` for an earlier background failure not yet reported.
        When every slot is busy: waits (``when_busy="wait"``; in async use this raises
        :class:`CheckpointBusyError` instead, see ``asave``) or returns a skipped handle.
        """
        with self._saves_in_progress:  # a SIGTERM also waits for the save() it interrupted
            return self._save(step, state, metadata)

    def _save(self, step: int, state: Any, metadata: dict[str, Any] | None) -> SaveHandle:
        self._require_open()
        self._errors.raise_first()
        started = time.perf_counter()
        check_step(step)
        with gc_paused():
            snapshot = flatten(state)
            metadata_tree = flatten_metadata(metadata)
            layout = snapshot.layout_key()
        buffers = self._pool.try_acquire(layout)
        wait_ms = 0.0
        if buffers is None:
            if self.when_busy == "skip":
                return self._skip(step)
            if self._mode == "async":
                raise CheckpointBusyError(
                    f"step {step}: all {self._pool.slots} staging slots are busy and waiting would "
                    "block the event loop; use `await ckpt.asave(step, state)` or when_busy='skip'"
                )
            buffers = self._pool.acquire(layout)
            assert buffers is not None
            wait_ms = (time.perf_counter() - started) * 1000.0
        return self._stage_and_submit(step, state, snapshot, metadata_tree, buffers, started, wait_ms)

    async def asave(self, step: int, state: Any, *, metadata: dict[str, Any] | None = None) -> SaveHandle:
        """``save()`` for async trainers: waits for a free slot without blocking the event loop."""
        self._require_open()
        if self.when_busy == "wait" and self._mode == "async":
            while self._pool.in_use >= self._pool.slots:
                await self._slot_freed.wait()
        return self.save(step, state, metadata=metadata)

    def _stage_and_submit(
        self,
        step: int,
        state: Any,
        snapshot: Any,
        metadata_tree: Any,
        buffers: Any,
        started: float,
        wait_ms: float,
    ) -> SaveHandle:
        assert self._log is not None
        if wait_ms:
            self._counts["waits"] += 1
            self._log.info(ev.SAVE_WAITED, step=step, wait_ms=round(wait_ms, 3))
        if any(b.device.type == "cuda" for b in snapshot.blobs) and self._side_stream is None:
            self._side_stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        optimizers = optimizers_in(state) if self.overlap else []
        staged = None
        try:
            with gc_paused():
                modules = modules_in(state) if optimizers else []
                guarded = step_guarded_blobs(snapshot, optimizers, modules)
                staged = stage(
                    snapshot, buffers, side_stream=self._side_stream, deferred=guarded, copier=self._copier
                )
            if guarded:
                self._guard.arm(staged)
        except BaseException:
            if staged is not None:
                staged.settle()  # no copy may still be filling the buffers
            self._pool.release(buffers)
            raise
        future: concurrent.futures.Future[Path] = concurrent.futures.Future()
        done_event = anyio.Event() if self._mode == "async" else None
        name = checkpoint_name(step)
        path = self.directory / name
        job = Job(
            step, name, path, snapshot.tree, snapshot.tensors, metadata_tree, staged, future, 0.0, done_event
        )
        self._track(job)
        self._submit(job)
        stall_ms = (time.perf_counter() - started) * 1000.0
        job.stall_ms = stall_ms
        self._counts["saves"] += 1
        self._last_stall_ms, self._last_wait_ms = stall_ms, wait_ms
        self._log.info(ev.SAVE_STAGED, step=step, stall_ms=round(stall_ms, 3), bytes=snapshot.nbytes)
        return SaveHandle(step, path, future, errors=self._errors, done_event=done_event)

    def _skip(self, step: int) -> SaveHandle:
        assert self._log is not None
        self._counts["skipped"] += 1
        self._log.warning(ev.SAVE_SKIPPED, step=step, reason=f"all {self._pool.slots} staging slots busy")
        return SaveHandle(step, self.directory / checkpoint_name(step), None)

    def _submit(self, job: Job) -> None:
        assert self._send is not None
        if self._mode == "sync":
            assert self._portal is not None
            self._portal.call(self._send.send_nowait, job)
        else:
            self._send.send_nowait(job)

    def _track(self, job: Job) -> None:
        with self._pending_lock:
            self._pending[job.future] = job
        job.future.add_done_callback(self._untrack)

    def _pending_futures(self) -> list[concurrent.futures.Future[Path]]:
        with self._pending_lock:
            return list(self._pending)

    def _log_warning(self, event: str, **fields: Any) -> None:
        if self._log is not None:
            self._log.warning(event, **fields)

    def _untrack(self, future: concurrent.futures.Future[Path]) -> None:
        with self._pending_lock:
            self._pending.pop(future, None)

    def _on_job_done(self, job: Job) -> None:
        # Runs on the event loop (async use): wake any asave() waiting for a slot.
        self._slot_freed.set()
        self._slot_freed = anyio.Event()

    # ------------------------------------------------------------------ overlap

    def wait_staged(self) -> None:
        """Block until every pending copy of parameters and optimizer state is done.

        The next optimizer step does this by itself; call it before changing those tensors in
        place any other way between ``save()`` and that step. On CUDA the wait is on the GPU:
        the current stream is ordered after the copies.
        """
        self._guard.wait()

    # ------------------------------------------------------------------ flushing

    def flush(self, timeout: float | None = None) -> None:
        """Block until every pending save is committed or failed; raise the first failure.

        Raises ``TimeoutError`` when ``timeout`` seconds pass first (the saves go on).
        """
        with self._pending_lock:
            pending = list(self._pending)
        _, not_done = concurrent.futures.wait(pending, timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} checkpoint saves still pending after {timeout} s")
        self._errors.raise_first()

    async def aflush(self) -> None:
        """``flush()`` for async trainers: awaits every pending save, then raises the first failure."""
        await self._drain_async()
        self._errors.raise_first()

    async def _drain_async(self) -> None:
        while True:
            with self._pending_lock:
                pending = list(self._pending)
            if not pending:
                return
            await self._slot_freed.wait()

    # ------------------------------------------------------------------ resuming

    def restore(
        self,
        objects: Mapping[str, Any],
        *,
        map_location: MapLocation = "cpu",
        on_corrupt: OnCorrupt = "fallback",
        validate: bool = True,
        expect: Any = None,
    ) -> LoadResult | None:
        """Load the newest usable checkpoint of this directory into ``objects``.

        Returns None when the directory holds no checkpoint at all (a fresh run); otherwise
        what :func:`asyncckpt.restore` returns, and raises what it raises (``NoValidCheckpointError``
        when checkpoints exist but none is usable). The summary goes to this checkpointer's
        event log when it is open.
        """
        # A pending background copy must not see the loader overwrite its sources.
        self._guard.wait()
        log = self._log.info if self._log is not None else None
        try:
            return loader.restore(
                self.directory,
                objects,
                map_location=map_location,
                on_corrupt=on_corrupt,
                validate=validate,
                expect=expect,
                log=log,
            )
        except NoValidCheckpointError as exc:
            if exc.diagnostics:
                raise
            return None

    # ------------------------------------------------------------------ status

    def stats(self) -> CheckpointerStats:
        """Counters and the last save's stall and write figures."""
        w = self._writer_stats
        with self._pending_lock:
            pending = len(self._pending)
        with w.lock:
            return CheckpointerStats(
                saves=self._counts["saves"],
                committed=w.committed,
                failed=w.failed,
                skipped=self._counts["skipped"],
                waits=self._counts["waits"],
                pending=pending,
                bytes_written=w.bytes_written,
                last_step=w.last_step,
                last_stall_ms=self._last_stall_ms,
                last_wait_ms=self._last_wait_ms,
                last_write_ms=w.last_write_ms,
                last_fsync_ms=w.last_fsync_ms,
                last_total_ms=w.last_total_ms,
                last_bytes=w.last_bytes,
                last_mb_s=w.last_mb_s,
                staging_bytes=self._pool.nbytes,
                staging_allocations=self._pool.allocations,
            )

    def _require_open(self) -> None:
        if self._mode is None:
            raise CheckpointError(
                "AsyncCheckpointer is not open: use `with AsyncCheckpointer(dir) as ckpt:` or `async with`"
            )
