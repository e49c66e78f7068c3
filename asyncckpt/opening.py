"""What opening an ``AsyncCheckpointer`` does, and what waits for its first save.

Opening changes no checkpoint and removes nothing, so that an evaluator may open a checkpointer
on a trainer's directory only to ``restore()``: it creates the run directory (durably) when it
is missing and can be created, opens the event log (or, when it cannot, structlog's
``"asyncckpt"`` logger: a read-only filesystem, a FIFO or a symlink named ``events.jsonl``), and
starts the writer. The first save then prepares the directory for writing
(:class:`FirstSave`): it removes the temp files and uploads no live writer owns, or raises
:class:`CheckpointWriteError` when the directory cannot be written.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from . import events as ev
from .errors import CheckpointWriteError
from .storage import CheckpointPath, FileOps, Storage
from .storage.posix import make_directory_durably

# What opening the run directory's own events.jsonl may fail with when the directory itself
# cannot be written (EACCES and EPERM only when the file is missing: else the file is the cause).
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


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


class FirstSave:
    """What the first save of an open checkpointer does before anything is staged.

    It raises the error that showed the run directory cannot be written, and (single files)
    removes the leftovers of writers that are gone. It runs again at the next save until it
    succeeds; read-only use never runs it.
    """

    def __init__(
        self, storage: Storage, directory: CheckpointPath, *, clean_up: bool, unwritable: OSError | None
    ) -> None:
        self.storage = storage
        self.directory = directory
        self.clean_up = clean_up
        self.unwritable = unwritable
        self.done = False

    def prepare(self, log: ev.EventLog) -> None:
        """Once: raise :class:`CheckpointWriteError` (path and errno) when the directory cannot be
        written; remove the abandoned temp files (each logged as ``checkpoint.tmp_removed``)."""
        if self.done:
            return
        if self.unwritable is not None:
            raise _write_error(self.directory, self.unwritable)
        if self.clean_up:
            try:
                leftovers = self.storage.leftovers()
                self.storage.remove_leftovers(leftovers)
            except OSError as exc:
                raise _write_error(self.directory, exc) from exc
            for name in leftovers:
                log.warning(ev.TMP_REMOVED, path=self.storage.where(name))
        self.done = True


def _write_error(directory: CheckpointPath, exc: OSError) -> CheckpointWriteError:
    name = errno.errorcode.get(exc.errno or 0, "?")
    error = CheckpointWriteError(
        f"cannot write to the run directory ({name}: {exc.strerror or exc}); nothing was saved. "
        "restore() works here; save() needs a writable directory",
        path=directory,
    )
    error.__cause__ = exc
    return error
