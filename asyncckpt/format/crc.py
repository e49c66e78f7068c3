"""CRC32C of concatenated pieces: ``crc32c(a + b)`` from ``crc32c(a)``, ``crc32c(b)`` and ``len(b)``.

Lets a blob read in parallel ranges be checked piece by piece, in whatever order the pieces
arrive, without a second pass over its bytes (zlib's ``crc32_combine``, for the Castagnoli
polynomial). The operator for ``n`` zero bytes is built once per ``n`` and cached; a combine is
then 32 XORs at most.
"""

from __future__ import annotations

import functools

_POLY = 0x82F63B78  # CRC32C (Castagnoli), reflected
_Matrix = tuple[int, ...]  # 32 columns of a GF(2) 32x32 matrix


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC32C of ``a + b`` given ``crc1 = crc32c(a)``, ``crc2 = crc32c(b)``, ``len2 = len(b)``."""
    if len2 == 0:
        return crc1
    if crc1 == 0:  # the operator is linear: zero in, zero out (and building it costs ~1 ms)
        return crc2
    return _times(_zeros(len2), crc1) ^ crc2


def _times(matrix: _Matrix, vector: int) -> int:
    total = 0
    column = 0
    while vector:
        if vector & 1:
            total ^= matrix[column]
        vector >>= 1
        column += 1
    return total


def _square(matrix: _Matrix) -> _Matrix:
    return tuple(_times(matrix, matrix[n]) for n in range(32))


def _product(a: _Matrix, b: _Matrix) -> _Matrix:
    """``a`` applied after ``b``."""
    return tuple(_times(a, b[n]) for n in range(32))


@functools.lru_cache(maxsize=64)
def _zeros(nbytes: int) -> _Matrix:
    """The operator that appends ``nbytes`` zero bytes to a CRC's register."""
    power: _Matrix = (_POLY, *(1 << n for n in range(31)))  # one zero bit
    for _ in range(3):  # one zero byte: eight zero bits
        power = _square(power)
    result: _Matrix | None = None
    while nbytes:
        if nbytes & 1:
            result = power if result is None else _product(power, result)
        nbytes >>= 1
        if nbytes:
            power = _square(power)
    assert result is not None
    return result
