"""The usual tensor row of a header, checked in one pass (the reader's hot loop).

:mod:`.decode` checks every row of the tensor table; a row as writers write it is accepted here
with every check inlined, and anything else goes to the checker's field-by-field path, which
says precisely what is wrong.
"""

from __future__ import annotations

from typing import Any

from ..dtypes import DTYPE_BY_NAME, itemsize
from . import spec
from .spec import TensorEntry

_DTYPES = {name: (dtype, itemsize(dtype)) for name, dtype in DTYPE_BY_NAME.items()}


def usual_tensor(row: Any, sizes: list[int]) -> TensorEntry | None:
    """The entry of a tensor row that passes every check of ``decode._HeaderChecker.tensor`` (and of
    ``spec.tensor_size_problem``), in one pass; None for any other row, which the checker then
    refuses with the precise error. Runs once per tensor of every file read."""
    if type(row) is not list or len(row) != 6:
        return None
    key, dtype_text, shape, stride, blob, offset = row
    kind = _DTYPES.get(dtype_text) if type(dtype_text) is str else None
    if not (
        kind is not None
        and type(key) is str
        and type(shape) is list
        and type(stride) is list
        and len(shape) == len(stride) <= spec.MAX_NDIM
        and type(blob) is int
        and type(offset) is int
        and 0 <= blob < len(sizes)
        and offset >= 0
        and not offset % kind[1]
    ):
        return None
    dtype, size = kind
    limit = spec.MAX_INDEX
    elements, span, empty = size, 1, False
    for n, step in zip(shape, stride, strict=True):
        if type(n) is not int or type(step) is not int or not (0 <= n <= limit and 0 <= step <= limit):
            return None
        if n:
            elements *= n
            span += (n - 1) * step
        else:
            empty = True
    extent = 0 if empty else span * size
    if elements > limit or span * size > limit or offset + extent > sizes[blob]:
        return None
    return TensorEntry(key, dtype, tuple(shape), tuple(stride), blob, offset)
