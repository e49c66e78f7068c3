"""The exception hierarchy, the exit codes the CLI maps them to, and :class:`Diagnostic`.

Every error carries where it happened as fields (``path``, ``key``, ``offset``, ``blob``,
``rank``, ``step``) and what went wrong as ``reason``; ``str(error)`` joins them for people.
Callers read the fields, never parse the text. This module imports nothing of the package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Literal

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_PARTIAL = 2
EXIT_CHECKPOINT = 3

Where = str | PathLike[str] | None


class AsyncckptError(Exception):
    """Base of every error asyncckpt raises.

    ``reason`` says what failed; ``path`` (a file, a directory or a storage URL), ``key`` (a key
    path in the state, such as ``state['model']['w']``), ``offset`` (a byte offset in the file),
    ``blob`` (a blob index), ``rank`` and ``step`` say where, when known. ``str()`` is
    ``"{path}: {reason}"``.
    """

    exit_code: int = EXIT_FAILURE

    def __init__(
        self,
        reason: str,
        *,
        path: Where = None,
        key: str | None = None,
        offset: int | None = None,
        blob: int | None = None,
        rank: int | None = None,
        step: int | None = None,
    ) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        self.key = key
        self.offset = offset
        self.blob = blob
        self.rank = rank
        self.step = step
        super().__init__(self._text())

    def _text(self) -> str:
        return self.reason if self.path is None else f"{self.path}: {self.reason}"

    def __str__(self) -> str:
        return self._text()


class UsageError(AsyncckptError):
    """asyncckpt was called wrongly: a bad option, the wrong thread, an object already open.

    Not a checkpoint problem: the CLI exits with code 1.
    """


class UnsupportedValueError(UsageError, TypeError):
    """The state holds a value the format cannot store; ``key`` names where. Nothing was written."""


class StateTooLargeError(UsageError, ValueError):
    """The state exceeds a format limit (header size, tensor count); checked before writing."""


class CheckpointError(AsyncckptError):
    """Base of every error about a checkpoint's bytes or its use (exit code 3)."""

    exit_code = EXIT_CHECKPOINT


class CorruptedCheckpointError(CheckpointError):
    """The bytes are broken: truncated, bad magic, checksum mismatch, status not complete."""


class IncompatibleCheckpointError(CheckpointError):
    """The bytes are intact but cannot be used here (version, keys, shapes, step mismatch)."""


class UnsupportedVersionError(IncompatibleCheckpointError):
    """The file's format version is newer than (or unknown to) this release."""


@dataclass(frozen=True)
class Diagnostic:
    """Why one candidate checkpoint was skipped.

    ``kind`` is "corrupted" (the bytes are broken) or "incompatible" (intact, but not usable
    here); ``reason`` is one line naming what failed and where inside the file; ``timestamp`` is
    ISO 8601 UTC; ``step`` is the candidate's step when known.
    """

    path: str
    kind: Literal["corrupted", "incompatible"]
    reason: str
    timestamp: str
    step: int | None = None


class NoValidCheckpointError(CheckpointError):
    """Rollback found no usable checkpoint; ``diagnostics`` says why for each candidate.

    An empty ``diagnostics`` means there was no candidate at all (a fresh start).
    """

    def __init__(self, reason: str, diagnostics: Sequence[Diagnostic] = (), *, path: Where = None) -> None:
        super().__init__(reason, path=path)
        self.diagnostics: list[Diagnostic] = list(diagnostics)


class CheckpointWriteError(CheckpointError):
    """A save failed (in the background or in the foreground); ``__cause__`` is the OS error."""


class CheckpointBusyError(UsageError):
    """``save()`` was called on the event loop while every staging slot is busy.

    Waiting there would block the loop the writer runs on; use ``await ckpt.asave(...)`` or
    ``when_busy="skip"``.
    """


class CoordinationError(CheckpointError):
    """The ranks of a multi-rank save or restore did not agree: a rank called with another step
    or another operation, stopped answering within the timeout, or died. Raised on every rank
    that is still running; nothing was committed by the call that failed."""
