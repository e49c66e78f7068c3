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
from functools import partial
from typing import Any, Literal

import structlog
from torch.distributed.checkpoint.api import CheckpointException

from .. import catalog
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
from .group import CoordinationGroup, first_line
from .record import CommitRecord
from .save import failure_cause, solo_or
from .state import SplitState, apply_per_rank, apply_sharded, load_targets
from .storage import AsyncckptReader
from .verify import PlannedOnce, Verified, utc_now, verify

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


def _vote(
    storage: Storage,
    candidates: list[int],
    targets: SplitState,
    coordination: CoordinationGroup,
    diagnostics: list[Diagnostic],
) -> Verified | None:
    """The newest candidate every rank verifies (the caller closes its shard files), or None;
    failures go to ``diagnostics``."""
    for step in candidates:  # one all-gather per candidate
        what = f"restoring: verifying step {step}"
        verdict: Verified | Diagnostic | Exception
        planner = PlannedOnce()
        try:
            verdict = verify(
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
            assert isinstance(verdict, Verified)
            return verdict
        _close(verdict)
        diagnostics.extend(failed)
    return None


def _close(verdict: object) -> None:
    if isinstance(verdict, Verified):
        verdict.shards.close()


def _shared(verdict: Verified | Diagnostic | Exception) -> tuple[str, Any]:
    """What the other ranks need of a verdict (a record stays here)."""
    if isinstance(verdict, Exception):
        return "error", f"{type(verdict).__name__}: {first_line(verdict)}"
    if isinstance(verdict, Diagnostic):
        return "failed", verdict
    return "ok", None


def _load(
    storage: Storage,
    verified: Verified,
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
