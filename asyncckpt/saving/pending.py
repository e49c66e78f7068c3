"""PendingSaves: the saves handed to the writer and not yet settled."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading

from .. import events as ev
from ..errors import CheckpointWriteError
from ..storage import CheckpointPath
from .job import Job


class PendingSaves:
    """The jobs submitted to the writer whose futures have not settled. Thread-safe.

    A job leaves by itself when its future settles (committed, failed or abandoned).
    """

    def __init__(self) -> None:
        self._jobs: dict[concurrent.futures.Future[CheckpointPath], Job] = {}
        self._lock = threading.Lock()

    def add(self, job: Job) -> None:
        """Track ``job`` until its future settles."""
        with self._lock:
            self._jobs[job.future] = job
        job.future.add_done_callback(self._settled)

    def _settled(self, future: concurrent.futures.Future[CheckpointPath]) -> None:
        with self._lock:
            self._jobs.pop(future, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)

    def futures(self) -> list[concurrent.futures.Future[CheckpointPath]]:
        """The futures of the pending saves, at this moment."""
        with self._lock:
            return list(self._jobs)

    def wait(self, timeout: float | None = None) -> int:
        """Wait until the saves pending now have settled, at most ``timeout`` seconds; return how
        many have not."""
        _, not_done = concurrent.futures.wait(self.futures(), timeout)
        return len(not_done)

    def abandon(self, reason: str, log: ev.EventLog) -> list[Job]:
        """Fail every pending save with ``reason`` (logged, and set on its future and its done
        event); return those jobs, oldest step first."""
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda job: job.step)
        for job in jobs:
            error = CheckpointWriteError(f"{reason}; abandoned", path=job.path, step=job.step)
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                job.future.set_exception(error)
            if job.done_event is not None:
                job.done_event.set()
            log.error(ev.SAVE_FAILED, step=job.step, path=str(job.path), error=str(error))
        return jobs
