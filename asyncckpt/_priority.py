"""The CPU priority of asyncckpt's background threads: Linux nice values, which are per thread.

The writer's threads (its event loop, the worker threads that write, fsync and verify, and the
checksum, upload and shard-check pools they start) run a few nice levels below the thread that
opened the checkpointer, so that when the training threads and the writer both want a core, the
training threads get it and the checkpoint takes what is left. A new thread inherits the nice
value of the thread that starts it, so lowering the roots (the event loop's thread; in async use
the writer's own thread) lowers every thread they start; threads the trainer waits on (staging
copies, loads) are started by the trainer and keep its priority.

Lowering a thread's priority needs no privilege; raising it back does, so a thread lowered once
stays lowered: only threads asyncckpt owns are ever lowered, never a thread of the caller's event
loop. Elsewhere than Linux nothing changes (``setpriority`` there applies to the whole process).
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

import anyio.to_thread

MAX_NICE = 19  # the lowest priority Linux offers
SUPPORTED = sys.platform.startswith("linux") and hasattr(os, "setpriority")


class _Call:
    """One piece of work for a :class:`BackgroundThread` and the future of its result."""

    def __init__(self, work: Callable[[], Any]) -> None:
        self.work: Callable[[], Any] | None = work
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run(self) -> None:
        """Run the work and settle the future; the work (and what it holds) is dropped first,
        so that nothing of it is freed in this thread after the awaiting task has moved on."""
        work, self.work = self.work, None
        assert work is not None
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = work()
        except BaseException as exc:  # handed to the awaiting task, never lost
            del work
            self.future.set_exception(exc)
        else:
            del work
            self.future.set_result(result)


def thread_nice(native_id: int | None = None) -> int:
    """The nice value of the thread ``native_id`` (default: the calling thread); 0 off Linux."""
    if not SUPPORTED:
        return 0
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id() if native_id is None else native_id)


def background_level(offset: int) -> int | None:
    """The nice value for background threads ``offset`` levels below the calling thread (at most
    19), or None when they are to be left as they are (``offset`` 0, or not Linux)."""
    if offset == 0 or not SUPPORTED:
        return None
    return min(MAX_NICE, thread_nice() + offset)


def lower_this_thread(level: int | None) -> OSError | None:
    """Give the calling thread the nice value ``level`` when that lowers its priority.

    Does nothing for ``None``, or when the thread already runs at ``level`` or lower. Returns the
    error when the OS refuses (a sandbox that forbids ``setpriority``): the thread then runs on
    at its priority, which costs only the training speed this was for.
    """
    if level is None or not SUPPORTED:
        return None
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < level:
            os.setpriority(os.PRIO_PROCESS, tid, level)
    except OSError as exc:
        return exc
    return None


class BackgroundThread:
    """One daemon thread of asyncckpt's own that runs blocking work for a task of an event loop
    that is not asyncckpt's: the writer in ``async with`` use, whose thread is lowered (the
    loop's worker threads are the caller's and must keep their priority).

    A daemon thread, like anyio's worker threads: a call stuck in the OS never keeps the
    interpreter from exiting.
    """

    def __init__(self, *, name: str = "asyncckpt-writer") -> None:
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()  # None stops it
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def run_sync(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` in the thread and return its result (or raise its exception).

        Cancelled, it stops waiting; ``work`` runs on to its end (like anyio's
        ``run_sync(..., abandon_on_cancel=True)``).
        """
        call = _Call(work)
        self._queue.put(call)
        # The wait itself blocks one of the loop's worker threads, using no CPU.
        return await anyio.to_thread.run_sync(call.future.result, abandon_on_cancel=True)

    def close(self) -> None:
        """Stop the thread once the work queued before is done (returns at once)."""
        self._queue.put(None)

    def join(self) -> None:
        """Wait until the thread has exited (after :meth:`close`).

        A daemon thread still running at the interpreter's exit is ended wherever it stands;
        in torch's C++ code (freeing a tensor) that aborts the process, so an owner that
        closes the thread waits for it, unless its work is stuck in the OS.
        """
        self._thread.join()

    def _serve(self) -> None:
        while (call := self._queue.get()) is not None:
            call.run()
