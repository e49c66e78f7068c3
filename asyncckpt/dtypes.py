"""The tensor dtypes the format stores, by their stable names."""

from __future__ import annotations

import torch

# Every dtype whose bytes can be copied as a whole number of bytes per element. Sub-byte
# integer types (int1..int7, uint1..uint7) and quantized types have no byte-exact copy kernel
# and are refused at save time. Names are the format's: never rename one.
_NAMES = (
    "bool",
    "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64",
    "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
)  # fmt: skip

DTYPE_BY_NAME: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in _NAMES if isinstance(getattr(torch, name, None), torch.dtype)
}
NAME_BY_DTYPE: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPE_BY_NAME.items()}


def dtype_name(dtype: torch.dtype) -> str | None:
    """The format's name for ``dtype``, or None when the format cannot store it."""
    return NAME_BY_DTYPE.get(dtype)


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return int(dtype.itemsize)
