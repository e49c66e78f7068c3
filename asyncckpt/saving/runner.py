"""The writer's two lifecycles: a sync runner and an async runner over one shared base.

:class:`SyncRunner` runs the writer task on an anyio event loop in a background thread (a
blocking portal), for trainers that use ``with``; :class:`AsyncRunner` runs it in a task group
of the caller's event loop, for ``async with``. Both take the same jobs, hand them to the same
:class:`~asyncckpt.saving.writer.Writer`, and close the same way: wait for the pending saves (at
most ``close_timeout``), abandon those that are stuck, stop the writer, raise the first failure.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import functools
import math
import threading
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import anyio
import anyio.from_thread
import anyio.to_thread
from anyio.abc import TaskGroup
from anyio.from_thread import BlockingPortal

from .. import events as ev
from .._priority import BackgroundThread, lower_this_thread
from ..errors import CheckpointBusyError, CheckpointWriteError
from ..storage import CheckpointPath
from .errorbox import ErrorBox
from .job import Deletion, Job
from .pending import PendingSaves
from .plan import SavePlan
from .staging import Buffers, StagingPool
from .writer import Writer

Mode = Literal["sync", "async"]


class Runner(abc.ABC):
    """What both lifecycles share: the writer, the queue of jobs to it, the pending saves.

    ``log`` is the open checkpointer's event log; ``errors`` collects the background failures
    that closing raises; ``nice``: the nice value of the writer's threads (None: left as they
    are; see :mod:`asyncckpt._priority`).
    """

    mode: ClassVar[Mode]

    def __init__(
        self,
        writer: Writer,
        *,
        pending: PendingSaves,
        errors: ErrorBox,
        log: ev.EventLog,
        close_timeout: float | None,
        directory: CheckpointPath,
        nice: int | None = None,
    ) -> None:
        self.writer = writer
        self.nice = nice
        self.pending = pending
        self.errors = errors
        self.log = log
        self.close_timeout = close_timeout
        self.directory = directory
        self._send, self._receive = anyio.create_memory_object_stream[Job | Deletion](math.inf)

    @abc.abstractmethod
    def submit(self, job: Job | Deletion, *, staged: dict[str, Any] | None = None) -> None:
        """Queue ``job`` for the writer; never blocks (the queue is bounded by the staging slots
        and by the deletions the caller asks for). ``staged``: the fields of the job's
        ``checkpoint.save.staged`` event, logged before the writer has the job, on the
        writer's loop: an append to the event log can wait behind a busy disk's journal,
        and the trainer must not."""

    @abc.abstractmethod
    def acquire_busy(self, pool: StagingPool, plan: SavePlan) -> Buffers:
        """A buffer set for ``plan`` when every slot is busy and ``when_busy="wait"``."""

    def done_event(self) -> anyio.Event | None:
        """An event for a new job's handle to await, where awaiting needs one (async use)."""
        return None

    async def wait_for_slot(self, pool: StagingPool) -> None:  # noqa: B027 (sync use: save() waits)
        """Return once ``pool`` has a free slot, without blocking an event loop (``asave``)."""

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait until no save is pending, without blocking the event loop."""

    def _lowered(self, error: OSError | None) -> None:
        """Log that the writer's threads could not be lowered (they run on as they are)."""
        if error is not None:
            self.log.warning(ev.WRITER_PRIORITY_FAILED, nice=self.nice, error=str(error))

    def abandon_pending(self) -> CheckpointWriteError:
        """Fail every pending save after ``close_timeout``; return the error for the trainer."""
        reason = f"did not finish within close_timeout={self.close_timeout} s (the storage seems stuck)"
        jobs = self.pending.abandon(reason, self.log)
        steps = ", ".join(str(job.step) for job in jobs)
        error = CheckpointWriteError(
            f"checkpoint saves of step {steps} {reason}; they were abandoned and never publish; "
            "older checkpoints are intact and the next start removes any temp file",
            path=self.directory,
            step=jobs[-1].step if jobs else None,
        )
        try:
            self.errors.raise_first()
        except CheckpointWriteError as earlier:
            error.add_note(f"also failed: {earlier}")
        return error


class SyncRunner(Runner):
    """The writer on an event loop in a background thread (a blocking portal)."""

    mode = "sync"
    _portal_cm: Any = None
    _portal: BlockingPortal | None = None
    _writer_done: Any = None  # the concurrent.futures.Future of the writer task

    _loop: asyncio.AbstractEventLoop | None = None
    _workers: set[threading.Thread]  # the loop's worker threads that ran the writer's work

    def start(self) -> None:
        """Start the portal thread and the writer task in it."""
        self._workers = set()
        self.writer.offload = self._in_worker_thread
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self._loop = self._portal.call(asyncio.get_running_loop)
        if self.nice is not None:  # before the loop starts a worker thread: they inherit its priority
            self._lowered(self._portal.call(lower_this_thread, self.nice))
        self._writer_done = self._portal.start_task_soon(self.writer.run, self._receive)

    async def _in_worker_thread(self, work: Callable[[], None]) -> None:
        """Run ``work`` in a worker thread of the loop, remembered so that closing waits for it
        to exit; cancelled, it runs on, abandoned."""
        await anyio.to_thread.run_sync(self._run_remembered, work, abandon_on_cancel=True)

    def _run_remembered(self, work: Callable[[], None]) -> None:
        self._workers.add(threading.current_thread())
        work()

    def submit(self, job: Job | Deletion, *, staged: dict[str, Any] | None = None) -> None:
        # Hand the job over without waiting for the event loop to take it: a portal call is a
        # round trip, and the trainer would wait for the writer's thread to get the GIL.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, job, staged)

    def _deliver(self, job: Job | Deletion, staged: dict[str, Any] | None = None) -> None:
        """Queue ``job`` for the writer (on the event loop), after logging its ``staged``
        event; fail it if the writer has stopped."""
        if staged is not None:
            self.log.info(ev.SAVE_STAGED, **staged)
        try:
            self._send.send_nowait(job)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            if isinstance(job, Deletion):  # nothing was deleted: the checkpoint stays
                return
            reason = "the writer had stopped; nothing was written"
            error = CheckpointWriteError(reason, path=job.path, step=job.step)
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                job.future.set_exception(error)

    def acquire_busy(self, pool: StagingPool, plan: SavePlan) -> Buffers:
        buffers = pool.acquire(plan.layout)
        assert buffers is not None  # no timeout
        return buffers

    async def drain(self) -> None:
        await anyio.to_thread.run_sync(self.pending.wait)
        await anyio.to_thread.run_sync(self.writer.wait_pruned)

    def close(self, body_error: BaseException | None) -> None:
        """Wait for the pending saves (at most ``close_timeout``), stop the writer and the thread.

        Raises the first failure, or the :class:`CheckpointWriteError` naming the saves abandoned
        after ``close_timeout``, unless ``body_error`` (the exception leaving the ``with`` body)
        is set: then the failure becomes a note on it.
        """
        try:
            finish_close(body_error, self._flush)
        finally:
            self._stop()

    def _flush(self) -> None:
        if self.pending.wait(self.close_timeout):
            assert self._portal is not None
            self._portal.call(self.writer.abandon)
            raise self.abandon_pending()
        self.errors.raise_first()

    def _stop(self) -> None:
        try:
            if self._portal is not None:
                self._portal.call(self._send.close)
            if self._writer_done is not None:
                self._writer_done.result()
        finally:
            if self._portal_cm is not None:
                self._portal_cm.__exit__(None, None, None)  # its loop's end stops the worker threads
            self._portal = self._portal_cm = self._writer_done = self._loop = None
            self._join_workers()

    def _join_workers(self) -> None:
        """Wait for the worker threads to exit (but one stuck in an abandoned write).

        They are daemon threads (the portal's thread starts them), and a worker drops its last
        job, with the staging buffers' tensors, only after it reports the job done. Left
        running past the trainer's exit, it could free a tensor during the interpreter's
        finalization, which ends the thread inside torch's C++ code and aborts the process
        ("terminate called without an active exception").
        """
        if self.writer.storage.abandoned.is_set():
            return  # a stuck write's thread runs on; it never publishes (see Writer.abandon)
        for thread in self._workers:
            thread.join()
        self._workers.clear()


class AsyncRunner(Runner):
    """The writer as a task in the caller's event loop."""

    mode = "async"
    _task_group: TaskGroup | None = None
    _thread: BackgroundThread | None = None
    _slot_freed: anyio.Event

    async def start(self) -> None:
        """Start the writer task in a task group of the running event loop; with ``nice``, its
        blocking work runs in a thread of its own at that priority."""
        self._slot_freed = anyio.Event()
        if self.nice is not None:
            self._thread = BackgroundThread()
            self.writer.offload = self._thread.run_sync
            self._lowered(await self._thread.run_sync(functools.partial(lower_this_thread, self.nice)))
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        task_group.start_soon(self.writer.run, self._receive, self._job_done)

    def _job_done(self, job: Job | Deletion) -> None:
        # Runs on the event loop after each job: wake whoever waits for a slot or a drain.
        self._slot_freed.set()
        self._slot_freed = anyio.Event()

    def submit(self, job: Job | Deletion, *, staged: dict[str, Any] | None = None) -> None:
        if staged is not None:  # the trainer is the loop's task here: nothing to move off it
            self.log.info(ev.SAVE_STAGED, **staged)
        self._send.send_nowait(job)

    def acquire_busy(self, pool: StagingPool, plan: SavePlan) -> Buffers:
        raise CheckpointBusyError(
            f"step {plan.step}: all {pool.slots} staging slots are busy and waiting would "
            "block the event loop; use `await ckpt.asave(step, state)` or when_busy='skip'",
            step=plan.step,
        )

    def done_event(self) -> anyio.Event:
        return anyio.Event()

    async def wait_for_slot(self, pool: StagingPool) -> None:
        while pool.in_use >= pool.slots:
            await self._slot_freed.wait()

    async def drain(self) -> None:
        while len(self.pending):
            await self._slot_freed.wait()
        await anyio.to_thread.run_sync(self.writer.wait_pruned)

    async def aclose(self, body_error: BaseException | None) -> None:
        """:meth:`SyncRunner.close` for async use. Shielded: cancelling the caller does not
        drop the pending saves (``close_timeout`` bounds the wait)."""
        abandoned: CheckpointWriteError | None = None
        try:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(self.close_timeout) as deadline:
                    await self.drain()
                if deadline.cancelled_caught:
                    self.writer.abandon()
                    abandoned = self.abandon_pending()
        finally:
            self._send.close()
            if self._task_group is not None:
                await self._task_group.__aexit__(None, None, None)
                self._task_group = None
            if self._thread is not None:
                thread, self._thread = self._thread, None
                thread.close()
                if abandoned is None:  # else its write may be stuck: it runs on, never publishes
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(thread.join)

        def raise_failures() -> None:
            if abandoned is not None:
                raise abandoned
            self.errors.raise_first()

        finish_close(body_error, raise_failures)


def finish_close(body_error: BaseException | None, flush: Callable[[], None]) -> None:
    """Run ``flush``; a failure of it never hides the exception that ends the body."""
    try:
        flush()
    except CheckpointWriteError as error:
        if body_error is None:
            raise
        body_error.add_note(f"asyncckpt: a pending checkpoint failed too: {error}")
