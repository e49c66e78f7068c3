"""The header check's one-pass path for the usual tensor row agrees with the field-by-field check:
every row it accepts, the full check accepts with the same entry; every row the full check
refuses, it leaves to the full check (which says precisely what is wrong)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt import format as fmt
from asyncckpt.errors import CorruptedCheckpointError
from asyncckpt.format import spec
from asyncckpt.format.decode import _HeaderChecker
from asyncckpt.format.rows import usual_tensor

MAX = fmt.MAX_INDEX
BLOBS = (fmt.BlobEntry(4096, 1024, 0), fmt.BlobEntry(8192, 0, 0))
SIZES = [blob.nbytes for blob in BLOBS]


def checked(row: Any) -> fmt.TensorEntry | None:
    """The full check's answer: the entry, or None when it refuses the row."""
    checker = _HeaderChecker({}, "1.0", 1 << 20, 2 << 20, "mem")
    try:
        return checker.tensor(0, row, BLOBS)
    except CorruptedCheckpointError:
        return None


@pytest.mark.parametrize(
    "row",
    [
        ["w", "float32", [4, 8], [8, 1], 0, 0],
        ["w", "float32", [], [], 0, 1020],
        ["w", "bfloat16", [0, 3], [3, 1], 1, 0],  # empty: fits an empty blob
        ["w", "float64", [2, 2], [0, 0], 0, 8],  # stride 0
        ["w", "float32", [256], [1], 0, 0],  # exactly the blob
        ["w", "float32", [257], [1], 0, 0],  # one element too many
        ["w", "float32", [4], [1], 0, 2],  # misaligned
        ["w", "float32", [4], [1], 2, 0],  # no such blob
        ["w", "float32", [4], [1], -1, 0],
        ["w", "float32", [4], [1], 0, -4],
        ["w", "float32", [True], [1], 0, 0],  # a bool is no int
        ["w", "float32", [1.0], [1], 0, 0],
        ["w", "float32", [4], [1, 1], 0, 0],
        ["w", "float32", [4], (1,), 0, 0],
        ["w", "complex32", [4], [1], 0, 0],  # unknown dtype
        [b"w", "float32", [4], [1], 0, 0],
        ["w", ["float32"], [4], [1], 0, 0],  # unhashable dtype field
        ["w", "float32", [4], [1], False, 0],
        ["w", "float32", [4], [1], 0],
        ("w", "float32", [4], [1], 0, 0),
        ["w", "uint8", [2**62, 2**62, 0], [1, 1, 1], 0, 0],
        ["w", "uint8", [2, 0], [2**63 - 1, 1], 0, 0],
        ["w", "uint8", [MAX + 1, 0], [1, 1], 0, 0],
        ["w", "uint8", [1] * (spec.MAX_NDIM + 1), [1] * (spec.MAX_NDIM + 1), 0, 0],
    ],
)
def test_the_one_pass_path_agrees_with_the_full_check(row: Any) -> None:
    fast = usual_tensor(row, SIZES)
    assert fast is None or fast == checked(row)
    if checked(row) is None:
        assert fast is None


def test_the_usual_rows_take_the_one_pass_path() -> None:
    entry = usual_tensor(["model.w", "float32", [4, 8], [8, 1], 0, 0], SIZES)
    assert entry == fmt.TensorEntry("model.w", torch.float32, (4, 8), (8, 1), 0, 0)


def test_limits_are_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    row = ["w", "uint8", [4, 4], [4, 1], 0, 0]
    assert usual_tensor(row, SIZES) is not None
    monkeypatch.setattr(spec, "MAX_NDIM", 1)
    assert usual_tensor(row, SIZES) is None and checked(row) is None


numbers = st.one_of(
    st.integers(-2, 5), st.integers(0, 2**64), st.sampled_from([True, 1.0, None, MAX, MAX + 1])
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(numbers, max_size=4),
    st.lists(numbers, max_size=4),
    st.sampled_from(["float32", "uint8", "bool", "float64", "nope"]),
    numbers,
    numbers,
)
def test_random_rows_agree(shape: list[Any], stride: list[Any], dtype: str, blob: Any, offset: Any) -> None:
    row = ["k", dtype, shape, stride, blob, offset]
    fast = usual_tensor(row, SIZES)
    full = checked(row)
    assert fast == full or (fast is None and full is not None)
