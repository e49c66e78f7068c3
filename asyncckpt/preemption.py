"""SIGTERM (cluster preemption): commit the pending checkpoints, then let the signal proceed."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from . import events as ev
from .errors import UsageError


class CallsInProgress:
    """Counts the calls inside it (a context manager); ``wait_idle()`` waits until none is."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition(threading.Lock())

    def __enter__(self) -> None:
        with self._idle:
            self._count += 1

    def __exit__(self, *_: object) -> None:
        with self._idle:
            self._count -= 1
            if not self._count:
                self._idle.notify_all()

    def wait_idle(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._count == 0)


class SigtermFlusher:
    """While installed, a SIGTERM first waits for the pending saves, then takes its normal course.

    ``pending`` returns the futures of the saves in flight; ``saves`` counts the ``save()`` calls
    under way (a signal may land inside one); ``log`` records the ``checkpoint.sigterm`` event.
    """

    def __init__(
        self,
        *,
        pending: Callable[[], list[concurrent.futures.Future[Any]]],
        saves: CallsInProgress,
        log: Callable[..., None],
    ) -> None:
        self._pending = pending
        self._saves = saves
        self._log = log
        self._previous: Any = None
        self._received = threading.Event()  # set by the handler: flush, then re-send
        self._wake = threading.Event()  # set by the handler or by uninstall
        self._flushed = threading.Event()
        self._helper: threading.Thread | None = None

    def install(self) -> None:
        """Take over SIGTERM and start the helper thread that will flush.

        Raises :class:`asyncckpt.errors.UsageError` off the main thread (only it may set signal
        handlers), before anything is started.
        """
        if threading.current_thread() is not threading.main_thread():
            raise UsageError("handle_sigterm=True needs the checkpointer entered in the main thread")
        self._received.clear()
        self._flushed.clear()
        self._wake.clear()
        self._helper = threading.Thread(target=self._flush_then_resend, name="asyncckpt-sigterm", daemon=True)
        self._helper.start()
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def uninstall(self) -> None:
        """Give SIGTERM back to the previous handler; a SIGTERM received meanwhile goes to that
        handler once the helper has flushed and re-sent it."""
        self._restore()
        if self._helper is None:
            return
        self._wake.set()
        self._helper.join()
        self._helper = None

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # This runs in the main thread between two bytecodes of whatever it was doing, perhaps
        # inside save() holding a lock or halfway through queueing a job: waiting for the flush
        # here could deadlock. So the first delivery only wakes a helper thread, which waits for
        # the saves pending at that moment and sends the signal again; the second delivery hands
        # it on to the previous handler, or to the default action (exit).
        if not self._flushed.is_set():
            self._received.set()
            self._wake.set()
            return
        previous = self._restore()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            os.kill(os.getpid(), signum)  # the default action, now that the handler is gone

    def _flush_then_resend(self) -> None:
        self._wake.wait()
        if not self._received.is_set():
            return  # uninstalled without a SIGTERM
        self._saves.wait_idle()
        pending = self._pending()
        self._log(ev.SIGTERM, pending=len(pending))
        # Failures stay in the checkpointer's error box (and were logged).
        concurrent.futures.wait(pending)
        self._flushed.set()
        os.kill(os.getpid(), signal.SIGTERM)

    def _restore(self) -> Any:
        previous, self._previous = self._previous, None
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        return previous
