"""Truncation and bit flips anywhere in a v1 file: refused with CorruptedCheckpointError (or
UnsupportedVersionError when a flip lands in the version field), never another exception and
never wrong data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spec_files import checksummed_ranges

import asyncckpt

SameState = Callable[[Any, Any], None]
FIXTURE_OK = [HealthCheck.function_scoped_fixture]


def test_every_truncation_is_refused(small_file: tuple[Path, dict[str, Any]]) -> None:
    path, _ = small_file
    size = path.stat().st_size
    assert size > 8192  # the file spans two blobs
    outcomes = set()
    for length in range(size - 1, -1, -1):
        os.truncate(path, length)
        with pytest.raises(asyncckpt.CorruptedCheckpointError) as caught:
            asyncckpt.load(path)
        assert type(caught.value) is asyncckpt.CorruptedCheckpointError
        message = str(caught.value)
        assert message.startswith(f"{path}: "), message
        outcomes.add(message.split(": ", 1)[1].split(" ")[0])
    assert outcomes == {"truncated:", "truncated"}, outcomes


def flip_outcome(path: Path, position: int, bit: int, original: bytes) -> Any:
    """Flip one bit of the file at ``path``, load it, restore the byte; the state or the error."""
    with open(path, "r+b") as file:
        file.seek(position)
        file.write(bytes([original[position] ^ (1 << bit)]))
    try:
        return asyncckpt.load(path).state
    except asyncckpt.CheckpointError as exc:
        return exc
    finally:
        with open(path, "r+b") as file:
            file.seek(position)
            file.write(original[position : position + 1])


def check_flip(
    path: Path, position: int, bit: int, original: bytes, state: Any, covered: list[range]
) -> None:
    outcome = flip_outcome(path, position, bit, original)
    where = f"bit {bit} of byte {position}"
    if any(position in span for span in covered):
        allowed: tuple[type[Exception], ...] = (asyncckpt.CorruptedCheckpointError,)
        if 8 <= position < 24:  # the version field: "1.0" may become "3.0", a newer major
            allowed = (asyncckpt.CorruptedCheckpointError, asyncckpt.UnsupportedVersionError)
        assert isinstance(outcome, allowed), f"{where}: {outcome!r}"
        assert type(outcome) in (asyncckpt.CorruptedCheckpointError, asyncckpt.UnsupportedVersionError)
    else:
        # Zero padding is covered by no checksum and read by no reader: a flip there is harmless,
        # and the state must come back exactly.
        assert original[position] == 0, f"{where}: uncovered bytes are zero padding"
        assert not isinstance(outcome, Exception), f"{where}: {outcome!r}"
        _assert_identical(state, outcome)


def _assert_identical(expected: Any, actual: Any) -> None:
    assert list(expected) == list(actual)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == actual[key].dtype and torch.equal(value, actual[key]), key
        else:
            assert value == actual[key], key


def test_a_bit_flip_anywhere_is_detected_or_harmless(small_file: tuple[Path, dict[str, Any]]) -> None:
    path, state = small_file
    original = path.read_bytes()
    covered = checksummed_ranges(path)
    checked = [p for span in covered for p in span]
    padding = sorted(set(range(len(original))) - set(checked))
    assert len(padding) > 8000  # 4032 bytes after the prelude, the rest of blob a's 4 KiB page
    for position in checked + padding[::37]:  # every checksummed byte, a sample of the padding
        check_flip(path, position, position % 8, original, state, covered)
    assert path.read_bytes() == original


def test_every_bit_of_prelude_header_and_trailer_is_checked(small_file: tuple[Path, dict[str, Any]]) -> None:
    path, state = small_file
    original = path.read_bytes()
    covered = checksummed_ranges(path)
    metadata_spans = [covered[0], covered[-1]]
    unsupported = 0
    for span in metadata_spans:
        for position in span:
            for bit in range(8):
                outcome = flip_outcome(path, position, bit, original)
                assert isinstance(outcome, asyncckpt.CheckpointError), (position, bit, outcome)
                unsupported += isinstance(outcome, asyncckpt.UnsupportedVersionError)
    assert unsupported > 0  # e.g. "1.0" -> "3.0": refused as a newer major, not as corruption
    check_flip(path, 100, 3, original, state, covered)  # and the padding stays harmless


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.data())
def test_random_damage_is_detected_or_harmless(
    small_file: tuple[Path, dict[str, Any]], data: st.DataObject
) -> None:
    path, state = small_file
    original = path.read_bytes()
    start = data.draw(st.integers(0, len(original) - 1), label="start")
    junk = data.draw(st.binary(min_size=1, max_size=64), label="junk")
    damaged = original[:start] + junk + original[start + len(junk) :]
    damaged = damaged[: len(original)]
    path.write_bytes(damaged)
    try:
        outcome: Any = asyncckpt.load(path).state
    except asyncckpt.CheckpointError as exc:
        outcome = exc
    finally:
        path.write_bytes(original)
    if isinstance(outcome, Exception):
        assert type(outcome) in (asyncckpt.CorruptedCheckpointError, asyncckpt.UnsupportedVersionError)
    else:
        covered = checksummed_ranges(path)
        changed = [i for i in range(len(original)) if original[i] != damaged[i]]
        assert not any(i in span for span in covered for i in changed)
        _assert_identical(state, outcome)


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_rich_file_is_refused(rich_state_file: Path, tmp_dir: Path, cut: float) -> None:
    data = rich_state_file.read_bytes()
    damaged = tmp_dir / "damaged.ckpt"
    damaged.write_bytes(data[: int(len(data) * cut)])

    with pytest.raises(asyncckpt.CorruptedCheckpointError, match="truncated"):
        asyncckpt.load(damaged)


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_flipped_rich_file_is_refused_or_intact(
    rich_state_file: Path, tmp_dir: Path, assert_same_state: SameState, where: float, bit: int
) -> None:
    data = bytearray(rich_state_file.read_bytes())
    position = int(len(data) * where)
    data[position] ^= 1 << bit
    damaged = tmp_dir / "damaged.ckpt"
    damaged.write_bytes(bytes(data))
    covered = checksummed_ranges(rich_state_file)

    if any(position in span for span in covered):
        with pytest.raises((asyncckpt.CorruptedCheckpointError, asyncckpt.UnsupportedVersionError)):
            asyncckpt.load(damaged)
    else:
        assert data[position] == 1 << bit  # zero padding, never read
        assert_same_state(asyncckpt.load(rich_state_file).state, asyncckpt.load(damaged).state)
