"""What ``inspect`` shows of a legacy ``torch.save`` file: its unpickled state as a tree of plain
values and tensor references, whatever it holds.

Unlike a save, nothing is refused: a tensor of any kind (sparse, nested, quantized) gets a row of
the tensor table, a dict key that is neither text nor an int and a value the v1 format has no
word for (a set, a complex number) are shown as their ``repr``, and levels deeper than
:data:`MAX_DEPTH` are summarised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import format as fmt
from .._tree import dotted_key
from ..dtypes import dtype_name

MAX_DEPTH = 64  # deeper levels of a legacy state are shown as one note
PLAIN = (type(None), bool, int, float, str, bytes)


@dataclass(frozen=True)
class Shown:
    """A value (or dict key) shown as text: its ``repr`` and its type's name."""

    text: str
    type: str

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text


Row = tuple[str, str, tuple[int, ...], int]  # key path, dtype (and layout when not dense), shape, bytes


def describe(state: Any) -> tuple[list[Row], Any]:
    """The tensor rows and the shown tree (tensors as :class:`~asyncckpt.format.TensorRef`).

    A tensor whose layout is not dense shows 0 bytes (and a nested one no shape)."""
    rows: list[Row] = []
    return rows, _node(state, (), rows)


def _node(value: Any, path: tuple[Any, ...], rows: list[Row]) -> Any:
    if isinstance(value, torch.Tensor):
        rows.append(_row(dotted_key(path), value))
        return fmt.TensorRef(len(rows) - 1)
    if isinstance(value, PLAIN):
        return value
    if len(path) >= MAX_DEPTH and isinstance(value, Mapping | list | tuple):
        return Shown(f"<{type(value).__name__} nested deeper than {MAX_DEPTH} levels>", type(value).__name__)
    if isinstance(value, Mapping):
        return {_key(k): _node(v, (*path, k), rows) for k, v in value.items()}
    if isinstance(value, list):
        return [_node(v, (*path, i), rows) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_node(v, (*path, i), rows) for i, v in enumerate(value))
    return Shown(_repr(value), type(value).__name__)


def _key(key: Any) -> Any:
    if isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool)):
        return key
    return Shown(_repr(key), type(key).__name__)


def _repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception as exc:  # a repr that fails is still shown
        return f"<{type(value).__name__}: repr failed: {type(exc).__name__}>"


def _row(key: str, tensor: torch.Tensor) -> Row:
    dtype = dtype_name(tensor.dtype) or str(tensor.dtype).removeprefix("torch.")
    if tensor.is_nested:
        return (key, f"{dtype} (nested)", (), 0)
    if tensor.layout != torch.strided:
        return (key, f"{dtype} ({str(tensor.layout).removeprefix('torch.')})", tuple(tensor.shape), 0)
    return (key, dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size())
