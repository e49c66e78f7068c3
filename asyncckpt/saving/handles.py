"""SaveHandle: the outcome of one ``AsyncCheckpointer.save()``."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Generator
from typing import Any

import anyio
import anyio.to_thread

from ..errors import CheckpointWriteError
from ..storage import CheckpointPath
from .errorbox import ErrorBox


class SaveHandle:
    """The outcome of one ``save()``: poll it, wait for it, or ``await`` it (async use)."""

    def __init__(
        self,
        step: int,
        path: CheckpointPath,
        future: concurrent.futures.Future[CheckpointPath] | None,
        *,
        errors: ErrorBox | None = None,
        done_event: Any = None,
    ) -> None:
        self.step = step
        self.path = path
        self._future = future
        self._errors = errors
        self._done_event = done_event

    @property
    def skipped(self) -> bool:
        """True when the save was dropped because every staging slot was busy (``when_busy="skip"``)."""
        return self._future is None

    def done(self) -> bool:
        """Whether the save has settled (committed, failed or skipped)."""
        return self._future is None or self._future.done()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the save settles, without raising its error; False on timeout."""
        if self._future is None:
            return True
        done, _ = concurrent.futures.wait([self._future], timeout)
        return bool(done)

    def result(self, timeout: float | None = None) -> CheckpointPath | None:
        """Wait until committed and return the file's path (None for a skipped save): a ``Path``,
        or a :class:`~asyncckpt.storage.RemotePath` (the URL) on an object store.

        Raises :class:`CheckpointWriteError` if the save failed (the error is then not raised
        again at the next ``save()``), ``TimeoutError`` if ``timeout`` seconds pass first.
        """
        if self._future is None:
            return None
        try:
            return self._future.result(timeout)
        except CheckpointWriteError as exc:
            if self._errors is not None:
                self._errors.discard(exc)
            raise

    def __await__(self) -> Generator[Any, None, CheckpointPath | None]:
        return self._wait().__await__()

    async def _wait(self) -> CheckpointPath | None:
        if self._future is None:
            return None
        if self._done_event is not None:
            await self._done_event.wait()
        else:
            await anyio.to_thread.run_sync(concurrent.futures.wait, [self._future])
        return self.result(0)

    def __repr__(self) -> str:
        state = "skipped" if self.skipped else ("done" if self.done() else "pending")
        return f"<SaveHandle step={self.step} {state}>"
