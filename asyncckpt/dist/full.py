"""Reading a multi-rank step whole in a plain process (no process group): evaluation, export.

Every tensor comes back unsharded on CPU, whatever world size saved it; non-tensor values come
back as saved; per-rank values by rank. Broken steps are skipped, newest first, as the loader
does for single-file checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .. import catalog
from .._tree import unflatten
from ..dtypes import itemsize
from ..errors import CheckpointError, CorruptedCheckpointError, Diagnostic, NoValidCheckpointError
from ..storage import Location, Storage, open_storage
from ._dcp import dcp_load
from .commit import read_record
from .planner import FullStateLoadPlanner
from .record import CommitRecord
from .save import failure_cause
from .shards import ShardFiles
from .storage import AsyncckptReader
from .verify import diagnose, utc_now


@dataclass(frozen=True)
class FullState:
    """A multi-rank step read whole: ``state`` as saved (tensors unsharded, on CPU) and each
    rank's per-rank values (``per_rank[rank]``; None for a rank that kept none)."""

    step: int
    state: dict[str, Any]
    per_rank: list[Any]
    world_size: int
    diagnostics: list[Diagnostic]
    metadata: dict[str, Any] = field(default_factory=dict)  # the user metadata saved with the step


def load_full(location: Location, *, step: int | None = None) -> FullState:
    """Read the newest committed multi-rank step that reads back intact (or ``step``) whole.

    Blocking, for a plain process. Raises :class:`asyncckpt.NoValidCheckpointError` (with a
    diagnostic per broken step) when none reads back; its ``diagnostics`` is empty when there is
    no committed step at all.
    """
    storage = open_storage(location)
    steps = [info.step for info in catalog.committed_steps(storage)]
    candidates = [step] if step is not None else sorted(steps, reverse=True)
    diagnostics: list[Diagnostic] = []
    for candidate in candidates:
        where = storage.where(catalog.step_folder_name(candidate))
        try:
            return _read(storage, read_record(storage, candidate), diagnostics)
        except FileNotFoundError:
            diagnostics.append(
                Diagnostic(where, "corrupted", "no commit record: not committed", utc_now(), candidate)
            )
        except (CheckpointError, OSError) as exc:
            diagnostics.append(diagnose(exc, where, candidate))
    reasons = "; ".join(f"step {d.step} {d.kind}: {d.reason}" for d in diagnostics)
    raise NoValidCheckpointError(
        f"no committed multi-rank step reads back in {storage.location}"
        + (f": {reasons}" if reasons else ""),
        diagnostics,
        path=storage.location,
    )


def _read(storage: Storage, record: CommitRecord, diagnostics: list[Diagnostic]) -> FullState:
    _check_sizes(storage, record)
    planner = FullStateLoadPlanner()
    reader = AsyncckptReader(storage, record.step)
    try:
        dcp_load({}, reader=reader, planner=planner, group=None)
    except CheckpointException as exc:
        cause = failure_cause(exc)
        if isinstance(cause, CheckpointError | OSError):
            raise cause from None
        raise CorruptedCheckpointError(f"does not load: {cause or exc}", step=record.step) from cause
    finally:
        reader.close()
    with ShardFiles(storage, record) as shards:
        per_rank = [shards.per_rank(rank) for rank in range(record.world_size)]
        user = shards.layout(0).metadata.get("user")
    metadata = unflatten(user, []) if isinstance(user, dict) else {}
    state = planner.original_state_dict
    return FullState(record.step, state, per_rank, record.world_size, list(diagnostics), metadata)


def _check_sizes(storage: Storage, record: CommitRecord) -> None:
    """No tensor may be larger than all shard files together (a hostile record must not make
    this process allocate what it declares)."""
    total = sum(digest.nbytes for digest in record.shards)
    for fqn, md in record.metadata.state_dict_metadata.items():
        if (
            isinstance(md, TensorStorageMetadata)
            and math.prod(md.size) * itemsize(md.properties.dtype) > total
        ):
            raise CorruptedCheckpointError(
                f"tensor {fqn} of size {list(md.size)} is larger than the step's {total} bytes of shards",
                path=storage.where(catalog.commit_record_name(record.step)),
            )
