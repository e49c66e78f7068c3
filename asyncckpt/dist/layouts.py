"""The last multi-rank save's layout, reused while the split state keeps its shape.

Planning a multi-rank save (:class:`~asyncckpt.dist.stage.StepPlanner`) localizes the split
state (a new tree, every DTensor replaced by its local shard), leaves out the replicated tensors
other ranks write (:mod:`asyncckpt.dist.share`) and lays the rest out. At 10,000 tensors that is
tens of milliseconds on the training thread, and tens of thousands of new dicts, tuples and
records per save, which the garbage collector then scans. Everything it decides follows from
the split state's shape, so :class:`LayoutCache` keeps it: it fingerprints the split state with
the single-process save's scanner (:mod:`asyncckpt.saving.fingerprint`: container kinds and
keys, plain values, per tensor its type, dtype, shape, strides, offset, data pointer, device,
grad flag), a DTensor by its local tensor's fields, its type and its spec (mesh, placements,
global shape and strides). While the fingerprint equals the last save's, the new snapshot is
the cached structure over this save's tensors, taken from the scan by position (a DTensor's
local shard for a DTensor); the template, the share of the replicated tensors and its digest
are the cached ones.

Equal fingerprints mean equal plans: the localized tree's shape follows from the split tree's
and from where its DTensors are; which replicated tensors this rank keeps, from their key paths
and sizes; the layout, from the localized tree and its tensors' fields. Nothing is cached for a
state the scanner does not cover (the full path runs every time then).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.distributed.tensor import DTensor

from ..saving.fingerprint import _INTS, Scan, _fields, _Scanner, _Token, _Unscannable, reusable
from ..saving.snapshot import Snapshot, Structure
from ..saving.walker import StateDicts
from .share import ShareStats


@dataclass(frozen=True)
class Layout:
    """What one save's plan decided, by the positions of the split state's scan.

    ``positions``: per tensor of the snapshot, its position in the scan; ``shards``: the
    snapshot's tensors that are a DTensor's local shard; ``watching``: per blob watched through
    DTensors, the scan's positions of the tensors whose version counters speak for it.
    """

    signature: list[Any]
    structure: Structure
    positions: list[int]
    shards: list[int]
    watching: dict[int, tuple[int, ...]]
    template: Any
    replicas: str | None
    stats: ShareStats | None
    tree: Any  # the skeleton of the save it was planned from (its numbers, not the structure's)


REST = 7  # saves planned without a fingerprint after the state changed on two saves in a row


class LayoutCache:
    """The layout of the last save, reused while the split state's fingerprint matches (see
    the module docstring). ``hits`` and ``misses`` count the saves that reused it or not,
    ``skipped`` those planned without a fingerprint (see :meth:`scanning`)."""

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.skipped = 0
        self._last: Layout | None = None
        self._changed = 0  # saves in a row whose fingerprint differed from the last layout's
        self._resting = 0

    def scanning(self) -> bool:
        """Whether this save should fingerprint its split state. A state whose plain values
        change on every save (an RNG state among them) never reuses a layout; after two such
        saves in a row the next :data:`REST` saves plan without one (the fingerprint costs
        about as much as it saves), then one tries again."""
        if self._resting:
            self._resting -= 1
            self.skipped += 1
            return False
        return True

    def reuse(self, scanned: Scan | None) -> tuple[Snapshot, Layout] | None:
        """The snapshot of the save ``scanned`` and the layout it reuses; None (a miss) when
        there is no layout for it."""
        last = self._last
        if scanned is None or last is None or scanned.signature != last.signature:
            self.misses += 1
            if scanned is not None and last is not None:
                self._changed += 1
                self._resting = REST if self._changed >= 2 else 0
            return None
        self.hits += 1
        self._changed = 0
        found = scanned.found
        tensors = list(map(found.__getitem__, last.positions))
        for index in last.shards:  # detached as localize does, unless nothing is to detach
            local = cast(DTensor, tensors[index])._local_tensor
            tensors[index] = local.detach() if local.requires_grad else local
        watching = {blob: tuple(map(found.__getitem__, ps)) for blob, ps in last.watching.items()}
        return Snapshot(last.structure, tensors, watching, tree=last.tree), last

    def keep(
        self,
        scanned: Scan | None,
        planned: Snapshot,
        shard_of: Callable[[torch.Tensor], DTensor | None],
        decided: tuple[Any, str | None, ShareStats | None],
    ) -> None:
        """Remember how the save ``scanned`` was planned, or forget the last layout when it
        cannot be reused. ``planned``: its snapshot over the tensors a scan of the localized
        tree found (plain tensors the split state's own, local shards of its DTensors);
        ``shard_of``: the DTensor a tensor is the local shard of; ``decided``: the template, the
        replicas' digest and the share's figures."""
        self._last = None
        if scanned is None or not reusable(scanned):
            return
        position: dict[int, int] = {}
        for index, tensor in reversed(list(enumerate(scanned.found))):
            position[id(tensor)] = index  # the first place a tensor stands

        def at(tensor: torch.Tensor) -> int | None:
            found = position.get(id(tensor))
            if found is not None:
                return found
            dtensor = shard_of(tensor)
            return None if dtensor is None else position.get(id(dtensor))

        positions = _all_found(planned.found, at)
        watching = {}
        for blob, tensors in planned.watching.items():
            watched = _all_found(tensors, at)
            if watched is None:
                return
            watching[blob] = tuple(watched)
        if positions is None:
            return
        shards = [i for i, tensor in enumerate(planned.found) if id(tensor) not in position]
        template, replicas, stats = decided
        self._last = Layout(
            scanned.signature,
            planned.structure,
            positions,
            shards,
            watching,
            template,
            replicas,
            stats,
            planned.tree,
        )


def _all_found(tensors: Sequence[torch.Tensor], at: Callable[[torch.Tensor], int | None]) -> list[int] | None:
    """The position of each of ``tensors`` (see :meth:`LayoutCache.keep`), or None if one has
    none."""
    positions = []
    for tensor in tensors:
        found = at(tensor)
        if found is None:
            return None
        positions.append(found)
    return positions


def scan_split(tree: Any) -> Scan | None:
    """The fingerprint of a split state's tree (``{"sharded": ..., "per_rank": ...}``) and its
    tensors in the order found, DTensors as they are; None when the scanner does not cover it."""
    scanner = _SplitScanner(StateDicts())
    try:
        scanner.visit(tree, 0, False)
        return scanner.finish()
    except _Unscannable:
        return None


class _SplitScanner(_Scanner):
    """The single-process save's scanner, with a DTensor fingerprinted by its local tensor's
    fields, its type and its spec (a DTensor has no storage of its own: its data pointer is 0).
    Numbers stay in the signature: a reused layout holds its state's values."""

    def number(self, kind: _Token, value: int | bytes) -> None:
        self.signature += (kind, value)

    def ints(self, values: tuple[int, ...]) -> None:
        self.signature += (_INTS, values)

    def finish(self) -> Scan:
        """The fingerprint with the tensors' fields appended (the base scanner leaves them out:
        the single-process save checks them apart)."""
        found = self.found
        try:
            fields = list(map(_tensor_fields, found))
        except Exception:  # a tensor without strides or storage (sparse, a wrapper subclass)
            raise _Unscannable from None
        self.signature.append(fields)
        return Scan(self.signature, found, self.objects, [])


def _tensor_fields(tensor: torch.Tensor) -> tuple[Any, ...]:
    if isinstance(tensor, DTensor):
        return (*_fields(tensor._local_tensor), type(tensor), tensor._spec)
    return _fields(tensor)
