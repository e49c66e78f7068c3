"""Structured events: a structlog logger scoped to asyncckpt, writing JSON lines.

Nothing here touches the global structlog or logging configuration: each checkpointer gets its own
bound logger whose sink is its ``events.jsonl``. Every line has ``event``, ``timestamp`` (ISO 8601
UTC), ``level`` and, where it applies, ``step``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import structlog

from .storage.posix import open_regular

EVENTS_FILE = "events.jsonl"

SAVE_STAGED = "checkpoint.save.staged"
SAVE_WAITED = "checkpoint.save.waited"
SAVE_SKIPPED = "checkpoint.save.skipped"
SAVE_COMMITTED = "checkpoint.save.committed"
SAVE_FAILED = "checkpoint.save.failed"
PRUNED = "checkpoint.pruned"
PRUNE_FAILED = "checkpoint.prune_failed"
DELETED = "checkpoint.deleted"
DELETE_SKIPPED = "checkpoint.delete_skipped"
DELETE_FAILED = "checkpoint.delete_failed"
TMP_REMOVED = "checkpoint.tmp_removed"
LOAD_SUMMARY = "checkpoint.load.summary"
SIGTERM = "checkpoint.sigterm"
WRITER_STARTED = "checkpoint.writer.started"
WRITER_STOPPED = "checkpoint.writer.stopped"


class JsonLinesFile:
    """A structlog logger that appends each rendered line with one ``write`` on an O_APPEND fd.

    One write per line keeps lines whole for readers tailing the file and for several writers.
    The log is a side channel: a line that cannot be written (disk full, I/O error) is counted in
    ``dropped`` and never fails the save or the trainer that logged it.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Never through a symlink (it could point outside the run) and never a FIFO (it would hang).
        self._fd: int | None = open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self._lock = threading.Lock()
        self.dropped = 0

    def msg(self, message: str) -> None:
        data = (message + "\n").encode("utf-8")
        with self._lock:
            if self._fd is None:
                return
            try:
                os.write(self._fd, data)
            except OSError:  # e.g. ENOSPC on the checkpoint disk: the checkpoint's own error says it
                self.dropped += 1

    debug = info = warning = error = critical = exception = msg

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class EventLog:
    """A bound structlog logger plus the file it writes; ``close()`` when done."""

    def __init__(self, path: Path) -> None:
        self.sink = JsonLinesFile(path)
        self.logger: Any = structlog.wrap_logger(
            self.sink,
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.JSONRenderer(sort_keys=False),
            ],
            cache_logger_on_first_use=True,
        )

    @property
    def path(self) -> Path:
        return self.sink.path

    def info(self, event: str, **fields: Any) -> None:
        self.logger.info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.logger.warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.logger.error(event, **fields)

    def close(self) -> None:
        self.sink.close()
