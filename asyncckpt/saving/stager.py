"""Stager: the staging step of a save, from a plan and a free slot to a staged copy.

It holds what outlives one save: the background :class:`~asyncckpt.saving.staging.Copier`, the
CUDA side stream (made at the first CUDA save), and the :class:`~asyncckpt.saving.overlap.StepGuard`
that makes optimizer steps wait for the background copies.
"""

from __future__ import annotations

from typing import Any

import torch

from .overlap import StepGuard
from .plan import SavePlan
from .snapshot import gc_paused
from .staging import Copier, StagedCopy, StagingBuffers, StagingPool, stage


class Stager:
    """Copies planned saves into the buffer sets of ``pool``.

    ``copier`` is the seam that decides when background copies run (tests replace it).
    """

    def __init__(self, pool: StagingPool) -> None:
        self.pool = pool
        self.copier = Copier()
        self.guard = StepGuard()
        self._side_stream: Any = None

    def stage(self, plan: SavePlan, buffers: StagingBuffers) -> StagedCopy:
        """Copy ``plan`` into ``buffers`` (see :func:`~asyncckpt.saving.staging.stage`); the step
        guard then covers the deferred blobs. On failure the buffers go back to the pool."""
        if plan.uses_cuda and self._side_stream is None:
            self._side_stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        staged = None
        try:
            with gc_paused():
                staged = stage(
                    plan.snapshot,
                    buffers,
                    side_stream=self._side_stream,
                    deferred=plan.deferred,
                    copier=self.copier,
                )
            if plan.deferred:
                self.guard.arm(staged)
        except BaseException:
            if staged is not None:
                staged.settle()  # no copy may still be filling the buffers
            self.pool.release(buffers)
            raise
        return staged

    def close(self) -> None:
        """Wait for the pending copies, remove the step hook and stop the copier thread."""
        self.guard.remove()
        self.copier.close()
