"""What opening an ``AsyncCheckpointer`` does.

Opening changes no checkpoint and removes nothing, so that an evaluator may open a checkpointer
on a trainer's directory only to ``restore()``: it creates the run directory (durably) when it
is missing and can be created, opens the event log (or, when it cannot, structlog's
``"asyncckpt"`` logger: a read-only filesystem, a FIFO or a symlink named ``events.jsonl``), and
builds the writer and its runner. The first save then prepares the directory for writing
(:class:`~asyncckpt.pipeline.FirstSave`): it removes the temp files and uploads no live writer
owns, or raises :class:`CheckpointWriteError` when the directory cannot be written.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TypeVar

from . import events as ev
from ._priority import background_level
from .pipeline import FirstSave, SavePipeline
from .saving.readback import VerifyMode
from .saving.runner import Runner
from .storage import CheckpointPath, FileOps, Storage
from .storage.posix import make_directory_durably

R = TypeVar("R", bound=Runner)

# What opening the run directory's own events.jsonl may fail with when the directory itself
# cannot be written (EACCES and EPERM only when the file is missing: else the file is the cause).
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def open_runner(
    kind: type[R],
    pipeline: SavePipeline,
    *,
    storage: Storage,
    event_log: Path | None,
    local_copy: Path | None,
    ops: FileOps,
    verify: VerifyMode,
    keep_last: int | None,
    keep_every: int | None,
    close_timeout: float | None,
    background_nice: int = 0,
) -> tuple[R, FirstSave]:
    """Open the event log and build the writer and its runner (not started) for ``pipeline``'s
    saves; remove nothing. Returns the runner and what its first save does first.

    The writer's threads run ``background_nice`` nice levels below the calling thread."""
    mode, directory, pool = pipeline.mode, pipeline.directory, pipeline.pool
    log, unwritable = open_event_log(directory, event_log, ops=ops)
    if local_copy is not None:
        local_copy.mkdir(parents=True, exist_ok=True)
    mode.bind(log)
    log.info(ev.WRITER_STARTED, directory=str(directory), mode=kind.mode, max_pending=pool.slots)
    first_save = FirstSave(storage, directory, clean_up=mode.cleans_up_at_first_save, unwritable=unwritable)
    writer = mode.writer(
        storage,
        pool=pool,
        verify=verify,
        keep_last=keep_last,
        keep_every=keep_every,
        log=log,
        errors=pipeline.errors,
        stats=pipeline.stats,
    )
    runner = kind(
        writer,
        pending=pipeline.pending,
        errors=pipeline.errors,
        log=log,
        close_timeout=close_timeout,
        directory=directory,
        nice=background_level(background_nice),
    )
    return runner, first_save


def open_event_log(
    directory: CheckpointPath, path: Path | None, *, ops: FileOps
) -> tuple[ev.EventLog, OSError | None]:
    """Create the local run ``directory`` when it is missing, and open the event log at ``path``.

    Returns the log (structlog's logger when the file cannot be opened) and, when the run
    directory cannot be written (it could not be created, or its own ``events.jsonl`` could not
    be created there), the error that shows it; the first save raises it.
    """
    unwritable: OSError | None = None
    if isinstance(directory, Path):
        try:
            make_directory_durably(directory)
        except OSError as exc:
            unwritable = exc
    log, failed = ev.open_event_log(path, ops=ops)
    if unwritable is None and failed is not None and path is not None and path.parent == directory:
        unwritable = failed if _shows_unwritable(failed, path) else None
    return log, unwritable


def _shows_unwritable(error: OSError, events_file: Path) -> bool:
    """Whether failing to open the run directory's own ``events_file`` shows that the directory
    cannot be written (a read-only filesystem, or a missing file we may not create)."""
    if error.errno == errno.EROFS:
        return True
    return error.errno in _UNWRITABLE and not os.path.lexists(events_file)
