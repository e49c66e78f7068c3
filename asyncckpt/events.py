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

from .storage.localcopy import LOCAL_COPY_FAILED as LOCAL_COPY_FAILED
from .storage.localcopy import LOCAL_COPY_IGNORED as LOCAL_COPY_IGNORED
from .storage.localcopy import LOCAL_COPY_USED as LOCAL_COPY_USED
from .storage.posix import OS, FileOps

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
EVENT_LOG_UNAVAILABLE = "checkpoint.event_log.unavailable"
LOAD_SUMMARY = "checkpoint.load.summary"
SIGTERM = "checkpoint.sigterm"
WRITER_STARTED = "checkpoint.writer.started"
WRITER_STOPPED = "checkpoint.writer.stopped"
WRITER_PRIORITY_FAILED = "checkpoint.writer.priority_failed"


def default_path(
    event_log: str | os.PathLike[str] | None, directory: Path | str, local_copy: Path | None
) -> Path | None:
    """Where a checkpointer's events go: ``event_log`` as given, else ``events.jsonl`` next to
    local checkpoints, else next to a remote run's local copy; None (structlog's "asyncckpt"
    logger) for a remote run without one."""
    if event_log is not None:
        return Path(event_log)
    if isinstance(directory, Path):
        return directory / EVENTS_FILE
    return local_copy / EVENTS_FILE if local_copy is not None else None


class JsonLinesFile:
    """A structlog logger that appends each rendered line with one ``write`` on an O_APPEND fd.

    One write per line keeps lines whole for readers tailing the file and for several writers.
    The log is a side channel: a line that cannot be written (disk full, I/O error) is counted in
    ``dropped`` and never fails the save or the trainer that logged it.
    """

    def __init__(self, path: Path, *, ops: FileOps = OS) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Never through a symlink (it could point outside the run) and never a FIFO (it would hang).
        self._fd: int | None = ops.open_append(path)
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
    """A bound structlog logger plus the file it writes; ``close()`` when done.

    Without a path (a run on an object store, where nothing can be appended to) the events go
    to structlog's ``"asyncckpt"`` logger, as the application configured it. Raises ``OSError``
    when the file cannot be opened (see :func:`open_event_log`, which falls back instead).
    """

    def __init__(self, path: Path | None, *, ops: FileOps = OS) -> None:
        self.sink: JsonLinesFile | None = None
        if path is None:
            self.logger: Any = structlog.get_logger("asyncckpt")
            return
        self.sink = JsonLinesFile(path, ops=ops)
        self.logger = structlog.wrap_logger(
            self.sink,
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.JSONRenderer(sort_keys=False),
            ],
            cache_logger_on_first_use=True,
        )

    @property
    def path(self) -> Path | None:
        return None if self.sink is None else self.sink.path

    def info(self, event: str, **fields: Any) -> None:
        self.logger.info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.logger.warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.logger.error(event, **fields)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


def open_event_log(path: Path | None, *, ops: FileOps = OS) -> tuple[EventLog, OSError | None]:
    """The event log at ``path``, or, when it cannot be opened, structlog's ``"asyncckpt"`` logger.

    A run directory on a read-only filesystem, one we may not write, or an ``events.jsonl``
    that is a FIFO, a symlink or a folder must not keep a checkpointer from opening (restore
    works there): the events then go to structlog, after a ``checkpoint.event_log.unavailable``
    warning. Returns the log and the error that made it fall back (None when it did not).
    """
    if path is None:
        return EventLog(None), None
    try:
        return EventLog(path, ops=ops), None
    except OSError as exc:
        log = EventLog(None)
        log.warning(EVENT_LOG_UNAVAILABLE, path=str(path), error=str(exc))
        return log, exc
