"""Plan a save: check and flatten the state, check the metadata, choose the blobs that overlap.

The first step of ``save()``, before any byte is copied: everything the format cannot store is
refused here, with the key path that names it. A :class:`Planner` keeps what the last save's
state decided (its structure, which blobs overlap) and reuses it while the state keeps its shape.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._tree import walk
from ..format import check_step
from .fingerprint import StructureCache
from .overlap import step_guarded_blobs
from .snapshot import LayoutKey, Snapshot, Structure, flatten_metadata, gc_paused


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
        return self.snapshot.structure.uses_cuda


class Planner:
    """Plans saves, reusing what the last state decided while it keeps its shape.

    The structure is reused while the state's fingerprint matches
    (:class:`~asyncckpt.saving.fingerprint.StructureCache`). The overlapping blobs are reused
    while the structure is the same object and the state holds the same optimizer and module
    objects: which storages those guard shows in the fingerprint (each module's and optimizer's
    state dict holds the tensors of its parameters and state), so a parameter replaced, a
    parameter group added or optimizer state appearing after the first step changes it.
    """

    def __init__(self) -> None:
        self.structures = StructureCache()
        self._guard: GuardPlan | None = None

    def plan(
        self,
        step: int,
        state: Any,
        metadata: dict[str, Any] | None,
        *,
        overlap: bool,
        live: Sequence[Any] = (),
    ) -> SavePlan:
        """Check ``step``, flatten ``state`` and ``metadata``, and pick the overlapping blobs.

        ``live`` holds modules and optimizers that are not in ``state`` but whose tensors it
        holds (a state dict built from them): their parameters and optimizer state overlap as if
        they were.

        Raises :class:`asyncckpt.errors.UnsupportedValueError` (a ``TypeError``) naming the key
        path of the first value that cannot be stored, and what
        :func:`asyncckpt.format.check_step` raises for a bad step. Copies nothing.
        """
        check_step(step)
        with gc_paused():
            snapshot, objects = self.structures.snapshot(state)
            metadata_tree = flatten_metadata(metadata)
            deferred = self._step_guarded(snapshot, state, objects, live) if overlap else frozenset()
        return SavePlan(step, snapshot, metadata_tree, snapshot.layout_key(), deferred)

    def _step_guarded(
        self, snapshot: Snapshot, state: Any, objects: list[Any] | None, live: Sequence[Any]
    ) -> frozenset[int]:
        if objects is None:
            objects = [leaf for _, leaf in walk(state)]
        objects = [*objects, *live]
        optimizers = [o for o in objects if isinstance(o, torch.optim.Optimizer)]
        if not optimizers:
            return frozenset()
        modules = [o for o in objects if isinstance(o, torch.nn.Module)]
        last = self._guard
        if last is not None and last.fits(snapshot.structure, [*optimizers, *modules]):
            return last.deferred
        deferred = step_guarded_blobs(snapshot, optimizers, modules)
        self._guard = GuardPlan.of(snapshot.structure, [*optimizers, *modules], deferred)
        return deferred


@dataclass(frozen=True)
class GuardPlan:
    """The overlapping blobs of one structure with one set of optimizer and module objects."""

    structure: Structure
    objects: tuple[weakref.ref[Any], ...]  # weak: a cache must not keep a discarded model alive
    deferred: frozenset[int]

    @classmethod
    def of(cls, structure: Structure, objects: list[Any], deferred: frozenset[int]) -> GuardPlan | None:
        try:
            refs = tuple(weakref.ref(o) for o in objects)
        except TypeError:  # an object without weak references: plan afresh each save
            return None
        return cls(structure, refs, deferred)

    def fits(self, structure: Structure, objects: list[Any]) -> bool:
        return (
            structure is self.structure
            and len(objects) == len(self.objects)
            and all(ref() is o for ref, o in zip(self.objects, objects, strict=True))
        )


def plan_save(
    step: int, state: Any, metadata: dict[str, Any] | None, *, overlap: bool, live: Sequence[Any] = ()
) -> SavePlan:
    """:meth:`Planner.plan` without reuse: one save planned from scratch."""
    return Planner().plan(step, state, metadata, overlap=overlap, live=live)
