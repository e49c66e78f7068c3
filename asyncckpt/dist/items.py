"""DCP's write items of each tensor, kept from one save to the next while the tensor's shape does not change.

DCP plans every save afresh: for each DTensor it computes the local shard's size and global
offset from the device mesh and placements and calls ``to_local()`` for its properties (about
100 us a tensor: a fifth of a 10,000-tensor save). :class:`WriteItems` keeps the items of each
tensor keyed by everything they are computed from (its key, the DTensor's spec: mesh,
placements, global shape and stride, dtype; the local tensor's dtype, layout, ``requires_grad``,
pinning), and hands them to DCP's planning through the ``__create_write_items__`` protocol DTensor
itself uses. A tensor whose key changed is planned afresh; nothing else is kept.
"""

from __future__ import annotations

import threading
from typing import Any

from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.tensor import DTensor

# DCP plans an object with this method by calling it (DTensor's own protocol, torch >= 2.5);
# without it the items are not kept and DCP plans every tensor itself.
SUPPORTED = hasattr(DTensor, "__create_write_items__")


class _Planned:
    """Stands for a tensor during DCP's local planning: its kept write items."""

    __slots__ = ("asked", "items")

    def __init__(self, items: list[WriteItem]) -> None:
        self.items = items
        self.asked = False

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        self.asked = True
        return list(self.items)


class WriteItems:
    """The write items of the last save's DTensors, by the key of what they are computed from.

    Thread-safe (one save at a time uses it; the lock only guards the swap of the table).
    ``hits`` and ``misses`` count the tensors of the last :meth:`stand_ins`.
    """

    def __init__(self) -> None:
        self._items: dict[tuple[Any, ...], list[WriteItem]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def stand_ins(self, state_dict: dict[str, Any]) -> tuple[dict[str, Any], list[_Planned]]:
        """``state_dict`` (flat, as DCP's planner holds it) with each DTensor replaced by its
        kept items (planned now when not kept: the same call DCP makes), and the stand-ins."""
        with self._lock:
            kept = self._items
        table: dict[tuple[Any, ...], list[WriteItem]] = {}
        planned: list[_Planned] = []
        result: dict[str, Any] = {}
        hits = 0
        for fqn, obj in state_dict.items():
            if type(obj) is not DTensor:
                result[fqn] = obj
                continue
            key = _key(fqn, obj)
            items = kept.get(key)
            if items is None:
                items = _plan(fqn, obj)
            else:
                hits += 1
            table[key] = items
            stand_in = _Planned(items)
            planned.append(stand_in)
            result[fqn] = stand_in
        with self._lock:
            self._items = table
        self.hits, self.misses = hits, len(planned) - hits
        return result, planned


def _key(fqn: str, tensor: DTensor) -> tuple[Any, ...]:
    local = tensor._local_tensor
    return (fqn, tensor._spec, local.dtype, local.layout, local.requires_grad, local.is_pinned())


def _plan(fqn: str, tensor: DTensor) -> list[WriteItem]:
    """What DCP's local planning makes of ``tensor`` (nothing on a rank outside its mesh)."""
    if tensor.device_mesh.get_coordinate() is None:
        return []
    items: list[WriteItem] = tensor.__create_write_items__(fqn, tensor)
    return items
