"""``AsyncCheckpointer``'s distributed mode: what the checkpointer delegates to on several ranks.

The checkpointer keeps its lifecycle (staging pool, stager and step guard, runner, error box,
pending saves); :class:`MultiRank` supplies the parts that differ: the coordination group
(created collectively when the checkpointer opens), the plan of a save (:mod:`.stage`), the
job, the writer (:mod:`.writer`) and the collective restore. :func:`restore_steps` is the
restore of a plain process (a group of one) from a directory of multi-rank steps.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from .. import catalog
from .. import events as ev
from .._tree import map_leaves
from ..errors import Diagnostic, NoValidCheckpointError, UsageError
from ..loading.options import Log
from ..loading.rollback import LoadResult
from ..saving.runner import Runner
from ..saving.staging import Staged
from ..storage import Location, Storage, is_url, open_storage, path_of
from ..storage.localcopy import LocalCopyStorage
from .full import load_full
from .group import CoordinationGroup
from .restore import RestoredStep, record_failures, restore_latest
from .share import ReplicaShare
from .stage import StepPlan, StepPlanner
from .verify import utc_now
from .writer import StepJob, StepWriter

OnCorrupt = Literal["fallback", "fail"]
MULTI_RANK_VERSION = "1.0"  # the format version of shard files and commit records


class MultiRank:
    """The distributed side of one checkpointer over ``process_group`` (default: all ranks).

    Nothing collective happens here until :meth:`group` is first called, which every rank
    does at the same point of its program (when it opens the checkpointer, or restores first).
    """

    def __init__(self, process_group: dist.ProcessGroup | None, *, timeout: float) -> None:
        self.process_group = process_group
        self.timeout = timeout
        self._group: CoordinationGroup | None = None
        self._share: ReplicaShare | None = None
        self._storage: Storage | None = None  # the checkpointer's, once its writer is built
        self._planner: StepPlanner | None = None  # what the last save decided, reused

    def close(self) -> None:
        """Destroy the coordination group (every rank does, as it closes its checkpointer), so
        that it is gone before the trainer destroys its own process groups and exits; the next
        use creates a new one."""
        group, self._group = self._group, None
        if group is not None:
            group.close()

    def group(self) -> CoordinationGroup:
        """asyncckpt's own gloo group over the trainer's ranks (created once; collective)."""
        if self._group is None:
            self._group = CoordinationGroup(self.process_group, timeout=self.timeout)
        return self._group

    @property
    def share(self) -> ReplicaShare:
        """This rank's share of the replicated tensors (see :mod:`asyncckpt.dist.share`);
        ``share.stats`` holds the last save's figures."""
        if self._share is None:
            group = self.group()
            self._share = ReplicaShare(group.rank, group.world_size)
        return self._share

    @property
    def planner(self) -> StepPlanner:
        """The planner of this checkpointer's saves (it keeps what the last save decided)."""
        if self._planner is None:
            self._planner = StepPlanner(self.share)
        return self._planner

    def bind(self, log: ev.EventLog) -> None:
        """Mark every event of this rank's log with its rank (every rank shares one file)."""
        log.logger = log.logger.bind(rank=self.group().rank)

    def plan(self, step: int, state: Any, metadata: Any, *, overlap: bool) -> StepPlan:
        """The plan of one save (see :meth:`asyncckpt.dist.stage.StepPlanner.plan`)."""
        if not isinstance(state, Mapping):
            raise UsageError(
                "in distributed mode the state is a dict of name → module, optimizer, object with "
                f"state_dict() or value; got {type(state).__qualname__}"
            )
        return self.planner.plan(step, state, metadata, overlap=overlap)

    def job(self, planned: StepPlan, staged: Staged, runner: Runner, directory: Path) -> StepJob:
        """The writer's job for a staged save (``path``: the step's folder in the checkpointer's
        storage, a URL on an object store)."""
        plan = planned.plan
        name = catalog.step_folder_name(plan.step)
        storage = self._storage
        return StepJob(
            step=plan.step,
            name=name,
            path=directory / name if storage is None else path_of(storage.where(name)),
            tree=plan.snapshot.tree,
            tensors=plan.snapshot.tensors,
            metadata=plan.metadata,
            staged=staged,
            future=concurrent.futures.Future(),
            done_event=runner.done_event(),
            template=planned.template,
            replicas=planned.replicas,
        )

    def writer(self, storage: Storage, **options: Any) -> StepWriter:
        """The checkpointer's writer in distributed mode (``options`` as for ``Writer``); its
        ``storage`` (a POSIX directory or an object store) is then also the one restored from.

        Raises :class:`UsageError` for a storage with a local copy (``local_copy=``), which
        distributed mode does not support yet."""
        if isinstance(storage, LocalCopyStorage):
            raise UsageError(
                "local_copy= is not supported in distributed mode yet; leave it out", path=storage.location
            )
        self._storage = storage
        return StepWriter(storage, group=self.group(), **options)

    def restore(
        self,
        directory: Location,
        objects: Mapping[str, Any],
        *,
        on_corrupt: OnCorrupt,
        expect: Any,
        log: Log | None = None,
    ) -> LoadResult | None:
        """The collective restore of ``AsyncCheckpointer.restore`` (see :func:`restore_steps`),
        from the checkpointer's storage once it is open, else from ``directory``.

        Raises :class:`UsageError` for a checkpointer on an object store that is not open yet
        (``directory`` no longer carries the URL's storage options)."""
        where: Location | None = self._storage
        if where is None:
            if _lost_url(directory):
                raise UsageError(
                    "restore() on an object store in distributed mode needs the checkpointer open: "
                    "call it inside `with AsyncCheckpointer(...) as ckpt:`",
                    path=str(directory),
                )
            where = directory
        return restore_steps(
            where, objects, group=self.group(), on_corrupt=on_corrupt, expect=expect, log=log
        )


def _lost_url(directory: Location) -> bool:
    """Whether ``directory`` is a URL that went through ``Path`` (``s3://b/run`` → ``s3:/b/run``)."""
    if isinstance(directory, Storage):
        return False
    text = str(directory)
    scheme, sep, rest = text.partition(":/")
    return bool(sep) and is_url(f"{scheme}://{rest}") and not is_url(text)


def restore_steps(
    directory: Location,
    objects: Mapping[str, Any],
    *,
    group: CoordinationGroup | None = None,
    on_corrupt: OnCorrupt = "fallback",
    expect: Any = None,
    log: Log | None = None,
) -> LoadResult | None:
    """Restore the newest multi-rank step that verifies on every rank into ``objects``.

    Collective over ``group`` (None: a plain process). Returns None on every rank when the
    directory holds no checkpoint at all. ``result.state`` holds this rank's per-rank values
    (empty at another world size than the one saved; ``result.per_rank_restored`` says which).
    The summary goes to ``log`` (a checkpointer's event log; default: structlog's "asyncckpt"
    logger) as the ``checkpoint.dist.restore.summary`` event.
    Raises what :func:`asyncckpt.dist.restore_latest` raises, and
    :class:`asyncckpt.NoValidCheckpointError` when the directory holds single-file checkpoints
    only (a multi-rank run cannot resume from them: see docs/MULTI_GPU.md).
    """
    if expect is not None:
        raise UsageError(
            "expect= does not apply to multi-rank steps: DCP checks the objects' keys and shapes"
        )
    storage = open_storage(directory)
    restored = restore_latest(storage, objects, group=group, on_corrupt=on_corrupt, log=log)
    if restored is None:
        _refuse_single_files(storage)
        return None
    return as_load_result(restored, storage)


@dataclass(frozen=True)
class MultiRankLoadResult(LoadResult):
    """A :class:`asyncckpt.LoadResult` of a multi-rank step (``path`` is its folder).

    ``saved_world_size`` ranks saved it; ``per_rank_restored`` is False when this world size
    differs, so that ``state`` (this rank's own values) is empty.
    """

    saved_world_size: int = 1
    per_rank_restored: bool = True
    per_rank: list[Any] = field(default_factory=list)  # load_latest: every rank's own values


def as_load_result(restored: RestoredStep, storage: Storage) -> LoadResult:
    """``restored`` as the :class:`asyncckpt.LoadResult` the checkpointer returns."""
    return MultiRankLoadResult(
        state=restored.state,
        step=restored.step,
        path=path_of(storage.where(catalog.step_folder_name(restored.step))),
        version=MULTI_RANK_VERSION,
        source=restored.source,
        diagnostics=restored.diagnostics,
        summary=restored.summary,
        metadata=restored.metadata,
        saved_world_size=restored.saved_world_size,
        per_rank_restored=restored.per_rank_restored,
    )


def _refuse_single_files(storage: Storage) -> None:
    """A directory of single-file checkpoints is not a fresh start for a multi-rank run."""
    files = catalog.committed(storage)
    if not files:
        return
    reason = (
        "a single-process checkpoint: a multi-rank run resumes from multi-rank steps only "
        "(load it with asyncckpt.load_latest and set_model_state_dict(..., full_state_dict=True))"
    )
    diagnostics = [Diagnostic(str(f.path), "incompatible", reason, utc_now(), f.step) for f in files]
    raise NoValidCheckpointError(
        f"{storage.location} holds {len(files)} single-process checkpoints and no multi-rank step",
        diagnostics,
        path=storage.location,
    )


def load_whole(storage: Storage, *, map_location: torch.device) -> MultiRankLoadResult:
    """The newest multi-rank step that reads back, whole (see :func:`asyncckpt.dist.load_full`),
    as a :class:`asyncckpt.LoadResult`; its tensors on ``map_location``. Failures are appended
    to ``failed_checkpoints.txt``. Raises :class:`asyncckpt.NoValidCheckpointError`."""
    try:
        full = load_full(storage)
    except NoValidCheckpointError as exc:
        record_failures(storage, exc.diagnostics)
        raise
    record_failures(storage, full.diagnostics)
    moved = partial(_moved, device=map_location)
    summary = f"loaded step {full.step} whole (saved by {full.world_size} ranks)"
    if full.diagnostics:
        summary += "; fallback: " + "; ".join(f"step {d.step} {d.kind}: {d.reason}" for d in full.diagnostics)
    return MultiRankLoadResult(
        state=moved(full.state),
        step=full.step,
        path=path_of(storage.where(catalog.step_folder_name(full.step))),
        version=MULTI_RANK_VERSION,
        source="fallback" if full.diagnostics else "primary",
        diagnostics=full.diagnostics,
        summary=summary,
        metadata=full.metadata,
        saved_world_size=full.world_size,
        per_rank_restored=False,
        per_rank=[moved(values) for values in full.per_rank],
    )


def _moved(tree: Any, *, device: torch.device) -> Any:
    if device.type == "cpu":
        return tree
    return map_leaves(tree, lambda leaf: leaf.to(device) if isinstance(leaf, torch.Tensor) else leaf)
