"""The checkpointer's two modes: single files in one process, multi-rank steps on several ranks.

``AsyncCheckpointer`` keeps one lifecycle (staging pool, stager, runner, error box, pending
saves) and asks its mode for the parts that differ: the plan of a save, the writer's job, the
writer, whether its first save removes leftovers, and the restore. :class:`SingleFiles` is the
one-process mode; :class:`Distributed` wraps :class:`asyncckpt.dist.mode.MultiRank` (imported
only when a checkpointer is distributed). :func:`checkpointer_mode` picks one.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import events as ev
from .errors import NoValidCheckpointError, UsageError
from .loading import LoadResult, Log, MapLocation, OnCorrupt
from .loading import rollback as loader
from .loading.candidates import unlistable
from .multirank import distributed_mode, newest_is_multi_rank, refuse_dtensors, restore_plain
from .saving.job import Job
from .saving.pending import PendingSaves
from .saving.plan import Planner, SavePlan
from .saving.runner import AsyncRunner, Runner
from .saving.staging import Staged
from .saving.writer import Writer
from .storage import CheckpointPath, Storage

if TYPE_CHECKING:
    from .dist.mode import MultiRank


@dataclass(frozen=True)
class Planned:
    """A planned single-file save (the multi-rank one is :class:`asyncckpt.dist.stage.StepPlan`)."""

    plan: SavePlan


class SingleFiles:
    """One process, one file per step (``step-0000000300.ckpt`` or a name of the caller's)."""

    cleans_up_at_first_save = True  # the writer of a distributed run does it itself

    def __init__(self) -> None:
        self._planner = Planner()

    def bind(self, log: ev.EventLog) -> None:
        """Nothing to add to this process's events."""

    def close(self) -> None:
        """Nothing to release."""

    def plan(self, step: int, state: Any, metadata: Any, *, overlap: bool, live: Sequence[Any]) -> Planned:
        """Check and flatten ``state``; pick the blobs copied while training runs on."""
        refuse_dtensors(state)
        return Planned(self._planner.plan(step, state, metadata, overlap=overlap, live=live))

    def job(
        self, planned: Planned, name: str, staged: Staged, runner: Runner, directory: CheckpointPath
    ) -> Job:
        """The writer's job for a staged save."""
        plan = planned.plan
        return Job(
            step=plan.step,
            name=name,
            path=directory / name,
            tree=plan.snapshot.tree,
            tensors=plan.snapshot.tensors,
            metadata=plan.metadata,
            staged=staged,
            future=concurrent.futures.Future(),
            done_event=runner.done_event(),
            structure=plan.snapshot.structure,
        )

    def writer(self, storage: Storage, **options: Any) -> Writer:
        """The background writer (``options`` as for :class:`~asyncckpt.saving.writer.Writer`)."""
        return Writer(storage, **options)

    def restore(
        self,
        storage: Storage,
        directory: CheckpointPath,
        objects: Mapping[str, Any],
        *,
        pending: PendingSaves,
        runner: Runner | None,
        map_location: MapLocation,
        on_corrupt: OnCorrupt,
        validate: bool,
        expect: Any,
        log: Log | None,
    ) -> LoadResult | None:
        """``AsyncCheckpointer.restore`` in one process; a directory that cannot be read raises
        :class:`CheckpointError` (it cannot tell whether checkpoints exist: never a fresh start)."""
        try:
            if newest_is_multi_rank(storage):
                return restore_plain(directory, objects, on_corrupt=on_corrupt, expect=expect, log=log)
            return loader.restore(
                storage,
                objects,
                map_location=map_location,
                on_corrupt=on_corrupt,
                verify="full" if validate else "structure",
                expect=expect,
                log=log,
            )
        except NoValidCheckpointError as exc:
            if exc.diagnostics:
                raise
            return None
        except (PermissionError, NotADirectoryError) as exc:
            raise unlistable(storage.location, exc) from exc


class Distributed:
    """Several ranks: each step is a multi-rank step (docs/MULTI_GPU.md), through ``multirank``."""

    cleans_up_at_first_save = False  # rank 0's writer removes whole uncommitted steps first

    def __init__(self, multirank: MultiRank) -> None:
        self.multirank = multirank

    def bind(self, log: ev.EventLog) -> None:
        """Mark every event with this rank (collective: every rank opens its checkpointer)."""
        self.multirank.bind(log)

    def close(self) -> None:
        """Destroy the coordination group once the writer has stopped (collective)."""
        self.multirank.close()

    def plan(self, step: int, state: Any, metadata: Any, *, overlap: bool, live: Sequence[Any]) -> Any:
        """The plan of a multi-rank save (``live`` does not apply: the state holds the objects)."""
        return self.multirank.plan(step, state, metadata, overlap=overlap)

    def job(self, planned: Any, name: str, staged: Staged, runner: Runner, directory: CheckpointPath) -> Job:
        """The writer's job (``name`` does not apply: a multi-rank step is named by its step)."""
        return self.multirank.job(planned, staged, runner, Path(directory))

    def writer(self, storage: Storage, **options: Any) -> Writer:
        """The writer of whole steps (write, then commit once every rank is durable)."""
        return self.multirank.writer(storage, **options)

    def restore(
        self,
        storage: Storage,
        directory: CheckpointPath,
        objects: Mapping[str, Any],
        *,
        pending: PendingSaves,
        runner: Runner | None,
        map_location: MapLocation,
        on_corrupt: OnCorrupt,
        validate: bool,
        expect: Any,
        log: Log | None,
    ) -> LoadResult | None:
        """The collective restore, after the pending saves (one exchange at a time)."""
        if len(pending) and isinstance(runner, AsyncRunner):  # the writer needs this loop
            raise UsageError("saves are pending: `await ckpt.aflush()` before restore() in async use")
        pending.wait()  # the writer's collectives first: one exchange at a time
        return self.multirank.restore(Path(directory), objects, on_corrupt=on_corrupt, expect=expect, log=log)


Mode = SingleFiles | Distributed


def checkpointer_mode(
    process_group: Any, *, timeout: float, when_busy: str, staging_budget: int | None
) -> Mode:
    """The mode of a new checkpointer (see :func:`asyncckpt.multirank.distributed_mode`).

    Raises :class:`UsageError` where :func:`distributed_mode` does, and for ``staging_budget``
    in distributed mode.
    """
    multirank = distributed_mode(process_group, timeout=timeout, when_busy=when_busy)
    if multirank is None:
        return SingleFiles()
    if staging_budget is not None:
        raise UsageError("staging_budget is not supported in distributed mode yet; leave it out")
    return Distributed(multirank)
