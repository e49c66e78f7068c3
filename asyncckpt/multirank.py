"""Which layout a directory or a checkpointer uses: single files, or multi-rank steps.

A checkpointer is in distributed mode when ``torch.distributed`` is initialized with more than
one rank, or when it is given a ``process_group`` (:func:`distributed_mode`); it then writes
multi-rank steps (docs/MULTI_GPU.md). Everything multi-rank lives in :mod:`asyncckpt.dist`,
imported only when needed (it costs about a second).

Reading, a directory may hold both layouts: the one of the newest committed step is used
(:func:`newest_is_multi_rank`), and a fallback stays within it. :func:`load_latest` is
:func:`asyncckpt.loading.load_latest` for either layout: a multi-rank step comes back whole,
every tensor unsharded on CPU (or ``map_location``), for evaluation and export.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog
import torch
import torch.distributed as dist

from . import catalog
from .errors import CorruptedCheckpointError, IncompatibleCheckpointError, UnsupportedValueError, UsageError
from .loading import LoadResult, Log, MapLocation, OnCorrupt, Verify
from .loading import load_latest as load_single_files
from .loading.candidates import unlistable
from .loading.report import SUMMARY_EVENT
from .storage import Location, Storage, open_storage

if TYPE_CHECKING:
    from .dist.mode import MultiRank

DEFAULT_COORDINATION_TIMEOUT_S = 300.0


def distributed_mode(process_group: Any, *, timeout: float, when_busy: str) -> MultiRank | None:
    """The distributed side of a checkpointer, or None for one process (single files).

    Distributed: ``process_group`` is given, or ``torch.distributed`` is initialized with more
    than one rank. Raises :class:`UsageError` for a ``process_group`` without an initialized
    ``torch.distributed``, a bad ``timeout``, or ``when_busy="skip"`` (the ranks would skip
    different steps). Nothing collective happens here.
    """
    initialized = dist.is_available() and dist.is_initialized()
    if process_group is None and not (initialized and dist.get_world_size() > 1):
        return None
    if not initialized:
        raise UsageError("process_group= needs torch.distributed to be initialized (init_process_group)")
    if not timeout > 0:
        raise UsageError(f"coordination_timeout must be > 0 seconds, got {timeout!r}")
    if when_busy == "skip":
        raise UsageError("when_busy='skip' does not work on several ranks: they would skip different steps")
    from .dist.mode import MultiRank

    return MultiRank(process_group, timeout=timeout)


def refuse_dtensors(state: Any) -> None:
    """Refuse a state whose modules hold DTensors in single-file mode (their local shards are not
    the tensors, and copying them as tensors crashes): raise :class:`UnsupportedValueError`
    pointing at ``process_group=``. Looks at the first parameter of the top level's modules only
    (a check per save must cost nothing)."""
    if "torch.distributed.tensor" not in sys.modules or not isinstance(state, Mapping):
        return
    from torch.distributed.tensor import DTensor

    for name, value in state.items():
        first = next(value.parameters(), None) if isinstance(value, torch.nn.Module) else None
        if isinstance(first, DTensor):  # FSDP2 and tensor parallel make every parameter one
            raise UnsupportedValueError(
                f"state[{name!r}] holds DTensors (FSDP2 or tensor parallel): save it as a multi-rank "
                "step with AsyncCheckpointer(..., process_group=torch.distributed.group.WORLD)",
                key=str(name),
            )


def newest_is_multi_rank(storage: Storage) -> bool:
    """Whether ``storage``'s newest committed step is a multi-rank one (False when it has none)."""
    listing = storage.ls()
    if not any(obj.kind == "dir" for obj in listing):  # no step folders: no extra requests
        return False
    steps = catalog.committed_steps(storage)
    if not steps:
        return False
    files = catalog.committed(storage)
    return not files or steps[-1].step >= files[-1].step


def restore_plain(
    directory: Location, objects: Mapping[str, Any], *, on_corrupt: OnCorrupt, expect: Any, log: Log | None
) -> LoadResult | None:
    """Restore a multi-rank step into ``objects`` in a plain process (any saved world size)."""
    from .dist.mode import restore_steps

    return restore_steps(directory, objects, on_corrupt=on_corrupt, expect=expect, log=log)


def load_latest(
    directory: str | os.PathLike[str],
    *,
    map_location: MapLocation = "cpu",
    on_corrupt: OnCorrupt = "fallback",
    verify: Verify = "full",
    expect: Any = None,
    log: Log | None = None,
    storage_options: dict[str, Any] | None = None,
) -> LoadResult:
    """Load the newest usable checkpoint in ``directory``, falling back past broken ones.

    Single files: see :func:`asyncckpt.loading.load_latest` (the options and errors are its).
    Multi-rank steps (when the newest committed step is one): the step is read whole (see
    :func:`asyncckpt.dist.load_full`); every tensor comes back unsharded on ``map_location``;
    ``result.state`` holds the modules' and optimizers' state dicts and the plain values as
    saved, ``result.per_rank[rank]`` each rank's own values. Shards are always checked in
    full (``verify`` does not apply); ``expect`` is refused (:class:`UsageError`).
    """
    storage = open_storage(directory, storage_options=storage_options)
    try:
        multi_rank = newest_is_multi_rank(storage)
    except PermissionError as exc:
        raise unlistable(storage.location, exc) from exc
    if not multi_rank:
        return load_single_files(
            directory,
            map_location=map_location,
            on_corrupt=on_corrupt,
            verify=verify,
            expect=expect,
            log=log,
            storage_options=storage_options,
        )
    if expect is not None:
        raise UsageError("expect= does not apply to multi-rank steps", path=storage.location)
    from .dist.mode import load_whole

    result = load_whole(storage, map_location=torch.device(map_location))
    if on_corrupt == "fail" and result.diagnostics:
        first = result.diagnostics[0]
        error = IncompatibleCheckpointError if first.kind == "incompatible" else CorruptedCheckpointError
        raise error(first.reason, path=first.path, step=first.step)
    _emit(log, result)
    return result


def _emit(log: Log | None, result: LoadResult) -> None:
    """The summary as the ``checkpoint.load.summary`` event, as the single-file loader logs it."""
    if log is None:
        logger = structlog.get_logger("asyncckpt")
        log = logger.warning if result.diagnostics else logger.info
    failures = [{"path": d.path, "kind": d.kind, "reason": d.reason} for d in result.diagnostics]
    log(
        SUMMARY_EVENT,
        summary=result.summary,
        step=result.step,
        path=str(result.path),
        version=result.version,
        failures=failures,
    )
