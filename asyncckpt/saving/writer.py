"""The background writer: an anyio task that makes staged checkpoints durable, one at a time.

Per checkpoint, in a worker thread (file I/O, fsync and CRC32C release the GIL): write the
checkpoint through the storage, each blob as soon as its staging copy is done, then the header →
durable (fsync) → verify the durable bytes → commit (rename, fsync directory) → commit event →
retention → release the buffers. A failure is logged at once and handed to the trainer through
the job's future and the error box; it never escapes into another thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import threading
import time
from collections.abc import Awaitable, Callable

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from .. import events as ev
from .. import format as fmt
from ..catalog import checkpoint_name, committed
from ..errors import CheckpointWriteError
from ..storage import Body, Sink, Storage, Written, path_of
from .abandon import AbandonableStorage
from .errorbox import ErrorBox
from .job import Deletion, Job
from .readback import VerifyMode, verify_written
from .retention import prunable
from .snapshot import encoded_layout
from .staging import StagingPool, StagingRaceError
from .stats import SaveStats

Offload = Callable[[Callable[[], None]], Awaitable[object]]  # runs blocking work off the event loop


class Writer:
    """Writes jobs received on a stream, in order. Same code for sync and async use.

    ``verify`` says what is read back before the commit: the structure (prelude, trailer, size,
    header CRC), the full file (also every blob's checksum and the step), or nothing.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        pool: StagingPool,
        verify: VerifyMode,
        keep_last: int | None,
        keep_every: int | None,
        log: ev.EventLog,
        errors: ErrorBox,
        stats: SaveStats,
    ) -> None:
        self.storage = AbandonableStorage(storage)
        self.pool = pool
        self._pruning = threading.Lock()  # held while a committed save's retention runs
        self.verify = verify
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.log = log
        self.errors = errors
        self.stats = stats
        self._scope: anyio.CancelScope | None = None
        self._last_save_failed = False  # whether the last save processed failed (see delete)
        # Where each job's blocking work runs: a worker thread of the event loop, or a thread
        # of the runner's own (async use with a lowered priority, see asyncckpt._priority).
        self.offload: Offload = _in_worker_thread

    async def run(
        self,
        jobs: MemoryObjectReceiveStream[Job | Deletion],
        on_done: Callable[[Job | Deletion], None] | None = None,
    ) -> None:
        """Process jobs (and deletions) in order until the stream is closed and drained, or until
        :meth:`abandon`.

        After each job: set its ``done_event``, then call ``on_done`` (on the event loop).
        Shielded: the caller's cancellation must not drop checkpoints already queued.
        """
        with anyio.CancelScope(shield=True) as scope:
            self._scope = scope
            async with jobs:
                async for job in jobs:
                    if isinstance(job, Deletion):
                        await self.offload(functools.partial(self.delete, job))
                    else:
                        await self.offload(functools.partial(self.process, job))
                    if job.done_event is not None:
                        job.done_event.set()
                    if on_done is not None:
                        on_done(job)

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

    def delete(self, deletion: Deletion) -> None:
        """Delete ``deletion.name`` unless the last save before it failed (in a worker thread).

        Jobs run in the order they were queued, so the last save this writer processed is the
        last one queued before the deletion. Never raises: the checkpoints are intact either
        way; a failure is logged.
        """
        where = str(deletion.path)
        if self._last_save_failed:
            self.log.warning(ev.DELETE_SKIPPED, path=where, reason="the save queued before it failed")
            return
        try:
            self.storage.delete([deletion.name])
        except OSError as exc:
            self.log.warning(ev.DELETE_FAILED, path=where, error=str(exc))
            return
        self.log.info(ev.DELETED, path=where)

    def process(self, job: Job) -> None:
        """Make one job durable (in a worker thread); settle its future either way.

        Retention comes after: the handle resolves, and the staging buffers are free, once the
        checkpoint is committed; deleting older ones (a fraction of a second per GiB on a
        filesystem that discards freed blocks), and the file this one replaced under the same
        name (kept aside by the commit), is not part of this one's durability.
        :meth:`wait_pruned` (``flush()``, ``close()``) waits for it.
        """
        self._last_save_failed = True  # until it commits
        committed = False
        try:
            self._commit(job)
        except BaseException as exc:
            error = _as_write_error(job, exc)
            self.stats.count_failure()
            self.log.error(ev.SAVE_FAILED, step=job.step, path=str(job.path), error=str(error))
            self.errors.put(error)
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # settled by abandon
                job.future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
        else:
            self._last_save_failed = False
            committed = True
        finally:
            job.staged.settle()  # no copy may still be filling the buffers when they are reused
            self.pool.release(job.staged.buffers)
        if committed:
            with self._pruning:  # taken before the handle resolves: a flush() after it waits
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    job.future.set_result(job.path)
                self.storage.drop_replaced()  # the file this save replaced, if any
                self._retain(job.name)

    def wait_pruned(self, timeout: float | None = None) -> bool:
        """Wait until no retention of a committed save is running; False after ``timeout``."""
        if not self._pruning.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            return False
        self._pruning.release()
        return True

    def _commit(self, job: Job) -> None:
        """Write → fsync → verify the durable bytes → commit (rename).

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
        mb_s = self.stats.count_commit(
            step=job.step,
            nbytes=written.nbytes,
            write_s=written.write_s,
            fsync_s=written.fsync_s,
            total_ms=total_ms,
        )
        self.log.info(
            ev.SAVE_COMMITTED,
            step=job.step,
            path=str(job.path),
            bytes=written.nbytes,
            write_ms=round(written.write_s * 1000.0, 3),
            fsync_ms=round(written.fsync_s * 1000.0, 3),
            publish_ms=round(publish_s * 1000.0, 3),
            total_ms=round(total_ms, 3),
            mb_s=round(mb_s, 1),
        )

    def _verify(self, job: Job, written: Written) -> None:
        verify_written(self.storage, written, mode=self.verify, step=job.step, path=job.path)

    def _retain(self, protect: str) -> None:
        """Retention after the save named ``protect`` committed. A failure (listing or deleting)
        is logged, never raised: the save is committed already, and a file left over (or back
        after a power loss) is retried at the next commit."""
        if self.keep_last is None:  # the caller owns retention (it deletes through delete())
            return
        doomed = []
        try:
            doomed = prunable(
                committed(self.storage),
                keep_last=self.keep_last,
                keep_every=self.keep_every,
                protect=path_of(self.storage.where(protect)),
            )
            if doomed:
                self.storage.delete([checkpoint_name(info.step) for info in doomed])
        except Exception as exc:
            self.log.warning(ev.PRUNE_FAILED, steps=[c.step for c in doomed], error=str(exc))
            return
        for info in doomed:
            self.log.info(ev.PRUNED, step=info.step, path=str(info.path), bytes=info.size)


async def _in_worker_thread(work: Callable[[], None]) -> None:
    """Run ``work`` in a worker thread of the event loop; cancelled, it runs on, abandoned."""
    await anyio.to_thread.run_sync(work, abandon_on_cancel=True)


def _encoder(job: Job) -> Body:
    header = fmt.prepare_header(  # every format limit, before the storage sees a byte
        step=job.step, metadata=job.metadata, layout=_encoded_layout(job)
    )

    def body(sink: Sink) -> int:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-crc") as checksums:
            # written as the copies finish; large blobs checksummed beside the write
            return job.staged.write(sink, header, checksum_pool=checksums)

    return body


def _encoded_layout(job: Job) -> fmt.EncodedLayout:
    """The header's tensor table and tree, the table encoded once per structure (in its memo)."""
    sizes = job.staged.buffers.sizes
    if job.structure is None:
        return fmt.encode_layout(tree=job.tree, tensors=job.tensors, sizes=sizes)
    return encoded_layout(job.structure, job.tree, sizes)


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
