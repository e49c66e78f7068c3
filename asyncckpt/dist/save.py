"""Saving one multi-rank step: agree on the step, split the state, let DCP plan, write, commit.

:func:`save_step` is collective: every rank of the :class:`CoordinationGroup` calls it with the
same step. Each rank writes its shard file (write → fsync → verify → commit); the coordinator
(rank 0 of the group) writes the commit record after every rank reported its shard durable. A
failure anywhere ends in an error on every rank and no record: the step does not exist.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from .. import catalog
from .._gc import gc_paused
from ..errors import CheckpointWriteError, CoordinationError, UsageError
from ..saving.readback import VerifyMode
from ..storage import Location
from ._dcp import dcp_save
from .group import CoordinationGroup, first_line
from .items import WriteItems
from .planner import SavePlanner
from .state import split_state
from .storage import AsyncckptWriter, WriteReport


@dataclass(frozen=True)
class SavedStep:
    """A committed multi-rank step, as one rank saw it."""

    step: int
    rank: int
    world_size: int
    record: str  # the commit record's location
    report: WriteReport | None = None  # this rank's write figures


def save_step(
    location: Location,
    step: int,
    state: Mapping[str, Any],
    *,
    group: CoordinationGroup | None = None,
    check_shards: bool = True,
    plan_caching: bool = False,
) -> SavedStep:
    """Save ``state`` (name → module, optimizer, other object with ``state_dict()``, or value)
    as the multi-rank step ``step`` of ``location``; collective over ``group``.

    Modules and optimizers go through DCP (sharded parameters by shard, replicated tensors
    once in total); everything else is kept per rank (see :mod:`asyncckpt.dist.state`).
    ``group`` may be None only in a plain process (no ``torch.distributed``): the step then has
    one rank. ``plan_caching`` reuses DCP's global plan while the state's structure is the same.
    Blocking; returns once the commit record is durable.

    Raises :class:`asyncckpt.CoordinationError` when the ranks call with different steps or one
    does not answer within the group's timeout, :class:`asyncckpt.CheckpointWriteError` naming
    the failed ranks when preparing or writing failed anywhere; then nothing was committed and
    older steps are intact. :class:`asyncckpt.UsageError` for a bad step, on every rank.
    """

    def prepare() -> Prepared:
        split = split_state(state)
        return Prepared(split.sharded, split.per_rank)

    return write_step(
        location, step, prepare, group=solo_or(group), check_shards=check_shards, plan_caching=plan_caching
    )


@dataclass(frozen=True)
class Prepared:
    """What a rank saves of one step: DCP's state dict and its own per-rank values (and the
    user metadata its shard file carries)."""

    sharded: dict[str, Any]
    per_rank: dict[str, Any]
    metadata: Any = None


def write_step(
    location: Location,
    step: int,
    prepare: Callable[[], Prepared],
    *,
    group: CoordinationGroup,
    check_shards: bool = True,
    plan_caching: bool = False,
    replicas: str | None = None,
    write_items: WriteItems | None = None,
    verify: VerifyMode = "full",
) -> SavedStep:
    """The collective part of :func:`save_step`: agree on ``step``, run ``prepare`` on every
    rank (if it raises anywhere, every rank raises and nothing is written), let DCP plan, write
    each rank's shard, commit. Raises what :func:`save_step` raises.

    ``replicas`` is the digest of the replicated tensors when each rank's state holds only its
    share of them (:mod:`asyncckpt.dist.share`): if it differs between ranks, every rank raises
    :class:`asyncckpt.CheckpointWriteError` before anything is written.

    ``prepare`` runs on the calling thread; the state it returns must not change until this
    returns (the background writer passes staged copies). ``write_items`` (the caller's, from
    one save to the next) keeps DCP's write items of the DTensors (see :mod:`.items`).
    ``verify`` says what each rank reads back of its shard (see :class:`AsyncckptWriter`).
    """
    coordination = group
    catalog.step_folder_name(step)  # a bad step fails here, the same way on every rank

    def build() -> tuple[dict[str, Any], AsyncckptWriter]:
        prepared = prepare()
        writer = AsyncckptWriter(
            location,
            step,
            per_rank=prepared.per_rank or None,
            metadata=prepared.metadata,
            check_shards=check_shards,
            share_metadata=False,  # only the commit record needs it
            verify=verify,
        )
        return prepared.sharded, writer

    # DCP's planning, pickled plan and result exchanges and our shard encoding make several small
    # objects per tensor: with the trainer's many live objects, collections cost as much as the
    # work (46% of a 10,000-tensor save). Nothing made here is cyclic garbage.
    with gc_paused():
        # One exchange checks that every rank saves this step and that every rank is ready. (A
        # rank that saves another step has only built its writer meanwhile: nothing is written.)
        sharded, writer = coordination.gather_outcomes(
            build,
            what=f"preparing step {step}",
            error=partial(CheckpointWriteError, step=step),
            call=("save", step),
            same=("the replicated tensors (key paths and sizes)", replicas),
        )
        planner = SavePlanner(enable_plan_caching=plan_caching, write_items=write_items)
        if plan_caching:  # DCP keys its plan cache by class: one cache per location
            planner._cached_plans_key = f"{type(planner).__name__}:{writer.storage.location}"
        _plan_and_write(sharded, writer, step, coordination, planner)
    writer.storage.drop_replaced()  # a step saved again: its old shard files, kept by the commits
    record = writer.storage.where(catalog.commit_record_name(step))
    return SavedStep(step, coordination.rank, coordination.world_size, record, writer.report)


def _plan_and_write(
    sharded: dict[str, Any],
    writer: AsyncckptWriter,
    step: int,
    coordination: CoordinationGroup,
    planner: SavePlanner,
) -> None:
    """Let DCP plan and write this rank's shard through ``writer`` (which commits); every
    failure becomes a :class:`CheckpointWriteError` naming the step and this rank."""
    try:
        metadata = dcp_save(sharded, writer=writer, planner=planner, group=dcp_group(coordination))
    except CheckpointException as exc:
        raise write_failed(exc, step) from failure_cause(exc)
    except CoordinationError:
        raise
    except Exception as exc:  # a collective inside DCP failed: a rank died or stopped answering
        lost = coordination.failed(f"saving step {step}", exc)
        raise CheckpointWriteError(
            f"{lost.reason}; nothing was committed", rank=coordination.rank, step=step
        ) from exc
    # The commit record holds the item locations. DCP's plan cache keeps this object until the
    # next save: left on it, three objects per item would outlive the save and reach the
    # collector's old generation (each full collection then scans them).
    metadata.storage_data = None


def dcp_group(coordination: CoordinationGroup) -> dist.ProcessGroup | None:
    """The process group DCP runs over: None for a group of one, so that DCP plans and writes
    locally instead of pickling its plans and results through collectives with itself."""
    return coordination.group if coordination.world_size > 1 else None


def solo_or(group: CoordinationGroup | None) -> CoordinationGroup:
    """``group``, or a group of one in a plain process. Raises :class:`UsageError` when
    ``torch.distributed`` is initialized and no group was given (creating one is collective)."""
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized():
        raise UsageError(
            "torch.distributed is initialized: pass group=CoordinationGroup(), created once per run"
        )
    return CoordinationGroup()


def failure_cause(exc: CheckpointException) -> BaseException | None:
    """The first failed rank's own exception."""
    failures = exc.failures
    return failures[min(failures)][0] if failures else None


def write_failed(exc: CheckpointException, step: int) -> CheckpointWriteError:
    """One error for every rank, naming each rank that failed and why."""
    failures = sorted(exc.failures.items())
    listing = "; ".join(f"rank {rank}: {type(e).__name__}: {first_line(e)}" for rank, (e, _) in failures)
    return CheckpointWriteError(
        f"saving step {step} failed on {len(failures)} rank(s), nothing was committed: {listing}",
        rank=failures[0][0] if failures else None,
        step=step,
    )
