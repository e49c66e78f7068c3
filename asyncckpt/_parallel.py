"""Work on pools of threads. Reading one file's blobs on several threads: work items run on a
pool, and of the failures the lowest broken blob is reported, whatever the threads' timing (the
local runs of :mod:`asyncckpt.runs` and the object-store spans of :mod:`asyncckpt.spans`).
Handing work to a pool that may refuse it because the interpreter is exiting
(:func:`submit_or_run`: the writer's checksums and direct writes)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

from .errors import CheckpointError

Item = TypeVar("Item")
T = TypeVar("T")


def submit_or_run(pool: Executor, work: Callable[..., T], *args: Any) -> Future[T]:
    """``pool.submit(work, *args)``; run here when the pool takes no more work because the
    interpreter is exiting (a save from an ``atexit`` hook: no new thread may start). What
    ``work`` raises then is raised here."""
    try:
        return pool.submit(work, *args)
    except RuntimeError:
        done: Future[T] = Future()
        done.set_result(work(*args))
        return done


def run_each(work: Callable[[Item], None], items: Sequence[Item], threads: int, name: str) -> None:
    """``work(item)`` for every item: in this thread for one thread (or one item), else on a
    pool of ``threads`` threads named ``name``; the first exception ``work`` raises is raised."""
    threads = min(threads, len(items))
    if threads <= 1:
        for item in items:
            work(item)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix=name) as pool:
        for _ in pool.map(work, items):
            pass


class Failures:
    """Broken blobs found by several threads; :meth:`raise_lowest` raises the error of the lowest
    blob (then the lowest offset), so that the answer does not depend on thread timing."""

    def __init__(self, blobs: int) -> None:
        self._lock = threading.Lock()
        self._found: list[tuple[int, int, CheckpointError]] = []
        self.lowest = blobs  # the lowest blob index known to be broken; ``blobs``: none yet

    def add(self, blob: int, exc: CheckpointError) -> None:
        """Record ``exc``, found reading from blob ``blob`` on (its own ``blob`` field wins)."""
        with self._lock:
            found = exc.blob if isinstance(exc.blob, int) else blob
            at = exc.offset if isinstance(exc.offset, int) else 0
            self._found.append((found, at, exc))
            self.lowest = min(self.lowest, found)

    def raise_lowest(self) -> None:
        """Raise the lowest blob's error, if any was recorded."""
        if self._found:
            raise min(self._found, key=lambda failure: failure[:2])[2]
