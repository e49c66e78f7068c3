"""One ``AsyncCheckpointer.save()``, from the trainer's state to the writer's queue.

The way down: the first save's preparation (:class:`FirstSave`) → the
mode's plan (checked and flattened state, the blobs that overlap) → a staging slot
(``when_busy``) → the :class:`~asyncckpt.saving.stager.Stager`'s copy → the mode's job → the
runner's queue. The trainer's stall ends there; the figures go to the stats and the events.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Sequence
from typing import Any

import torch

from . import events as ev
from .errors import CheckpointWriteError
from .modes import Mode
from .saving.errorbox import ErrorBox
from .saving.handles import SaveHandle
from .saving.options import WhenBusy
from .saving.pending import PendingSaves
from .saving.runner import Runner
from .saving.stager import Stager
from .saving.staging import StagingPool
from .saving.stats import SaveStats
from .saving.streaming import StreamedCopy
from .storage import CheckpointPath, Storage


class SavePipeline:
    """The save side an ``AsyncCheckpointer`` wires together (one per checkpointer): the staging
    pool (``max_pending`` buffer sets within ``staging_budget``), the stager, the pending saves,
    the error box and the counters, for saves of ``mode`` into ``directory``."""

    def __init__(
        self, mode: Mode, *, max_pending: int, staging_budget: int | None, directory: CheckpointPath
    ) -> None:
        self.mode = mode
        self.pool = StagingPool(max_pending, pin_memory=torch.cuda.is_available(), budget=staging_budget)
        self.stager = Stager(self.pool)
        self.pending = PendingSaves()
        self.errors = ErrorBox()
        self.stats = SaveStats()
        self.directory = directory

    def save(
        self,
        runner: Runner,
        first_save: FirstSave,
        step: int,
        state: Any,
        *,
        name: str,
        metadata: dict[str, Any] | None,
        overlap: bool,
        overlap_with: Sequence[Any],
        when_busy: WhenBusy,
    ) -> SaveHandle:
        """Stage ``state`` and queue it for ``runner``'s writer (see ``AsyncCheckpointer.save``)."""
        first_save.prepare(runner.log)
        started = time.perf_counter()
        planned = self.mode.plan(step, state, metadata, overlap=overlap, live=overlap_with)
        plan = planned.plan
        buffers = self.pool.try_acquire(plan.layout)
        wait_ms = 0.0
        if buffers is None:
            if when_busy == "skip":
                return self._skip(runner, step, name)
            buffers = runner.acquire_busy(self.pool, plan)
            plan.snapshot.versions = None  # read at staging, after the wait, not before it
            wait_ms = (time.perf_counter() - started) * 1000.0
            self.stats.count_wait()
            runner.log.info(ev.SAVE_WAITED, step=step, wait_ms=round(wait_ms, 3))
        with self.stager.copier.held():  # the background copies start once the writer has the job
            staged = self.stager.stage(plan, buffers)
            job = self.mode.job(planned, name, staged, runner, self.directory)
            self.pending.add(job)
            if isinstance(staged, StreamedCopy):
                runner.submit(job)  # the writer empties the buffer the rest of the state streams through
                staged.wait_eager()
            stall_ms = (time.perf_counter() - started) * 1000.0
            self.stats.count_staged(stall_ms=stall_ms, wait_ms=wait_ms)
            # Logged before the writer has the job (streamed: before it can have finished), so
            # the writer's events come after this one; unstreamed, by the writer's loop.
            event = {"step": step, "stall_ms": round(stall_ms, 3), "bytes": plan.snapshot.nbytes}
            if isinstance(staged, StreamedCopy):
                runner.log.info(ev.SAVE_STAGED, **event)
            else:
                runner.submit(job, staged=event)
        return SaveHandle(job.step, job.path, job.future, errors=self.errors, done_event=job.done_event)

    def _skip(self, runner: Runner, step: int, name: str) -> SaveHandle:
        self.stats.count_skip()
        runner.log.warning(ev.SAVE_SKIPPED, step=step, reason=f"all {self.pool.slots} staging slots busy")
        return SaveHandle(step, self.directory / name, None)


class FirstSave:
    """What the first save of an open checkpointer does before anything is staged.

    It raises the error that showed the run directory cannot be written, and (single files)
    removes the leftovers of writers that are gone. It runs again at the next save until it
    succeeds; read-only use never runs it.
    """

    def __init__(
        self, storage: Storage, directory: CheckpointPath, *, clean_up: bool, unwritable: OSError | None
    ) -> None:
        self.storage = storage
        self.directory = directory
        self.clean_up = clean_up
        self.unwritable = unwritable
        self.done = False

    def prepare(self, log: ev.EventLog) -> None:
        """Once: raise :class:`CheckpointWriteError` (path and errno) when the directory cannot be
        written; remove the abandoned temp files (each logged as ``checkpoint.tmp_removed``)."""
        if self.done:
            return
        if self.unwritable is not None:
            raise _write_error(self.directory, self.unwritable)
        if self.clean_up:
            try:
                leftovers = self.storage.leftovers()
                self.storage.remove_leftovers(leftovers)
            except OSError as exc:
                raise _write_error(self.directory, exc) from exc
            for name in leftovers:
                log.warning(ev.TMP_REMOVED, path=self.storage.where(name))
        self.done = True


def _write_error(directory: CheckpointPath, exc: OSError) -> CheckpointWriteError:
    name = errno.errorcode.get(exc.errno or 0, "?")
    error = CheckpointWriteError(
        f"cannot write to the run directory ({name}: {exc.strerror or exc}); nothing was saved. "
        "restore() works here; save() needs a writable directory",
        path=directory,
    )
    error.__cause__ = exc
    return error
