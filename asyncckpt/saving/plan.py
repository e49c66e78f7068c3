"""Plan a save: check and flatten the state, check the metadata, choose the blobs that overlap.

The first step of ``save()``, before any byte is copied: everything the format cannot store is
refused here, with the key path that names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..format import check_step
from .overlap import modules_in, optimizers_in, step_guarded_blobs
from .snapshot import LayoutKey, Snapshot, flatten, flatten_metadata, gc_paused


@dataclass(frozen=True)
class SavePlan:
    """What one ``save()`` stages and writes; nothing is copied yet.

    ``metadata`` is the user metadata's encodable tree; ``layout`` says which staging buffers fit
    (:meth:`Snapshot.layout_key`); ``deferred`` holds the blobs that only an optimizer step
    changes, copied while the trainer runs on (empty with overlap off).
    """

    step: int
    snapshot: Snapshot
    metadata: Any
    layout: LayoutKey
    deferred: frozenset[int]

    @property
    def uses_cuda(self) -> bool:
        """Whether any blob is copied from a CUDA device."""
        return any(blob.device.type == "cuda" for blob in self.snapshot.blobs)


def plan_save(
    step: int, state: Any, metadata: dict[str, Any] | None, *, overlap: bool, live: Sequence[Any] = ()
) -> SavePlan:
    """Check ``step``, flatten ``state`` and ``metadata``, and pick the overlapping blobs.

    ``live`` holds modules and optimizers that are not in ``state`` but whose tensors it holds
    (a state dict built from them): their parameters and optimizer state overlap as if they were.

    Raises :class:`asyncckpt.errors.UnsupportedValueError` (a ``TypeError``) naming the key path
    of the first value that cannot be stored, and what :func:`asyncckpt.format.check_step`
    raises for a bad step. Copies nothing.
    """
    check_step(step)
    with gc_paused():
        snapshot = flatten(state)
        metadata_tree = flatten_metadata(metadata)
        layout = snapshot.layout_key()
        deferred = _step_guarded(snapshot, (state, tuple(live))) if overlap else frozenset()
    return SavePlan(step, snapshot, metadata_tree, layout, deferred)


def _step_guarded(snapshot: Snapshot, state: Any) -> frozenset[int]:
    optimizers = optimizers_in(state)
    if not optimizers:
        return frozenset()
    return step_guarded_blobs(snapshot, optimizers, modules_in(state))
