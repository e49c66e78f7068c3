"""asyncckpt: PyTorch checkpoints off the critical path, durable, verified, with rollback."""

from ._values import UnresolvedValue
from ._version import __version__
from .catalog import CheckpointInfo, list_checkpoints
from .checkpointer import AsyncCheckpointer
from .errors import (
    AsyncckptError,
    CheckpointBusyError,
    CheckpointError,
    CheckpointWriteError,
    CoordinationError,
    CorruptedCheckpointError,
    Diagnostic,
    IncompatibleCheckpointError,
    NoValidCheckpointError,
    StateTooLargeError,
    UnsupportedValueError,
    UnsupportedVersionError,
    UsageError,
)
from .loading import CandidateReport, LoadResult, check_candidates, restore
from .multirank import load_latest
from .oneshot import Checkpoint, load, save
from .rng import rng_state, set_rng_state
from .saving.handles import SaveHandle
from .saving.stats import CheckpointerStats

__all__ = [
    "AsyncCheckpointer",
    "AsyncckptError",
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
    "StateTooLargeError",
    "UnresolvedValue",
    "UnsupportedValueError",
    "UnsupportedVersionError",
    "UsageError",
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
