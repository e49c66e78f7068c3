"""The writer thread's half of a background multi-rank save: write, commit, retain whole steps.

:class:`StepWriter` is the checkpointer's :class:`~asyncckpt.saving.writer.Writer` with another
commit: each job is a staged multi-rank step, written and committed collectively by
:func:`~asyncckpt.dist.save.write_step` on asyncckpt's own coordination group (never the
trainer's). A failure anywhere fails the step on every rank (no commit record), and each rank's
trainer gets it as :class:`asyncckpt.CheckpointWriteError` at its next ``save()``, ``flush()``
or exit. Rank 0 of the group does the whole-step housekeeping: before the first save it removes
what failed saves left (step folders without a commit record, temp files), and after each
commit it prunes whole steps (``keep_last`` / ``keep_every``), the commit record first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import catalog
from .. import events as ev
from ..catalog import CheckpointInfo
from ..errors import CheckpointWriteError, CoordinationError
from ..saving.job import Job
from ..saving.retention import prunable
from ..saving.writer import Writer
from .group import CoordinationGroup
from .items import WriteItems
from .save import Prepared, write_step
from .stage import staged_state
from .steps import delete_step, remove_uncommitted


@dataclass(frozen=True, kw_only=True)
class StepJob(Job):
    """A staged multi-rank step: ``tree`` / ``tensors`` flatten ``{"sharded", "per_rank"}`` and
    ``template`` marks where DTensors stood (see :mod:`asyncckpt.dist.stage`); ``replicas`` is
    the digest of the replicated tensors every rank must agree on (see :mod:`asyncckpt.dist.share`)."""

    template: Any = None
    replicas: str | None = None


class StepWriter(Writer):
    """Writes staged multi-rank steps, one at a time, collectively over ``group``."""

    def __init__(self, *args: Any, group: CoordinationGroup, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        self._cleaned = False
        self.write_items = WriteItems()  # DCP's write items of the DTensors, from save to save

    def _commit(self, job: Job) -> None:
        assert isinstance(job, StepJob)
        started = time.perf_counter()
        try:
            saved = write_step(
                self.storage,
                job.step,
                lambda: self._prepare(job),
                group=self.group,
                plan_caching=True,
                replicas=job.replicas,
                write_items=self.write_items,
                verify=self.verify,
            )
        except CoordinationError as exc:  # steps differ, or a rank is gone: name it as a write failure
            error = CheckpointWriteError(
                f"step {job.step} was not saved: {exc.reason}", path=job.path, rank=exc.rank, step=job.step
            )
            raise error from exc
        report = saved.report
        total_ms = (time.perf_counter() - started) * 1000.0
        nbytes = report.nbytes if report else 0
        write_s, fsync_s = (report.write_s, report.fsync_s) if report else (0.0, 0.0)
        mb_s = self.stats.count_commit(
            step=job.step, nbytes=nbytes, write_s=write_s, fsync_s=fsync_s, total_ms=total_ms
        )
        commit_ms = report.commit_s * 1000.0 if report and report.commit_s is not None else None
        self.log.info(
            ev.SAVE_COMMITTED,
            step=job.step,
            path=str(job.path),
            bytes=nbytes,
            write_ms=round(write_s * 1000.0, 3),
            fsync_ms=round(fsync_s * 1000.0, 3),
            commit_ms=None if commit_ms is None else round(commit_ms, 3),
            total_ms=round(total_ms, 3),
            mb_s=round(mb_s, 1),
            world_size=saved.world_size,
        )
        if self.group.rank == 0:
            self._retain_steps(job.step)

    def _prepare(self, job: StepJob) -> Prepared:
        """Before every rank writes (a failure here fails the step everywhere): rank 0 cleans up
        once, then the staged state is rebuilt."""
        if not self._cleaned and self.group.rank == 0:
            self._clean_up()
        self._cleaned = True
        return staged_state(job.staged, job.tree, job.tensors, job.template, job.metadata)

    def _clean_up(self) -> None:
        folders = remove_uncommitted(self.storage)
        temps = [name for name in self.storage.leftovers() if "/" not in name]
        self.storage.remove_leftovers(temps)
        for name in [*folders, *temps]:
            self.log.warning(ev.TMP_REMOVED, path=self.storage.where(name))

    def _retain(self, protect: str) -> None:
        """Nothing: a step's retention is collective, inside :meth:`_commit` (rank 0 prunes
        once every rank has voted)."""

    def _retain_steps(self, protect: int) -> None:
        if self.keep_last is None:  # the caller owns retention
            return
        steps = catalog.committed_steps(self.storage)
        infos = [CheckpointInfo(s.step, Path(s.folder), s.record_size, s.committed_at) for s in steps]
        where = Path(self.storage.where(catalog.step_folder_name(protect)))
        doomed = prunable(infos, keep_last=self.keep_last, keep_every=self.keep_every, protect=where)
        for info in doomed:
            try:
                delete_step(self.storage, info.step)
            except OSError as exc:  # committed already: retried at the next commit
                self.log.warning(ev.PRUNE_FAILED, steps=[info.step], error=str(exc))
                return
            self.log.info(ev.PRUNED, step=info.step, path=str(info.path))
