"""asyncckpt: PyTorch checkpoints off the critical path, durable, verified, with rollback."""

from ._values import UnresolvedValue
from ._version import __version__
from .catalog import CheckpointInfo, list_checkpoints
from .checkpointer import AsyncCheckpointer
from .errors import (
    CheckpointBusyError,
    CheckpointError,
    CheckpointWriteError,
    CoordinationError,
    CorruptedCheckpointError,
    Diagnostic,
    IncompatibleCheckpointError,
    NoValidCheckpointError,
    UnsupportedVersionError,
)
from .load import CandidateReport, LoadResult, check_candidates, load_latest, restore

# After the packages asyncckpt.load and asyncckpt.save are first imported (by the lines above):
# that binds their names on this package; the public asyncckpt.load and asyncckpt.save are the
# one-shot functions.
from .oneshot import Checkpoint, load, save
from .rng import rng_state, set_rng_state
from .save.handles import SaveHandle
from .save.stats import CheckpointerStats

__all__ = [
    "AsyncCheckpointer",
    "CandidateReport",
    "Checkpoint",
    "CheckpointBusyError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointWriteError",
    "CheckpointerStats",
    "CoordinationError",
    "CorruptedCheckpointError",
    "Diagnostic",
    "IncompatibleCheckpointError",
    "LoadResult",
    "NoValidCheckpointError",
    "SaveHandle",
    "UnresolvedValue",
    "UnsupportedVersionError",
    "__version__",
    "check_candidates",
    "list_checkpoints",
    "load",
    "load_latest",
    "restore",
    "rng_state",
    "save",
    "set_rng_state",
]
