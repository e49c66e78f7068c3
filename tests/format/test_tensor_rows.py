"""Tensor rows whose element count, extent or byte size overflows are refused by the header check.

torch multiplies every dimension of a shape (``numel``), even when one of them is 0, and adds up
``stride * (size - 1)`` for the storage a view needs; either overflowing int64 made the reader
fail with a raw ``RuntimeError`` after the header check had passed (a shape ``[2**62, 2**62, 0]``
was "valid"). Every row must either load or be refused with ``CorruptedCheckpointError``.
"""

from __future__ import annotations

import io
import math
import random
from collections import Counter
from typing import Any

import crc32c
import pytest
import torch
from spec_files import build_file, header_fields

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt.dtypes import DTYPE_BY_NAME
from asyncckpt.errors import StateTooLargeError

MAX = fmt.MAX_INDEX
DTYPES = sorted(DTYPE_BY_NAME)
BLOB = bytes(range(256)) * 4  # one 1024-byte blob
COPYABLE = {"bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"}


def load_row(row: list[Any], data: bytes = BLOB) -> torch.Tensor:
    """Write a file whose only tensor is ``row``, read its layout and view the tensor."""
    raw = build_file(header_fields(tensors=[row], blobs=[[4096, len(data), crc(data)]]), data)
    layout = fmt.read_layout(io.BytesIO(raw), "mem")
    blob = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return fmt.view_tensor(layout.tensors[0], blob)


def crc(data: bytes) -> int:
    return int(crc32c.crc32c(data))


@pytest.mark.parametrize(
    ("shape", "stride", "dtype"),
    [
        ([2**62, 2**62, 0], [1, 1, 1], "float32"),  # the review's file: numel overflows before the 0
        ([0, 2**62, 2**62], [1, 1, 1], "float32"),  # torch's order would not overflow; refused anyway
        ([2**62, 0, 2**62], [0, 0, 0], "uint8"),
        ([2**61], [0], "float32"),  # 2**61 elements of 4 bytes: 2**63 bytes
        ([2**60, 8], [0, 0], "uint8"),  # 2**63 elements
        ([3, 2**62], [0, 0], "uint8"),
        ([2, 0], [2**63 - 1, 1], "uint8"),  # empty, but the declared span is 2**63 - 1 + 1 bytes
        ([2**32, 0, 2**32], [2**31, 1, 2**31], "float64"),
    ],
)
def test_overflowing_rows_are_refused_with_key_and_tensor(
    shape: list[int], stride: list[int], dtype: str
) -> None:
    with pytest.raises(asyncckpt.CorruptedCheckpointError) as caught:
        load_row(["model.w", dtype, shape, stride, 0, 0])

    error = caught.value
    assert error.key == "model.w"
    assert error.reason.startswith("bad header: tensor 0 (model.w) ")
    assert f"beyond {MAX}" in error.reason


def test_the_reviewed_file_is_refused_by_load_and_validate(tmp_dir: Any) -> None:
    path = tmp_dir / "step-0000000001.ckpt"
    row = ["w", "float32", [2**62, 2**62, 0], [1, 1, 1], 0, 0]
    path.write_bytes(build_file(header_fields(tensors=[row], step=1)))

    with pytest.raises(asyncckpt.CorruptedCheckpointError, match="beyond"):
        asyncckpt.load(path)
    with pytest.raises(asyncckpt.CorruptedCheckpointError, match="beyond"), open(path, "rb") as file:
        fmt.read_layout(file, str(path))  # what validate runs


@pytest.mark.parametrize(
    ("shape", "stride", "dtype"),
    [
        ([2**31, 2**31], [0, 0], "float16"),  # 2**62 elements of 2 bytes: 2**63 bytes
        ([2**61 - 1], [0], "float32"),  # just below 2**63 bytes
        ([0, 2**40], [1, 1], "float32"),
        ([0], [MAX], "uint8"),
        ([1, 1], [MAX, MAX], "complex128"),  # a size-1 dimension adds nothing to the span
        ([4, 0, 3], [0, 5, 1], "int64"),
        ([], [], "float64"),
    ],
)
def test_large_but_representable_rows_still_load(shape: list[int], stride: list[int], dtype: str) -> None:
    if math.prod(shape) * DTYPE_BY_NAME[dtype].itemsize == 2**63:
        with pytest.raises(asyncckpt.CorruptedCheckpointError):
            load_row(["w", dtype, shape, stride, 0, 0])
        return
    tensor = load_row(["w", dtype, shape, stride, 0, 0])
    assert list(tensor.shape) == shape and list(tensor.stride()) == stride
    assert tensor.dtype == DTYPE_BY_NAME[dtype]


def test_the_writer_refuses_rows_readers_refuse() -> None:
    tensors = [fmt.TensorEntry("model.big", torch.float32, (2**61,), (0,), 0, 0)]
    sink = io.BytesIO()
    with pytest.raises(StateTooLargeError) as caught:
        fmt.write_checkpoint(
            sink, step=1, metadata={}, tree=[fmt.TensorRef(0)], tensors=tensors, sizes=[4], blobs=[]
        )
    assert caught.value.key == "model.big" and f"beyond {MAX}" in caught.value.reason
    assert sink.getvalue() == b""


# --------------------------------------------------------------------------- fuzz: 20,000 rows

EDGES = [0, 1, 2, 3, 7, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32, 2**40, 2**53, 2**61, 2**62, 2**63 - 1]


def random_dim(rng: random.Random) -> int:
    pick = rng.random()
    if pick < 0.35:
        return rng.randrange(0, 5)
    if pick < 0.75:
        return rng.choice(EDGES)
    return rng.randrange(0, 2 ** rng.randrange(1, 64))


def random_row(rng: random.Random) -> list[Any]:
    ndim = rng.choice([0, 1, 1, 2, 2, 3, 3, 4, 5, 8, rng.randrange(0, fmt.MAX_NDIM + 1)])
    shape = [random_dim(rng) for _ in range(ndim)]
    stride = [random_dim(rng) for _ in range(ndim)]
    dtype = rng.choice(DTYPES)
    offset = (
        rng.choice([0, 0, 0, 8, 16, 1024]) // DTYPE_BY_NAME[dtype].itemsize * DTYPE_BY_NAME[dtype].itemsize
    )
    return ["fuzz.t", dtype, shape, stride, 0, offset]


def test_fuzz_twenty_thousand_rows_load_or_are_refused() -> None:
    rng = random.Random(20_000)
    outcomes: Counter[str] = Counter()
    for _ in range(20_000):
        row = random_row(rng)
        try:
            tensor = load_row(row)
        except asyncckpt.CorruptedCheckpointError as exc:
            assert exc.key == "fuzz.t", row
            outcomes["refused"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"row {row!r} raised {type(exc).__name__}: {exc}") from exc
        _, dtype, shape, stride, _, offset = row
        size = DTYPE_BY_NAME[dtype].itemsize
        assert list(tensor.shape) == shape and list(tensor.stride()) == stride, row
        assert tensor.numel() == math.prod(shape) and tensor.nbytes == tensor.numel() * size, row
        assert tensor.nbytes <= MAX, row
        if 0 < tensor.numel() <= 4096 and dtype in COPYABLE:  # touch every element: inside the blob
            assert tensor.contiguous().nbytes == tensor.nbytes, row
        outcomes["loaded"] += 1
    assert outcomes["loaded"] > 2_000 and outcomes["refused"] > 2_000, outcomes
