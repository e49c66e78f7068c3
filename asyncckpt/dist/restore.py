"""Restoring a multi-rank step: the ranks agree on the newest step that verifies everywhere.

:func:`restore_latest` is collective. The ranks list the committed steps (a step counts when
every rank sees its commit record); for each, newest first, every rank checks what it would
read (the record, the digest of each shard file it needs, the CRC32C of each blob it needs, its
own per-rank values) and the ranks vote. The first step every rank accepts is loaded through
DCP, resharding to this world size; the ones before it are diagnosed, the same way on every
rank, and written once to ``failed_checkpoints.txt``. :func:`load_full` reads a step whole in a
plain process, for evaluation and export.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal

import structlog
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan

from .. import catalog
from .. import format as fmt
from .._gc import gc_paused
from .._tree import unflatten
from ..errors import (
    CheckpointError,
    CoordinationError,
    CorruptedCheckpointError,
    Diagnostic,
    IncompatibleCheckpointError,
    NoValidCheckpointError,
)
from ..storage import Location, Storage, open_storage
from ._dcp import dcp_load
from .commit import read_record
from .group import CoordinationGroup, first_line
from .planner import LoadPlanner, decode_value
from .record import CommitRecord
from .save import failure_cause, solo_or
from .shards import ShardFiles, check_item
from .state import SplitState, apply_per_rank, apply_sharded, load_targets
from .storage import AsyncckptReader

SUMMARY_EVENT = "checkpoint.dist.restore.summary"
PER_RANK_DROPPED_EVENT = "checkpoint.dist.per_rank_not_restored"


@dataclass(frozen=True)
class RestoredStep:
    """The multi-rank step every rank resumed from.

    ``state`` holds this rank's per-rank values as saved (name → value), empty when the step
    was saved at another world size (``per_rank_restored`` is then False and the summary says
    so). ``source`` is "fallback" when newer committed steps failed; ``diagnostics`` says why,
    and is the same on every rank.
    """

    step: int
    state: dict[str, Any]
    saved_world_size: int
    per_rank_restored: bool
    source: Literal["primary", "fallback"]
    diagnostics: list[Diagnostic]
    summary: str
    metadata: dict[str, Any] = field(default_factory=dict)  # the user metadata saved with the step


def restore_latest(
    location: Location,
    objects: Mapping[str, Any],
    *,
    group: CoordinationGroup | None = None,
    on_corrupt: Literal["fallback", "fail"] = "fallback",
    log: Callable[..., None] | None = None,
) -> RestoredStep | None:
    """Load the newest multi-rank step that verifies on every rank into ``objects``; collective.

    ``objects`` maps names to modules and optimizers (loaded through DCP, at any world size),
    and to other objects with ``load_state_dict`` (given their per-rank value when the world
    size is the one saved). Returns None on every rank when there is no committed step (a fresh
    start). Nothing is loaded into an object before every rank accepted the step.

    Raises :class:`asyncckpt.NoValidCheckpointError` (with every rank's diagnostics, on every
    rank) when no committed step verifies, :class:`asyncckpt.CoordinationError` when the ranks
    do not make the same call or one stops answering within the group's timeout. With
    ``on_corrupt="fail"`` the newest committed step must verify: otherwise every rank raises
    :class:`asyncckpt.CorruptedCheckpointError` (or :class:`asyncckpt.IncompatibleCheckpointError`)
    for its first diagnostic, and nothing is loaded. The summary is logged as the
    ``checkpoint.dist.restore.summary`` event through ``log`` (default: structlog's "asyncckpt"
    logger).
    """
    # The state dicts, DCP's load planning and the shard headers make several small objects
    # per tensor; the trainer waits for the restore, so collections would only add to it.
    with gc_paused():
        return _restore_latest(location, objects, solo_or(group), on_corrupt, log)


def _restore_latest(
    location: Location,
    objects: Mapping[str, Any],
    coordination: CoordinationGroup,
    on_corrupt: Literal["fallback", "fail"],
    log: Callable[..., None] | None,
) -> RestoredStep | None:
    coordination.agree("restore", None)
    storage = open_storage(location)
    views = coordination.all_gather(_listing(storage), what="restoring: listing the committed steps")
    for rank, view in enumerate(views):
        if isinstance(view, str):
            raise CoordinationError(f"rank {rank} cannot list {storage.location}: {view}", rank=rank)
    everywhere = set.intersection(*(set(view) for view in views))
    diagnostics = [_not_everywhere(storage, step, views) for step in sorted(set().union(*views) - everywhere)]
    chosen = targets = None
    if everywhere:  # (the same on every rank) only then may the objects be touched
        targets = coordination.gather_outcomes(
            lambda: load_targets(objects), what="preparing the restore", error=CoordinationError
        )
        chosen = _vote(storage, sorted(everywhere, reverse=True), targets, coordination, diagnostics)
    try:
        if coordination.rank == 0:
            record_failures(storage, diagnostics)
        if on_corrupt == "fail" and diagnostics:
            raise _as_error(diagnostics[0])
        if chosen is None or targets is None:
            _nothing(storage, everywhere, diagnostics, log)
            return None
        return _load(storage, chosen, objects, targets, coordination, diagnostics, log)
    finally:
        if chosen is not None:
            chosen.shards.close()


def _as_error(diagnostic: Diagnostic) -> CheckpointError:
    kind = IncompatibleCheckpointError if diagnostic.kind == "incompatible" else CorruptedCheckpointError
    return kind(diagnostic.reason, path=diagnostic.path, step=diagnostic.step)


def _listing(storage: Storage) -> list[int] | str:
    """The committed steps this rank sees, or why it cannot list them."""
    try:
        return [info.step for info in catalog.committed_steps(storage)]
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class _Verified:
    """A step this rank verified: its record, the planner that planned its load, and its shard
    files, open with their headers checked (the load reads through them: no header twice)."""

    record: CommitRecord
    planner: LoadPlanner
    shards: ShardFiles
    per_rank: Any  # this rank's per-rank values (None at another world size)


def _vote(
    storage: Storage,
    candidates: list[int],
    targets: SplitState,
    coordination: CoordinationGroup,
    diagnostics: list[Diagnostic],
) -> _Verified | None:
    """The newest candidate every rank verifies (the caller closes its shard files), or None;
    failures go to ``diagnostics``."""
    for step in candidates:  # one all-gather per candidate
        what = f"restoring: verifying step {step}"
        verdict: _Verified | Diagnostic | Exception
        planner = _PlannedOnce()
        try:
            verdict = _verify(
                storage, step, targets, coordination.rank, coordination.world_size, planner=planner
            )
        except Exception as exc:  # not a diagnosis: a bug or an unexpected failure
            verdict = exc
        try:
            verdicts = coordination.all_gather(_shared(verdict), what=what)
            errors = [f"rank {r}: {text}" for r, (kind, text) in enumerate(verdicts) if kind == "error"]
            if errors:  # stops every rank
                if isinstance(verdict, Exception):
                    raise verdict
                raise CoordinationError(
                    f"{what} failed: {'; '.join(errors)}", rank=coordination.rank, step=step
                )
            failed = _unique([d for kind, d in verdicts if kind == "failed"])
        except BaseException:
            _close(verdict)
            raise
        if not failed:
            assert isinstance(verdict, _Verified)
            return verdict
        _close(verdict)
        diagnostics.extend(failed)
    return None


def _close(verdict: object) -> None:
    if isinstance(verdict, _Verified):
        verdict.shards.close()


class _PlannedOnce(LoadPlanner):
    """A load planner that plans once: DCP's load asks again for the plan the vote computed
    (same objects, same record), and gets it without planning a second time."""

    _planned: tuple[Any, LoadPlan] | None = None

    def create_local_plan(self) -> LoadPlan:
        if self._planned is not None and self._planned[0] is self.metadata:
            return self._planned[1]
        plan = super().create_local_plan()
        self._planned = (self.metadata, plan)
        return plan


def _shared(verdict: _Verified | Diagnostic | Exception) -> tuple[str, Any]:
    """What the other ranks need of a verdict (a record stays here)."""
    if isinstance(verdict, Exception):
        return "error", f"{type(verdict).__name__}: {first_line(verdict)}"
    if isinstance(verdict, Diagnostic):
        return "failed", verdict
    return "ok", None


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
    verdict = _verify(storage, step, targets, rank, world_size, planner=planner or LoadPlanner())
    if isinstance(verdict, Diagnostic):
        return verdict
    verdict.shards.close()
    return verdict.record


def _verify(
    storage: Storage, step: int, targets: SplitState, rank: int, world_size: int, *, planner: LoadPlanner
) -> _Verified | Diagnostic:
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
            _check_per_rank(per_rank, targets, shards.where(rank))
    except BaseException as exc:
        if shards is not None:
            shards.close()
        if isinstance(exc, FileNotFoundError):
            return Diagnostic(where, "corrupted", "the commit record vanished", utc_now(), step)
        if isinstance(exc, CheckpointError | OSError):
            return diagnose(exc, where, step)
        raise
    return _Verified(record, planner, shards, per_rank)


def _check_per_rank(values: Any, targets: SplitState, where: str) -> None:
    saved = values if isinstance(values, dict) else {}
    missing = [name for name in targets.per_rank if name not in saved]
    if missing:
        raise IncompatibleCheckpointError(f"holds no per-rank value for {', '.join(missing)}", path=where)


def _load(
    storage: Storage,
    verified: _Verified,
    objects: Mapping[str, Any],
    targets: SplitState,
    coordination: CoordinationGroup,
    diagnostics: list[Diagnostic],
    log: Callable[..., None] | None,
) -> RestoredStep:
    record, shards = verified.record, verified.shards
    step, rank = record.step, coordination.rank
    # the record, plan and shard files the vote checked
    reader = AsyncckptReader(storage, step, record=record, shards=shards)

    def load() -> None:
        # Each rank plans and reads its own part (DCP's load needs nothing of the others): DCP
        # runs without collectives, which would pickle every rank's plan of 10,000 items to the
        # coordinator and back; the one exchange below still fails every rank together.
        try:
            dcp_load(targets.sharded, reader=reader, planner=verified.planner, group=None)
        except CheckpointException as exc:
            raise CheckpointError(
                f"loading verified step {step} failed: {first_line(failure_cause(exc) or exc)}", step=step
            ) from failure_cause(exc)

    try:
        coordination.gather_outcomes(
            load, what=f"loading step {step}", error=partial(CheckpointError, step=step)
        )
    finally:
        reader.close()
    apply_sharded(targets)
    same_world = record.world_size == coordination.world_size
    state: dict[str, Any] = {}
    user = shards.layout(rank if same_world else 0).metadata.get("user")
    if same_world:
        saved = verified.per_rank
        state = dict(saved) if isinstance(saved, dict) else {}
        apply_per_rank(objects, state)
    metadata = unflatten(user, []) if isinstance(user, dict) else {}
    summary = _summary(record, coordination.world_size, diagnostics)
    _log(log, summary, step, diagnostics, dropped=not same_world)
    source: Literal["primary", "fallback"] = "fallback" if diagnostics else "primary"
    return RestoredStep(step, state, record.world_size, same_world, source, diagnostics, summary, metadata)


def _nothing(
    storage: Storage, candidates: set[int], diagnostics: list[Diagnostic], log: Callable[..., None] | None
) -> None:
    """Log a fresh start, or raise :class:`NoValidCheckpointError` when steps exist but none verifies."""
    if not candidates and not diagnostics:
        _log(log, f"no committed multi-rank step in {storage.location}", None, [], dropped=False)
        return
    reasons = "; ".join(f"step {d.step} {d.kind}: {d.reason}" for d in diagnostics)
    summary = f"no committed multi-rank step verifies on every rank in {storage.location}: {reasons}"
    _log(log, summary, None, diagnostics, dropped=False)
    raise NoValidCheckpointError(summary, diagnostics, path=storage.location)


def _summary(record: CommitRecord, world_size: int, diagnostics: list[Diagnostic]) -> str:
    text = f"resuming from step {record.step} (saved by {record.world_size} ranks, restored by {world_size})"
    if record.world_size != world_size:
        text += "; per-rank values are not restored at another world size"
    if diagnostics:
        text += "; fallback: " + "; ".join(f"step {d.step} {d.kind}: {d.reason}" for d in diagnostics)
    return text


def _log(
    log: Callable[..., None] | None,
    summary: str,
    step: int | None,
    diagnostics: list[Diagnostic],
    *,
    dropped: bool,
) -> None:
    if log is None:
        logger = structlog.get_logger("asyncckpt")
        log = logger.warning if diagnostics or dropped else logger.info
    failures = [{"path": d.path, "kind": d.kind, "reason": d.reason} for d in diagnostics]
    log(SUMMARY_EVENT, summary=summary, step=step, failures=failures)


def diagnose(exc: BaseException, where: str, step: int) -> Diagnostic:
    """The diagnostic of a step that failed with ``exc`` (its file when the error names one)."""
    kind: Literal["corrupted", "incompatible"] = (
        "incompatible" if isinstance(exc, IncompatibleCheckpointError) else "corrupted"
    )
    path = getattr(exc, "path", None) or where
    reason = getattr(exc, "reason", None) or str(exc)
    return Diagnostic(str(path), kind, " ".join(str(reason).split()), utc_now(), step)


def _not_everywhere(storage: Storage, step: int, views: list[Any]) -> Diagnostic:
    blind = [rank for rank, view in enumerate(views) if step not in view]
    where = storage.where(catalog.commit_record_name(step))
    reason = f"committed, but ranks {blind} do not see its commit record"
    return Diagnostic(where, "incompatible", reason, utc_now(), step)


def _unique(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    """One diagnostic per broken file and reason, however many ranks found it."""
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for diagnostic in diagnostics:
        key = (diagnostic.path, diagnostic.kind, diagnostic.reason)
        if key not in seen:
            seen.add(key)
            unique.append(diagnostic)
    return unique


def record_failures(storage: Storage, diagnostics: list[Diagnostic]) -> None:
    """Append one ``{path}|{reason}|{timestamp}`` line per diagnostic to
    ``failed_checkpoints.txt`` (as the single-process loader does)."""
    for d in diagnostics:
        path = d.path.replace("%", "%25").replace("|", "%7C").replace("\n", "%0A").replace("\r", "%0D")
        reason = " ".join(d.reason.replace("|", "/").split())
        try:
            storage.append_line(catalog.FAILED_LOG_NAME, f"{path}|{reason}|{d.timestamp}")
        except OSError as exc:
            structlog.get_logger("asyncckpt").warning("checkpoint.dist.failed_log_unwritable", error=str(exc))
            return


def utc_now() -> str:
    """Now, as the diagnostics' ISO 8601 UTC timestamp."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
