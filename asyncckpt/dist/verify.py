"""What a rank checks of a multi-rank step before the ranks vote on restoring it.

:func:`verify_step` checks all that a rank would read of a step (the record, each shard file it
needs: its digest, the CRC32C of every blob it needs, every plain value; its per-rank values).
The restore keeps what the check opened (:class:`Verified`): the load reads through the same
shard files, with the plan the check made.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan

from .. import catalog
from .. import format as fmt
from ..errors import CheckpointError, Diagnostic, IncompatibleCheckpointError
from ..storage import Storage
from .commit import read_record
from .group import first_line
from .planner import LoadPlanner, decode_value
from .record import CommitRecord
from .shards import ShardFiles, check_item
from .state import SplitState


@dataclass(frozen=True)
class Verified:
    """A step this rank verified: its record, the planner that planned its load, and its shard
    files, open with their headers checked (the load reads through them: no header twice)."""

    record: CommitRecord
    planner: LoadPlanner
    shards: ShardFiles
    per_rank: Any  # this rank's per-rank values (None at another world size)


class PlannedOnce(LoadPlanner):
    """A load planner that plans once: DCP's load asks again for the plan the vote computed
    (same objects, same record), and gets it without planning a second time."""

    _planned: tuple[Any, LoadPlan] | None = None

    def create_local_plan(self) -> LoadPlan:
        if self._planned is not None and self._planned[0] is self.metadata:
            return self._planned[1]
        plan = super().create_local_plan()
        self._planned = (self.metadata, plan)
        return plan


def verify_step(
    storage: Storage,
    step: int,
    targets: SplitState,
    rank: int,
    world_size: int,
    *,
    planner: LoadPlanner | None = None,
) -> CommitRecord | Diagnostic:
    """Check all that ``rank`` would read of ``step``: the record, the shards it needs (digest
    and the CRC32C of every blob it needs), its per-rank values. The record, or why not.
    ``planner`` (default: a new :class:`LoadPlanner`) plans the load of ``targets``."""
    verdict = verify(storage, step, targets, rank, world_size, planner=planner or LoadPlanner())
    if isinstance(verdict, Diagnostic):
        return verdict
    verdict.shards.close()
    return verdict.record


def verify(
    storage: Storage, step: int, targets: SplitState, rank: int, world_size: int, *, planner: LoadPlanner
) -> Verified | Diagnostic:
    """:func:`verify_step`, the shard files left open (with the per-rank values read) on success."""
    where = storage.where(catalog.step_folder_name(step))
    shards: ShardFiles | None = None
    try:
        record = read_record(storage, step)
        planner.set_up_planner(targets.sharded, record.metadata, rank == 0)
        try:
            plan = planner.create_local_plan()
        except (RuntimeError, ValueError, KeyError) as exc:  # DCP's "missing key" / "size mismatch"
            raise IncompatibleCheckpointError(
                f"does not fit the objects: {first_line(exc)}", path=where
            ) from exc
        shards = ShardFiles(storage, record)
        locations = record.metadata.storage_data
        for item in plan.items:
            location = locations.get(item.storage_index)
            if location is None:
                raise CheckpointError(f"the commit record has no item {item.storage_index.fqn}", path=where)
            if item.type == LoadItemType.TENSOR:
                check_item(shards, location, item, record.metadata)
                shards.verify(location.rank, location.tensor)
            else:  # a plain value: it must decode too
                data = shards.read(location.rank, location.tensor)
                decode_value(bytes(fmt.tensor_bytes(data)), key=item.storage_index.fqn)
        per_rank = None
        if record.world_size == world_size:
            per_rank = shards.per_rank(rank)
            check_per_rank(per_rank, targets, shards.where(rank))
    except BaseException as exc:
        if shards is not None:
            shards.close()
        if isinstance(exc, FileNotFoundError):
            return Diagnostic(where, "corrupted", "the commit record vanished", utc_now(), step)
        if isinstance(exc, CheckpointError | OSError):
            return diagnose(exc, where, step)
        raise
    return Verified(record, planner, shards, per_rank)


def check_per_rank(values: Any, targets: SplitState, where: str) -> None:
    saved = values if isinstance(values, dict) else {}
    missing = [name for name in targets.per_rank if name not in saved]
    if missing:
        raise IncompatibleCheckpointError(f"holds no per-rank value for {', '.join(missing)}", path=where)


def diagnose(exc: BaseException, where: str, step: int) -> Diagnostic:
    """The diagnostic of a step that failed with ``exc`` (its file when the error names one)."""
    kind: Literal["corrupted", "incompatible"] = (
        "incompatible" if isinstance(exc, IncompatibleCheckpointError) else "corrupted"
    )
    path = getattr(exc, "path", None) or where
    reason = getattr(exc, "reason", None) or str(exc)
    return Diagnostic(str(path), kind, " ".join(str(reason).split()), utc_now(), step)


def utc_now() -> str:
    """Now, as the diagnostics' ISO 8601 UTC timestamp."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
