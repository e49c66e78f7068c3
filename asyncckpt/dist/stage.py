"""The training thread's half of a background multi-rank save: split, localize, plan, rebuild.

``AsyncCheckpointer`` in distributed mode stages a step like a single-file one, through the
same staging pool, stager and step guard: :class:`StepPlanner` splits the state (DCP's state dicts
of the modules and optimizers, and this rank's own values), replaces every DTensor (FSDP2,
tensor parallel) by its local shard, leaves out the replicated tensors other ranks write
(:mod:`asyncckpt.dist.share`) and flattens the result into a
:class:`~asyncckpt.saving.plan.SavePlan`. The local shards are then copied like plain tensors:
parameters and optimizer state while forward and backward run (the overlap rule), the rest
before ``save()`` returns; on CUDA into pinned buffers on a side stream. In the writer thread,
:func:`staged_state` waits for the copies and rebuilds DCP's state dict over the staged
buffers (each DTensor again, around its staged local shard), which
:func:`~asyncckpt.dist.save.write_step` then writes and commits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .. import format as fmt
from .._tree import unflatten
from ..format import check_step
from ..saving.fingerprint import Scan, StructureCache
from ..saving.overlap import modules_in, optimizers_in
from ..saving.plan import GuardPlan, SavePlan
from ..saving.snapshot import (
    Snapshot,
    StorageKey,
    flatten_metadata,
    gc_paused,
    storage_key,
)
from ..saving.staging import Staged, StagedCopy
from .dicts import StateDicts
from .layouts import LayoutCache, scan_split
from .save import Prepared
from .share import KeyPath, ReplicaShare, Replicated
from .state import SplitState, split_state


@dataclass(frozen=True)
class StepPlan:
    """One multi-rank save, planned: the flattened ``{"sharded": ..., "per_rank": ...}`` tree
    (DTensors replaced by their local shards) and the template that makes them DTensors again."""

    plan: SavePlan
    template: Any
    replicas: str | None = None  # the digest of the replicated tensors (see :mod:`.share`)


class _Spec:
    """Where a DTensor stood in the sharded tree: its spec (mesh, placements, global shape)."""

    __slots__ = ("spec",)

    def __init__(self, spec: Any) -> None:
        self.spec = spec


class StepPlanner:
    """Plans the multi-rank saves of one checkpointer, reusing what the last save decided while
    the state keeps its shape.

    ``share`` (this rank's share of the replicated tensors, see :mod:`asyncckpt.dist.share`)
    leaves out the replicated tensors other ranks write: never staged, never watched. DCP's
    state dicts of plain modules and optimizers are built from names learned once per
    structure (``dicts``, see :mod:`asyncckpt.dist.dicts`); the localized layout (local
    shards, share of the replicated tensors, template, structure) is reused while the split
    state's fingerprint matches (``layouts``, see :mod:`asyncckpt.dist.layouts`); a layout
    planned afresh reuses the flattened structure while the localized tree's fingerprint
    matches (``structures``, see :mod:`asyncckpt.saving.fingerprint`), and the blobs the step
    guard defers while that structure is the same object and the state holds the same
    optimizers and modules.
    """

    def __init__(self, share: ReplicaShare | None = None) -> None:
        self.share = share
        self.dicts = StateDicts()
        self.structures = StructureCache()
        self.layouts = LayoutCache()
        self._guard: GuardPlan | None = None

    def plan(self, step: int, state: Mapping[str, Any], metadata: Any, *, overlap: bool) -> StepPlan:
        """Split and flatten ``state`` for a multi-rank save; nothing is copied yet.

        Call it on the training thread. Raises what :func:`~asyncckpt.dist.state.split_state`
        and the flattening raise (:class:`asyncckpt.UsageError`,
        :class:`asyncckpt.UnsupportedValueError` naming the key path), before anything is staged.
        """
        check_step(step)
        # A burst of small objects (DCP's state dicts, the fingerprint): collections of the
        # trainer's many live objects would cost more than the work (see saving.snapshot.gc_paused).
        with gc_paused():
            split = split_state(state, self.dicts)
            scanned, reused = None, None
            if self.layouts.scanning():
                scanned = scan_split({"sharded": split.sharded, "per_rank": split.per_rank})
                reused = self.layouts.reuse(scanned)
            if reused is None:
                snapshot, template, replicas = self._lay_out(split, scanned)
            else:
                snapshot, layout = reused
                template, replicas = layout.template, layout.replicas
                if self.share is not None and layout.stats is not None:
                    self.share.stats = layout.stats
            metadata_tree = flatten_metadata(metadata)
            deferred = self._deferred(snapshot, state) if overlap else frozenset()
            plan = SavePlan(step, snapshot, metadata_tree, snapshot.layout_key(), deferred)
        return StepPlan(plan, template, replicas)

    def _lay_out(self, split: SplitState, scanned: Scan | None) -> tuple[Snapshot, Any, str | None]:
        """Localize ``split``, keep this rank's share of its replicated tensors and lay it out
        (the structure reused while the localized tree's fingerprint matches); remember how,
        for the next saves of the same split state (``scanned``: its fingerprint)."""
        shards: dict[_ViewKey, DTensor] = {}
        replicated: list[Replicated] = []
        local, template = localize(split.sharded, shards, replicated)
        replicas = self.share.keep_own(replicated) if self.share is not None else None
        localized = {"sharded": local, "per_rank": split.per_rank}
        snapshot, _ = self.structures.snapshot(localized)
        snapshot = _watch_dtensors(snapshot, shards)
        rescanned = scan_split(localized) if scanned is not None else None
        if rescanned is None or len(rescanned.found) != snapshot.structure.found:
            return snapshot, template, replicas  # (a layout kept before is compared, never trusted)
        # The same layout over the scan's own tensors (the snapshot's may be detached copies).
        planned = _watch_dtensors(Snapshot(snapshot.structure, rescanned.found, tree=snapshot.tree), shards)
        stats = self.share.stats if self.share is not None else None
        self.layouts.keep(scanned, planned, lambda t: shards.get(_view_key(t)), (template, replicas, stats))
        return snapshot, template, replicas

    def _deferred(self, snapshot: Snapshot, state: Mapping[str, Any]) -> frozenset[int]:
        """:func:`guarded_blobs`, reused while the structure and the objects are the same."""
        objects = [*optimizers_in(state), *modules_in(state)]
        last = self._guard
        if last is not None and last.fits(snapshot.structure, objects):
            return last.deferred
        optimizers = [o for o in objects if isinstance(o, torch.optim.Optimizer)]
        modules = [o for o in objects if isinstance(o, torch.nn.Module)]
        deferred = guarded_blobs(snapshot, optimizers, modules)
        self._guard = GuardPlan.of(snapshot.structure, objects, deferred)
        return deferred


def localize(
    tree: Any, shards: dict[_ViewKey, DTensor], replicated: list[Replicated] | None = None
) -> tuple[Any, Any]:
    """``tree`` with every DTensor replaced by its local tensor (its dicts and lists its own,
    every mapping a dict), and a template marking where the DTensors were (see :func:`rewrap`;
    None for a part without any); ``shards`` gets each local tensor's DTensor.

    ``replicated`` gets the plain tensors held by the new tree's dicts, in the order found (see
    :meth:`~asyncckpt.dist.share.ReplicaShare.keep_own`): tensors inside lists or tuples are
    not in it (removing one would shift its neighbours' names).
    """
    return _localize(tree, shards, replicated, ())


_PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})
_ATOMS = frozenset({str, int, float, bool, type(None)})  # left as they are, nothing inside


def _localize(
    tree: Any, shards: dict[_ViewKey, DTensor], replicated: list[Replicated] | None, path: KeyPath
) -> tuple[Any, Any]:
    # Exact types first: thousands of dicts, tensors and names go by without isinstance checks.
    if type(tree) is not dict and not (isinstance(tree, Mapping) and not isinstance(tree, torch.Tensor)):
        return _localize_other(tree, shards, replicated, path)
    values: dict[Any, Any] = {}
    marks: dict[Any, Any] | None = None
    for key, value in tree.items():
        kind = type(value)
        if kind in _ATOMS:
            values[key] = value
            continue
        if kind in _PLAIN_TENSORS or (isinstance(value, torch.Tensor) and not isinstance(value, DTensor)):
            values[key] = value
            if replicated is not None:
                replicated.append(Replicated(values, key, (*path, key), value.nbytes))
            continue
        values[key], mark = _localize(value, shards, replicated, (*path, key))
        if mark is not None:
            marks = {} if marks is None else marks
            marks[key] = mark
    return values, marks


def _localize_other(
    tree: Any, shards: dict[_ViewKey, DTensor], replicated: list[Replicated] | None, path: KeyPath
) -> tuple[Any, Any]:
    """:func:`_localize` of anything but a mapping: a DTensor, a list or tuple, or a leaf."""
    if isinstance(tree, DTensor):
        shard = tree._local_tensor.detach()
        shards[_view_key(shard)] = tree
        return shard, _Spec(tree._spec)
    if not isinstance(tree, list | tuple) or isinstance(tree, torch.Tensor):
        return tree, None
    values: list[Any] = []
    marks: list[Any] = []
    for index, value in enumerate(tree):
        if type(value) in _ATOMS or type(value) in _PLAIN_TENSORS:
            values.append(value)
            marks.append(None)
        else:
            item, mark = _localize(value, shards, replicated, (*path, index))
            values.append(item)
            marks.append(mark)
    if all(mark is None for mark in marks):
        return (tuple(values) if isinstance(tree, tuple) else values), None
    return (tuple(values), tuple(marks)) if isinstance(tree, tuple) else (values, marks)


def rewrap(template: Any, tree: Any) -> Any:
    """The inverse of :func:`localize` over a tree of the same shape (staged local tensors)."""
    if isinstance(template, _Spec):
        return DTensor(tree, template.spec, requires_grad=False)  # type: ignore[no-untyped-call]
    if isinstance(template, dict) and isinstance(tree, dict):
        return {key: rewrap(template.get(key), value) for key, value in tree.items()}
    if isinstance(template, list | tuple) and isinstance(tree, list | tuple):
        items = [rewrap(t, value) for t, value in zip(template, tree, strict=True)]
        return tuple(items) if isinstance(tree, tuple) else items
    return tree


_ViewKey = tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]


def _view_key(tensor: torch.Tensor) -> _ViewKey:
    return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def _watch_dtensors(snapshot: Snapshot, shards: dict[_ViewKey, DTensor]) -> Snapshot:
    """``snapshot`` with the blobs of local shards watched through their DTensors: an in-place
    op on a DTensor (``p.mul_(2)``) counts on the DTensor's version counter, not on its local
    tensor's."""
    if not shards:
        return snapshot
    watching = {}
    for blob in range(len(snapshot.structure.sizes)):
        views = snapshot.watched(blob)
        found = [shards.get(_view_key(view)) for view in views]
        if any(dt is not None for dt in found):
            watching[blob] = tuple(dt if dt is not None else v for dt, v in zip(found, views, strict=True))
    return Snapshot(snapshot.structure, snapshot.found, watching, tree=snapshot.tree)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def guarded_blobs(
    snapshot: Snapshot, optimizers: Sequence[torch.optim.Optimizer], modules: Sequence[torch.nn.Module]
) -> frozenset[int]:
    """The blobs only an optimizer step changes (see
    :func:`asyncckpt.saving.overlap.step_guarded_blobs`), with DTensors seen as their local
    shards: parameters of a module of the state that an optimizer steps, and optimizer state."""
    params: set[StorageKey | None] = set()
    state: set[StorageKey | None] = set()
    for optimizer in optimizers:
        try:  # a wrapper that is not a real Optimizer (no param_groups) guards nothing
            groups, per_param_states = list(optimizer.param_groups), list(optimizer.state.values())
        except (AttributeError, TypeError):
            continue
        for group in groups:
            params.update(storage_key(_local(param)) for param in group["params"])
        for per_param in per_param_states:
            if isinstance(per_param, Mapping):
                state.update(
                    storage_key(_local(v)) for v in per_param.values() if isinstance(v, torch.Tensor)
                )
    seen = {storage_key(_local(param)) for module in modules for param in module.parameters()}
    written = {
        storage_key(_local(sub.weight))
        for module in modules
        for sub in module.modules()
        if isinstance(sub, torch.nn.Embedding | torch.nn.EmbeddingBag) and sub.max_norm is not None
    }
    guarded = ((params & seen) | state) - written - {None}
    return frozenset(i for i, blob in enumerate(snapshot.blobs) if blob.storage in guarded)


def staged_state(
    staged: Staged, tree: Any, tensors: Sequence[fmt.TensorEntry], template: Any, metadata: Any
) -> Prepared:
    """DCP's state dict and the per-rank values over the staged buffers (in the writer thread).

    Waits for the background copies first; raises what they raised (a source changed in place
    before its copy, see :class:`~asyncckpt.saving.staging.StagingRaceError`).
    """
    staged.wait()
    assert isinstance(staged, StagedCopy)  # distributed mode refuses streamed staging (staging_budget)
    blobs = [_own_storage(view) for view in staged.buffers.blob_bytes()]
    rebuilt = unflatten(tree, [fmt.view_tensor(entry, blobs[entry.blob]) for entry in tensors])
    return Prepared(rewrap(template, rebuilt["sharded"]), rebuilt["per_rank"], metadata)


def _own_storage(view: memoryview) -> torch.Tensor:
    """A 1-D uint8 tensor over ``view`` with a storage of its own: tensors of different blobs
    must not look like views of one storage (flattening would join them into one span)."""
    if not len(view):
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(view, dtype=torch.uint8)
