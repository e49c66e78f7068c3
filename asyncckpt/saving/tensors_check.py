"""Whether this save's tensors still have the fields the last save's layout was made from.

A cached structure (:mod:`asyncckpt.saving.fingerprint`) is reused only while every tensor has
the same type, dtype, shape, strides, storage offset, data pointer, device, layout,
requires-grad and conjugate and negative bits. Reading those fields into Python tuples costs a
cache miss or more per field group on tensors the writer has just pushed out of the caches;
:class:`TensorsCheck` compares them without building a tuple: torch's ``TensorGuards`` (the C++
check ``torch.compile`` runs on its graphs' inputs) compares type, dispatch keys (device type,
layout, the conjugate and negative bits), dtype, device index, requires-grad, shape and strides
in one call, and the storage offsets and data pointers are compared as lists. The tensors are
visited a chunk at a time, all passes over one chunk before the next, so that the misses are
taken once per tensor, not once per pass; the version counters the staging step watches
(:meth:`~asyncckpt.saving.staging.StagedCopy.watch_one_each`) are read in the same visit.
"""

from __future__ import annotations

from typing import Any

import torch

_CHUNK = 256  # tensors per visit: their metadata stays in the caches between the passes
_OFFSET = torch.Tensor.storage_offset
_POINTER = torch.Tensor.data_ptr
_VERSION = torch.Tensor._version.__get__  # type: ignore[attr-defined]


def _tensor_guards() -> Any:
    """torch's ``TensorGuards`` (private to torch), or None: every save then reads the fields."""
    try:
        from torch._C._dynamo.guards import TensorGuards
    except ImportError:  # pragma: no cover - present in every torch this package supports
        return None
    return TensorGuards


_TensorGuards: Any = _tensor_guards()


class TensorsCheck:
    """Compares a list of tensors with the fields of the list it was made from (see the module
    docstring). A pass means equal fields; a failure means only that the fields must be read
    and compared one by one (a dispatch key that the thread's mode adds or hides differs too,
    e.g. under ``torch.inference_mode()``). Holds no reference to the tensors.
    """

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._count = len(tensors)
        # torch's guards fail a list that holds one tensor twice: such a list is checked as
        # its first occurrences, and each later one must be the same object again.
        first: dict[int, int] = {}
        pairs = [(j, first.setdefault(id(t), j)) for j, t in enumerate(tensors)]
        self._aliases = [(j, i) for j, i in pairs if i != j]  # (position, first position)
        self._distinct = sorted(first.values()) if self._aliases else None
        checked = tensors if self._distinct is None else list(map(tensors.__getitem__, self._distinct))
        self._chunks = [
            (
                _TensorGuards(*chunk, dynamic_dims_sizes=None, dynamic_dims_strides=None),
                list(map(_OFFSET, chunk)),
                list(map(_POINTER, chunk)),
            )
            for chunk in _chunked(checked)
        ]

    @classmethod
    def of(cls, tensors: list[torch.Tensor]) -> TensorsCheck | None:
        """A check made from ``tensors``; None where torch offers no ``TensorGuards`` or a
        tensor has no strides or storage."""
        if _TensorGuards is None:
            return None
        try:
            return cls(tensors)
        except Exception:  # a tensor the guards or data_ptr() cannot describe
            return None

    def versions(self, tensors: list[torch.Tensor]) -> list[int] | None:
        """The version counters of ``tensors`` when they have the fields of the tensors this
        check was made from; None when they do not (or may not)."""
        if len(tensors) != self._count:
            return None
        distinct = self._distinct
        if distinct is not None:
            if any(tensors[j] is not tensors[i] for j, i in self._aliases):
                return None
            tensors = list(map(tensors.__getitem__, distinct))
        versions: list[int] = []
        try:
            for (guards, offsets, pointers), chunk in zip(self._chunks, _chunked(tensors), strict=True):
                if not (
                    guards.check(*chunk)
                    and list(map(_OFFSET, chunk)) == offsets
                    and list(map(_POINTER, chunk)) == pointers
                ):
                    return None
                versions += map(_VERSION, chunk)
        except Exception:  # a tensor without storage: the fields decide
            return None
        if distinct is None:
            return versions
        every = [0] * self._count
        for position, version in zip(distinct, versions, strict=True):
            every[position] = version
        for j, i in self._aliases:
            every[j] = every[i]
        return every

    def matches(self, tensors: list[torch.Tensor]) -> bool:
        """Whether ``tensors`` have the fields of the tensors this check was made from."""
        return self.versions(tensors) is not None


def _chunked(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    return [tensors[i : i + _CHUNK] for i in range(0, len(tensors), _CHUNK)]
