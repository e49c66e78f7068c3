"""Copier: the background thread that runs a save's deferred staging copies."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .staging import StagedCopy


class Copier:
    """One background thread that runs deferred copies, oldest save first.

    Torch's copy kernels release the GIL, so the trainer's thread runs on meanwhile.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._held: list[tuple[StagedCopy, list[torch.Tensor], list[torch.Tensor]]] | None = None

    def submit(
        self, staged: StagedCopy, destinations: list[torch.Tensor], sources: list[torch.Tensor]
    ) -> None:
        """Queue ``staged``'s deferred copies (``destinations[i].copy_(sources[i])``); inside
        :meth:`held`, when the block ends."""
        if self._held is not None:
            self._held.append((staged, destinations, sources))
            return
        self._queue(staged, destinations, sources)

    def _queue(
        self, staged: StagedCopy, destinations: list[torch.Tensor], sources: list[torch.Tensor]
    ) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncckpt-stage")
        self._executor.submit(self.run, staged, destinations, sources)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Queue the copies submitted in the block when it ends, even on error (the trainer's
        thread only). ``save()`` hands its job to the writer first: waking the copier thread
        before that let it take the GIL while the trainer's hand-off released it, and the
        trainer waited for it to give it back. :meth:`start` is never held."""
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            for staged, destinations, sources in held:
                self._queue(staged, destinations, sources)

    def start(self, work: Callable[[], None]) -> None:
        """Run ``work`` in the copier thread, after the copies queued before it."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncckpt-stage")
        self._executor.submit(work)

    def run(self, staged: StagedCopy, destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        """Run one save's deferred copies (in the copier thread)."""
        staged.run_deferred(destinations, sources)

    def close(self) -> None:
        """Wait for the copies queued so far and stop the thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
