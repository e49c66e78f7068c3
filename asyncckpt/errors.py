"""The exception hierarchy and the exit codes the CLI maps them to."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .loader import Diagnostic

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_PARTIAL = 2
EXIT_CHECKPOINT = 3


class CheckpointError(Exception):
    """Base of every error asyncckpt raises about a checkpoint."""

    exit_code: int = EXIT_CHECKPOINT


class CorruptedCheckpointError(CheckpointError):
    """The bytes are broken: truncated, bad magic, checksum mismatch, status not complete."""


class IncompatibleCheckpointError(CheckpointError):
    """The bytes are intact but cannot be used here (version, keys, shapes)."""


class UnsupportedVersionError(IncompatibleCheckpointError):
    """The file's format version is newer than (or unknown to) this release."""


class NoValidCheckpointError(CheckpointError):
    """Rollback found no usable checkpoint; ``diagnostics`` says why for each candidate."""

    def __init__(self, message: str, diagnostics: Sequence[Diagnostic] = ()) -> None:
        super().__init__(message)
        self.diagnostics: list[Diagnostic] = list(diagnostics)


class CheckpointWriteError(CheckpointError):
    """A save failed (in the background or in the foreground); ``__cause__`` is the OS error."""

    def __init__(self, message: str, *, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class CheckpointBusyError(CheckpointError):
    """``save()`` was called on the event loop while every staging slot is busy.

    Waiting there would block the loop the writer runs on; use ``await ckpt.asave(...)`` or
    ``when_busy="skip"``.
    """
