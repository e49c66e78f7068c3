"""asyncckpt: PyTorch checkpoints off the critical path, durable, verified, with rollback."""

from ._version import __version__
from .checkpoint import Checkpoint, load, save
from .checkpointer import AsyncCheckpointer, CheckpointBusyError, CheckpointerStats, SaveHandle
from .errors import (
    CheckpointError,
    CheckpointWriteError,
    CorruptedCheckpointError,
    IncompatibleCheckpointError,
    NoValidCheckpointError,
    UnsupportedVersionError,
)
from .storage import CheckpointInfo, list_checkpoints

__all__ = [
    "AsyncCheckpointer",
    "CheckpointBusyError",
    "CheckpointerStats",
    "SaveHandle",
    "Checkpoint",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointWriteError",
    "CorruptedCheckpointError",
    "IncompatibleCheckpointError",
    "NoValidCheckpointError",
    "UnsupportedVersionError",
    "__version__",
    "list_checkpoints",
    "load",
    "save",
]
