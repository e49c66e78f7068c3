"""ErrorBox: background failures waiting to be raised in the trainer."""

from __future__ import annotations

import threading

from ..errors import CheckpointWriteError


class ErrorBox:
    """Background failures waiting to be raised in the trainer, oldest first. Thread-safe."""

    def __init__(self) -> None:
        self._errors: list[CheckpointWriteError] = []
        self._lock = threading.Lock()

    def put(self, error: CheckpointWriteError) -> None:
        """Keep ``error`` until the trainer sees it."""
        with self._lock:
            self._errors.append(error)

    def discard(self, error: CheckpointWriteError) -> None:
        """Forget ``error``: the trainer has seen it through its handle."""
        with self._lock:
            self._errors = [e for e in self._errors if e is not error]

    def raise_first(self) -> None:
        """Raise the oldest pending failure (the others are attached as notes) and clear all."""
        with self._lock:
            errors, self._errors = self._errors, []
        if not errors:
            return
        first = errors[0]
        for other in errors[1:]:
            first.add_note(f"also failed: {other}")
        raise first
