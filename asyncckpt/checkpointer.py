"""AsyncCheckpointer: the trainer-facing object; options, and the wiring of the save side and the loader.

``save()`` goes one way down through the :class:`~asyncckpt.pipeline.SavePipeline` (the first
save's clean-up, the mode's plan, a staging slot, the stager's copy, the job) to the writer of
the open lifecycle, a :class:`~asyncckpt.saving.runner.SyncRunner` (``with``: an event loop in a
background thread) or an :class:`~asyncckpt.saving.runner.AsyncRunner` (``async with``: the
caller's task group), which :func:`~asyncckpt.opening.open_runner` builds. What differs on
several ranks is the mode's (:mod:`asyncckpt.modes`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import structlog

from . import events as ev
from .catalog import check_name, checkpoint_name
from .errors import UsageError
from .loading import LoadResult, MapLocation, OnCorrupt
from .modes import checkpointer_mode
from .multirank import DEFAULT_COORDINATION_TIMEOUT_S
from .opening import open_runner
from .pipeline import FirstSave, SavePipeline
from .preemption import CallsInProgress, SigtermFlusher
from .saving.handles import SaveHandle
from .saving.job import Deletion
from .saving.options import DEFAULT_BACKGROUND_NICE, check_background_nice, check_options
from .saving.options import WhenBusy as WhenBusy
from .saving.readback import VerifyMode
from .saving.runner import AsyncRunner, Runner, SyncRunner
from .saving.stats import CheckpointerStats
from .storage import OS, CheckpointPath, FileOps, Storage, path_of
from .storage.localcopy import open_run_storage

R = TypeVar("R", bound=Runner)


class AsyncCheckpointer:
    """Asynchronous, durable checkpoints of a training run into ``directory``, one file per step.

    ``directory`` is a local path, a URL of an object store (``s3://bucket/run``, any fsspec
    filesystem; docs/REMOTE.md) or a :class:`~asyncckpt.storage.Storage` (e.g. an
    ``FsspecStorage`` with its own part size and retry policy). Use as ``with`` (sync trainers)
    or ``async with`` (async trainers). Options:

    - ``keep_last`` / ``keep_every``: retention (the newest valid checkpoint is never deleted).
      ``keep_last=None`` deletes nothing: the caller owns retention (e.g. a framework that
      names its checkpoints itself) and deletes through :meth:`delete`.
    - ``max_pending``: staging buffer sets, i.e. checkpoints in flight; the memory bound.
    - ``when_busy``: ``"wait"`` blocks ``save()`` until a slot frees, ``"skip"`` drops the save.
    - ``verify``: before each commit read the durable file back and check prelude, trailer, size
      and header CRC (``"structure"``), also decode the header and re-check every blob's
      checksum (``"full"``), or not at all (``"none"``). A file that fails is never published.
    - ``event_log``: JSON-lines event file (default ``<directory>/events.jsonl``; for a URL
      ``<local_copy>/events.jsonl``, or, without a local copy, structlog's "asyncckpt" logger).
    - ``storage_options``: passed to fsspec for a URL (credentials, ``endpoint_url``, ...);
      ignored for a local path.
    - ``local_copy``: a local directory (e.g. on NVMe) that keeps the newest committed step as
      well (URLs only). The same bytes go to both at once; the upload's commit is the commit.
      :meth:`restore` reads the local copy when it matches the remote commit record (size and
      every part's CRC32C), and the remote object otherwise. A local copy that cannot be
      written only logs ``checkpoint.local_copy.failed``.
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
      short by the exit (their temp files are removed at the next start). Needs ``with`` in the
      main thread.
    - ``close_timeout``: how long leaving the context waits for pending saves (default: as long as
      the storage takes). When it passes, the stuck saves are abandoned and leaving raises
      :class:`CheckpointWriteError` naming them; older checkpoints stay intact. A stuck OS call
      cannot be interrupted: its worker thread is a daemon thread, so it never keeps the
      interpreter from exiting, and it never publishes the abandoned file; its temp file is
      removed if the storage recovers, else at the next start.
    - ``staging_budget``: host memory (bytes) the staging buffers may hold, all ``max_pending``
      sets together (default: one full copy of the state per set). A state larger than a set's
      share streams through it in pieces while the writer writes: ``save()`` returns once the
      tensors the optimizer step does not guard are copied, and the next optimizer step waits
      until the whole state is copied (so the stall grows as the budget shrinks; the checkpoint
      is one consistent state either way). For ``with`` use; at least 64 KiB per set.
    - ``process_group`` / ``coordination_timeout``: distributed mode (docs/MULTI_GPU.md), on
      by itself when ``torch.distributed`` is initialized with more than one rank (a
      ``process_group`` picks the ranks, and turns it on at one rank too). Every rank opens the
      checkpointer and calls ``save()`` and ``restore()`` with the same steps in the same order:
      each step is a multi-rank step (one shard file per rank, a commit record written last),
      written in the background over asyncckpt's own gloo group, whose every exchange is
      bounded by ``coordination_timeout`` seconds. ``when_busy="skip"`` is refused there (the
      ranks would skip different steps).
    - ``background_nice``: the writer's threads (write, fsync, checksums, verification, uploads)
      run this many nice levels below the thread that opens the checkpointer (Linux; 0 leaves
      them as they are), so that training threads win a busy core (docs/OPERATIONS.md).

    Bad options raise :class:`asyncckpt.errors.UsageError`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | Storage,
        *,
        keep_last: int | None = 3,
        keep_every: int | None = None,
        max_pending: int = 1,
        when_busy: WhenBusy = "wait",
        verify: VerifyMode = "structure",
        event_log: str | os.PathLike[str] | None = None,
        handle_sigterm: bool = False,
        close_timeout: float | None = None,
        overlap: bool = True,
        staging_budget: int | None = None,
        process_group: Any = None,
        coordination_timeout: float = DEFAULT_COORDINATION_TIMEOUT_S,
        storage_options: dict[str, Any] | None = None,
        local_copy: str | os.PathLike[str] | None = None,
        background_nice: int = DEFAULT_BACKGROUND_NICE,
        ops: FileOps = OS,
    ) -> None:
        check_options(when_busy, verify, keep_last, keep_every, max_pending, close_timeout)
        self.background_nice = check_background_nice(background_nice)
        self._mode = checkpointer_mode(
            process_group, timeout=coordination_timeout, when_busy=when_busy, staging_budget=staging_budget
        )
        self.directory: CheckpointPath = path_of(
            directory.location if isinstance(directory, Storage) else directory
        )
        self.local_copy = Path(local_copy) if local_copy is not None else None
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.when_busy = when_busy
        self.verify: VerifyMode = verify
        self.event_log_path = ev.default_path(event_log, self.directory, self.local_copy)
        self.handle_sigterm = handle_sigterm
        self.close_timeout = close_timeout
        self.overlap = overlap
        self._ops = ops
        self._storage = open_run_storage(
            directory, storage_options=storage_options, local_copy=local_copy, ops=ops, notify=self._notify
        )
        self.staging_budget = staging_budget
        self._pipeline = pipeline = SavePipeline(
            self._mode, max_pending=max_pending, staging_budget=staging_budget, directory=self.directory
        )
        self._pool, self._stager, self._pending = pipeline.pool, pipeline.stager, pipeline.pending
        self._errors, self._stats = pipeline.errors, pipeline.stats
        self._saves_in_progress = CallsInProgress()
        self._runner: Runner | None = None
        self._first_save: FirstSave | None = None
        self._sigterm: SigtermFlusher | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> AsyncCheckpointer:
        self._require_closed()
        if self.handle_sigterm:  # first: off the main thread this refuses before anything starts
            sigterm = SigtermFlusher(
                pending=self._pending.futures, saves=self._saves_in_progress, log=self._log_warning
            )
            sigterm.install()
            self._sigterm = sigterm
        try:
            self._open(SyncRunner).start()
        except BaseException:
            self._closed()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        runner = self._runner
        if runner is None:
            return
        if not isinstance(runner, SyncRunner):
            raise UsageError("this AsyncCheckpointer was opened with `async with`: leave it the same way")
        try:
            runner.close(exc)
        finally:
            self._closed()

    async def __aenter__(self) -> AsyncCheckpointer:
        self._require_closed()
        if self.staging_budget is not None:  # save() may wait for the writer: not on its loop
            raise UsageError("staging_budget needs `with` (sync use); leave it out for `async with`")
        try:
            await self._open(AsyncRunner).start()
        except BaseException:
            self._closed()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        runner = self._runner
        if runner is None:
            return
        if not isinstance(runner, AsyncRunner):
            raise UsageError("this AsyncCheckpointer was opened with `with`: leave it the same way")
        try:
            await runner.aclose(exc)
        finally:
            self._closed()

    def close(self) -> None:
        """Flush pending saves and stop the writer (what leaving ``with`` does)."""
        self.__exit__(None, None, None)

    def _notify(self, event: str, **fields: Any) -> None:
        """An event of the storage (the local copy used, ignored or failed)."""
        log: Any = self._runner.log if self._runner is not None else structlog.get_logger("asyncckpt")
        (log.info if event == ev.LOCAL_COPY_USED else log.warning)(event, **fields)

    def _open(self, kind: type[R]) -> R:
        """Build the writer and its runner; remove nothing (read-only use must not touch a
        trainer's files: the first save cleans up, see :class:`~asyncckpt.opening.FirstSave`)."""
        self._runner, self._first_save = runner, _ = open_runner(
            kind,
            self._pipeline,
            storage=self._storage,
            event_log=self.event_log_path,
            local_copy=self.local_copy,
            ops=self._ops,
            verify=self.verify,
            keep_last=self.keep_last,
            keep_every=self.keep_every,
            close_timeout=self.close_timeout,
            background_nice=self.background_nice,
        )
        return runner

    def _closed(self) -> None:
        """Release what the open checkpointer held: SIGTERM, the step hook, the copier, the log."""
        runner, self._runner = self._runner, None
        if self._sigterm is not None:
            self._sigterm.uninstall()
            self._sigterm = None
        self._stager.close()
        self._mode.close()
        if runner is not None:
            runner.log.info(ev.WRITER_STOPPED, committed=self._stats.committed)
            runner.log.close()

    def _require_closed(self) -> None:
        if self._runner is not None:
            raise UsageError("this AsyncCheckpointer is already open")

    def _require_open(self) -> Runner:
        if self._runner is None:
            raise UsageError(
                "AsyncCheckpointer is not open: use `with AsyncCheckpointer(dir) as ckpt:` or `async with`"
            )
        return self._runner

    def _log_warning(self, event: str, **fields: Any) -> None:
        if self._runner is not None:
            self._runner.log.warning(event, **fields)

    # ------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        state: Any,
        *,
        metadata: dict[str, Any] | None = None,
        name: str | None = None,
        overlap_with: Sequence[Any] = (),
    ) -> SaveHandle:
        """Stage ``state`` for step ``step`` and queue it for the background writer.

        The file is ``step-0000000300.ckpt`` in the directory, or ``name`` (a plain file name
        ending in ``.ckpt``, e.g. the one a framework chose): a later save at the same name
        replaces it atomically. ``overlap_with``: modules and optimizers whose parameters and
        optimizer state ``state`` holds without holding the objects (a state dict built from
        them); those tensors are copied while training runs on, as if the objects were in
        ``state``.

        Returns when the state is staged (CPU: copied; CUDA: copies enqueued). Raises
        :class:`asyncckpt.errors.UnsupportedValueError` (a ``TypeError``) naming the key path of a
        value that cannot be stored (nothing is queued), :class:`asyncckpt.errors.UsageError`
        when the checkpointer is not open, and :class:`CheckpointWriteError` for an earlier
        background failure not yet reported. When every slot is busy: waits
        (``when_busy="wait"``; in async use this raises :class:`CheckpointBusyError` instead, see
        ``asave``) or returns a skipped handle.
        """
        with self._saves_in_progress:  # a SIGTERM also waits for the save() it interrupted
            return self._save(step, state, metadata, name, overlap_with)

    async def asave(
        self,
        step: int,
        state: Any,
        *,
        metadata: dict[str, Any] | None = None,
        name: str | None = None,
        overlap_with: Sequence[Any] = (),
    ) -> SaveHandle:
        """``save()`` for async trainers: waits for a free slot without blocking the event loop.

        Raises what ``save()`` raises. Cancelled while it waits for a slot, it stages nothing.
        """
        runner = self._require_open()
        if self.when_busy == "wait":
            await runner.wait_for_slot(self._pool)
        return self.save(step, state, metadata=metadata, name=name, overlap_with=overlap_with)

    def _save(
        self,
        step: int,
        state: Any,
        metadata: dict[str, Any] | None,
        name: str | None,
        overlap_with: Sequence[Any],
    ) -> SaveHandle:
        runner = self._require_open()
        self._errors.raise_first()
        assert self._first_save is not None
        return self._pipeline.save(
            runner,
            self._first_save,
            step,
            state,
            name=checkpoint_name(step) if name is None else check_name(name),
            metadata=metadata,
            overlap=self.overlap,
            overlap_with=overlap_with,
            when_busy=self.when_busy,
        )

    # ------------------------------------------------------------------ deleting

    def delete(self, name: str) -> None:
        """Delete the checkpoint ``name`` of this directory once the saves queued before are done.

        For callers that own retention (``keep_last=None``). The deletion waits its turn behind
        every save already queued, so it never removes a checkpoint before a newer one is
        committed; if the last of those saves fails, ``name`` is kept (an older intact checkpoint
        is worth more than its space). Returns at once; the writer logs the outcome
        (``checkpoint.deleted``, ``checkpoint.delete_skipped``, ``checkpoint.delete_failed``)
        and never raises for it. Raises :class:`asyncckpt.errors.UsageError` for a name that is
        not a checkpoint's or when the checkpointer is not open.
        """
        runner = self._require_open()
        check_name(name)
        runner.submit(Deletion(name=name, path=self.directory / name))

    # ------------------------------------------------------------------ overlap

    def wait_staged(self) -> None:
        """Block until every pending copy of parameters and optimizer state is done.

        The next optimizer step does this by itself; call it before changing those tensors in
        place any other way between ``save()`` and that step. On CUDA the wait is on the GPU:
        the current stream is ordered after the copies.
        """
        self._stager.guard.wait()

    # ------------------------------------------------------------------ flushing

    def flush(self, timeout: float | None = None) -> None:
        """Block until every pending save is committed or failed; raise the first failure.

        Raises ``TimeoutError`` when ``timeout`` seconds pass first (the saves go on).
        """
        not_done = self._pending.wait(timeout)
        if not_done:
            raise TimeoutError(f"{not_done} checkpoint saves still pending after {timeout} s")
        runner = self._runner
        if runner is not None and not runner.writer.wait_pruned(timeout):  # retention after a commit
            raise TimeoutError(f"retention of older checkpoints still running after {timeout} s")
        self._errors.raise_first()

    async def aflush(self) -> None:
        """``flush()`` for async trainers: awaits every pending save, then raises the first failure.

        Cancelled, it stops waiting; the saves go on.
        """
        if self._runner is not None:
            await self._runner.drain()
        self._errors.raise_first()

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

        In distributed mode it is collective, and returns the same step on every rank, or None
        everywhere (see docs/MULTI_GPU.md): pending saves are waited for first; modules and
        optimizers are loaded through DCP at any world size; ``result.state`` holds this rank's
        own values. Shards are always checked in full there (``validate`` and ``map_location``
        do not apply). A directory whose newest step is a multi-rank one is restored that way
        in a plain process too (a group of one).
        With ``local_copy``, a step is read from the local copy when that matches the remote
        commit record, else from the remote store.
        """
        # A pending background copy must not see the loader overwrite its sources.
        self._stager.guard.wait()
        return self._mode.restore(
            self._storage,
            self.directory,
            objects,
            pending=self._pending,
            runner=self._runner,
            map_location=map_location,
            on_corrupt=on_corrupt,
            validate=validate,
            expect=expect,
            log=self._runner.log.info if self._runner is not None else None,
        )

    # ------------------------------------------------------------------ status

    def stats(self) -> CheckpointerStats:
        """Counters and the last save's stall and write figures."""
        return self._stats.report(
            pending=len(self._pending),
            staging_bytes=self._pool.nbytes,
            staging_allocations=self._pool.allocations,
        )
