"""format.py: the byte layout of v1, msgpack with exact types, and the checked reader.

The corruption tests hold the reader to its promise: a broken file raises
``CorruptedCheckpointError`` (or ``IncompatibleCheckpointError`` when a flip lands in the
version field), never another exception and never wrong data.
"""

from __future__ import annotations

import io
import math
import os
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crc32c
import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt import checkpoint
from asyncckpt import format as fmt
from asyncckpt.format import BigInt, TensorRef

SameState = Callable[[Any, Any], None]
FIXTURE_OK = [HealthCheck.function_scoped_fixture]


# --------------------------------------------------------------------------- spec helpers
#
# These build files from the byte layout of docs/FORMAT.md, independently of the writer, so
# that the tests check the spec and not just the writer's agreement with its own reader.

TRAILER = struct.Struct("<QQQI24sI8s")
DATA = torch.arange(4, dtype=torch.float32).numpy().tobytes()  # one 16-byte blob


def spec_prelude(version: bytes = b"1.0", requires: bytes = b"0.1.0") -> bytes:
    body = b"ASYNCKPT" + version.ljust(16, b"\0") + requires.ljust(16, b"\0") + bytes(20)
    return body + struct.pack("<I", crc32c.crc32c(body))


def spec_trailer(header_offset: int, header_len: int, file_size: int, header_crc: int) -> bytes:
    body = struct.pack("<QQQI24s", header_offset, header_len, file_size, header_crc, b"")
    return body + struct.pack("<I", crc32c.crc32c(body)) + b"ACKPTEND"


def header_fields(**changes: Any) -> dict[str, Any]:
    """A valid header for one float32 tensor ``w`` of 4 elements in one blob at 4096."""
    fields: dict[str, Any] = {
        "format": "asyncckpt",
        "version": "1.0",
        "status": "complete",
        "step": 3,
        "created": "2026-01-01T00:00:00.000000+00:00",
        "writer": "asyncckpt tests",
        "metadata": {},
        "blobs": [[4096, len(DATA), crc32c.crc32c(DATA)]],
        "tensors": [["w", "float32", [4], [1], 0, 0]],
        "tree": {"w": TensorRef(0)},
    }
    fields.update(changes)
    return fields


def build_file(header: dict[str, Any] | bytes, data: bytes = DATA) -> bytes:
    """Prelude, padding to 4096, ``data``, then ``header`` (packed unless bytes) and its trailer."""
    raw = header if isinstance(header, bytes) else fmt.pack(header)
    body = spec_prelude() + bytes(4096 - 64) + data
    size = len(body) + len(raw) + 64
    return body + raw + spec_trailer(len(body), len(raw), size, crc32c.crc32c(raw))


def raw_map(fields: dict[str, Any], **raw_values: bytes) -> bytes:
    """A msgpack map of ``fields`` plus entries whose values are given as raw msgpack bytes."""
    out = msgpack.Packer().pack_map_header(len(fields) + len(raw_values))
    for key, value in fields.items():
        out += fmt.pack(key) + fmt.pack(value)
    for key, value in raw_values.items():
        out += fmt.pack(key) + value
    return out


class ReadLog(io.BytesIO):
    """A file in memory that records how many bytes each read asked for."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        self.asked.append(-1 if size is None else size)
        return super().read(size)


def test_spec_built_file_loads(tmp_dir: Path) -> None:
    path = tmp_dir / "spec.ckpt"
    path.write_bytes(build_file(header_fields()))

    loaded = asyncckpt.load(path)

    assert loaded.step == 3 and loaded.version == "1.0" and loaded.metadata == {}
    assert torch.equal(loaded.state["w"], torch.arange(4, dtype=torch.float32))


# --------------------------------------------------------------------------- layout


def test_prelude_bytes() -> None:
    prelude = fmt.encode_prelude("1.0", "0.1.0")

    assert len(prelude) == fmt.PRELUDE_SIZE == 64
    assert prelude == spec_prelude()
    assert prelude[0:8] == b"ASYNCKPT"
    assert prelude[8:24] == b"1.0" + bytes(13)
    assert prelude[24:40] == b"0.1.0" + bytes(11)
    assert prelude[40:60] == bytes(20)
    assert struct.unpack("<I", prelude[60:64])[0] == crc32c.crc32c(prelude[:60])


def test_trailer_bytes() -> None:
    header = b"\x80"  # an empty msgpack map
    trailer = fmt.encode_trailer(8192, header)

    assert trailer == spec_trailer(8192, 1, 8192 + 1 + 64, crc32c.crc32c(header))
    assert len(trailer) == fmt.TRAILER_SIZE and trailer[-8:] == b"ACKPTEND"
    assert struct.unpack_from("<QQQI", trailer) == (8192, 1, 8257, crc32c.crc32c(header))
    assert trailer[28:52] == bytes(24)


def test_crc32c_is_castagnoli() -> None:
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


@pytest.mark.parametrize(
    ("sizes", "offsets", "end"),
    [
        ([], [], 4096),
        ([0], [4096], 4096),
        ([1], [4096], 4097),
        ([4096, 1], [4096, 8192], 8193),
        ([4097, 0, 0, 5], [4096, 12288, 12288, 12288], 12293),
    ],
)
def test_blob_offsets_are_aligned(sizes: list[int], offsets: list[int], end: int) -> None:
    assert fmt.blob_offsets(sizes) == (offsets, end)
    assert all(offset % fmt.ALIGN == 0 for offset in offsets)


def test_written_file_layout() -> None:
    sink = io.BytesIO()
    blobs = [memoryview(b"\x01" * 10), memoryview(b""), memoryview(b"\x02" * 5000)]
    tensors = [fmt.TensorEntry("a", torch.uint8, (10,), (1,), 0, 0)]

    size = fmt.write_checkpoint(
        sink,
        step=9,
        metadata={"m": 1},
        tree=[TensorRef(0)],
        tensors=tensors,
        sizes=[10, 0, 5000],
        blobs=blobs,
    )

    data = sink.getvalue()
    assert size == len(data)
    assert data[:64] == spec_prelude() and data[64:4096] == bytes(4032)
    assert data[4096:4106] == b"\x01" * 10 and data[4106:8192] == bytes(8192 - 4106)
    assert data[8192:13192] == b"\x02" * 5000
    header_offset, header_len, file_size, header_crc = struct.unpack_from("<QQQI", data, size - 64)
    assert (header_offset, file_size) == (13192, size) and header_offset + header_len + 64 == size
    header = fmt.unpack(data[header_offset : header_offset + header_len])
    assert crc32c.crc32c(data[header_offset : header_offset + header_len]) == header_crc
    assert header["blobs"] == [
        [4096, 10, crc32c.crc32c(b"\x01" * 10)],
        [8192, 0, 0],
        [8192, 5000, crc32c.crc32c(b"\x02" * 5000)],
    ]
    assert header["tensors"] == [["a", "uint8", [10], [1], 0, 0]]
    assert (header["format"], header["version"], header["status"], header["step"]) == (
        "asyncckpt",
        "1.0",
        "complete",
        9,
    )
    assert header["writer"] == f"asyncckpt {asyncckpt.__version__}" and header["metadata"] == {"m": 1}
    assert header["tree"] == [TensorRef(0)]
    assert fmt.read_layout(io.BytesIO(data), "mem").blobs[2] == fmt.BlobEntry(
        8192, 5000, header["blobs"][2][2]
    )


def test_empty_state_file_is_prelude_padding_header_trailer() -> None:
    sink = io.BytesIO()
    size = fmt.write_checkpoint(sink, step=0, metadata={}, tree={}, tensors=[], sizes=[], blobs=[])

    layout = fmt.read_layout(io.BytesIO(sink.getvalue()), "mem")

    assert layout.header_offset == 4096 and layout.file_size == size and layout.blobs == ()


def test_blob_of_wrong_length_is_refused_by_the_writer() -> None:
    with pytest.raises(ValueError, match="has 3 bytes, expected 4"):
        fmt.write_checkpoint(
            io.BytesIO(), step=1, metadata={}, tree=[], tensors=[], sizes=[4], blobs=[memoryview(b"abc")]
        )


@pytest.mark.parametrize("step", [0, 1, 2**63 - 1])
def test_check_step_accepts(step: int) -> None:
    fmt.check_step(step)


@pytest.mark.parametrize(
    ("step", "error"),
    [(-1, ValueError), (2**63, ValueError), (True, TypeError), ("3", TypeError), (1.0, TypeError)],
)
def test_check_step_refuses(step: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="step must be"):
        fmt.check_step(step)
    with pytest.raises(error, match="step must be"):  # the writer checks before writing a byte
        sink = io.BytesIO()
        try:
            fmt.write_checkpoint(sink, step=step, metadata={}, tree={}, tensors=[], sizes=[], blobs=[])
        finally:
            assert sink.getvalue() == b""


# --------------------------------------------------------------------------- msgpack with exact types


def test_extension_types_bytes() -> None:
    assert fmt.pack((1, 2)) == msgpack.packb(msgpack.ExtType(1, msgpack.packb([1, 2])))
    assert fmt.pack(TensorRef(5)) == msgpack.packb(msgpack.ExtType(2, msgpack.packb(5)))
    assert fmt.pack(BigInt(2**70)) == msgpack.packb(
        msgpack.ExtType(3, (2**70).to_bytes(9, "big", signed=True))
    )
    assert fmt.pack(BigInt(-(2**70))) == msgpack.packb(
        msgpack.ExtType(3, (-(2**70)).to_bytes(9, "big", signed=True))
    )


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 2**64 - 1 + 2**100, -(2**1000)])
def test_big_int_roundtrip(value: int) -> None:
    assert fmt.unpack(fmt.pack(BigInt(value))) == BigInt(value)


def test_pack_refuses_unknown_types() -> None:
    with pytest.raises(TypeError, match="cannot encode set"):
        fmt.pack({1, 2})


def test_unpack_refuses_unknown_extension() -> None:
    with pytest.raises(ValueError, match="unknown msgpack extension type 9"):
        fmt.unpack(msgpack.packb(msgpack.ExtType(9, b"")))


def test_unpack_refuses_a_tensor_ref_that_is_not_an_int() -> None:
    with pytest.raises(ValueError, match="tensor reference is not an int"):
        fmt.unpack(msgpack.packb(msgpack.ExtType(2, msgpack.packb("0"))))


def nested_tuples(levels: int) -> bytes:
    inner = msgpack.packb([])
    for _ in range(levels - 1):
        inner = msgpack.packb([msgpack.ExtType(fmt.EXT_TUPLE, inner)])
    return msgpack.packb(msgpack.ExtType(fmt.EXT_TUPLE, inner))


def test_unpack_accepts_as_many_nested_tuples_as_flatten_does() -> None:
    # Regression: flatten allows a container at depth MAX_DEPTH (the root is depth 0), i.e.
    # MAX_DEPTH + 1 nested tuples; unpack used to refuse the last one.
    value = fmt.unpack(nested_tuples(fmt.MAX_DEPTH + 1))
    for _ in range(fmt.MAX_DEPTH):
        assert type(value) is tuple and len(value) == 1
        value = value[0]
    assert value == ()
    with pytest.raises(ValueError, match="nesting deeper than 128 levels"):
        fmt.unpack(nested_tuples(fmt.MAX_DEPTH + 2))


msgpack_keys = st.text(max_size=8) | st.integers(-(2**63), 2**64 - 1)
msgpack_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.integers(-(2**300), 2**300).map(BigInt)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.integers(0, 2**32).map(TensorRef)
)
msgpack_trees = st.recursive(
    msgpack_leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(msgpack_keys, children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(tree=msgpack_trees)
def test_pack_unpack_roundtrip(tree: Any, assert_same_state: SameState) -> None:
    assert_same_state(tree, fmt.unpack(fmt.pack(tree)))


# --------------------------------------------------------------------------- prelude and versions


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("1.0", (1, 0)),
        ("1.7", (1, 7)),
        ("2.0.0", (2, 0)),
        ("10.20.30", (10, 20)),
        ("1", None),
        ("1.0-rc1", None),
    ],
)
def test_parse_version(text: str, parsed: tuple[int, int] | None) -> None:
    assert fmt.parse_version(text) == parsed


def test_check_prelude_returns_the_version() -> None:
    assert fmt.check_prelude(spec_prelude(b"1.3"), "f") == "1.3"


def test_check_prelude_refuses_a_short_prelude() -> None:
    with pytest.raises(
        asyncckpt.CorruptedCheckpointError, match="f: truncated: 63 bytes, shorter than the 64-byte"
    ):
        fmt.check_prelude(spec_prelude()[:63], "f")


def test_check_prelude_refuses_bad_magic() -> None:
    with pytest.raises(asyncckpt.CorruptedCheckpointError, match="not an asyncckpt checkpoint"):
        fmt.check_prelude(b"ASYNCKPX" + spec_prelude()[8:], "f")


def test_check_prelude_refuses_a_checksum_mismatch() -> None:
    prelude = bytearray(spec_prelude())
    prelude[45] ^= 1  # reserved bytes are covered too
    with pytest.raises(asyncckpt.CorruptedCheckpointError, match=r"prelude checksum mismatch \(bytes 0-64\)"):
        fmt.check_prelude(bytes(prelude), "f")


def test_older_major_is_unsupported() -> None:
    with pytest.raises(asyncckpt.UnsupportedVersionError, match="format 0.9 is not supported"):
        fmt.check_prelude(spec_prelude(b"0.9"), "f")


def test_unsupported_version_message_without_requires() -> None:
    message = fmt.unsupported_version_message("f", "3.1", "")
    assert message == "f: checkpoint format 3.1 is not supported by asyncckpt 0.1.0 (reads 0.x and 1.x)"


# --------------------------------------------------------------------------- truncation and bit flips


@pytest.fixture
def small_file(tmp_dir: Path) -> tuple[Path, dict[str, Any]]:
    """A small v1 file with two blobs (so with padding between them), and its state."""
    state = {
        "a": torch.arange(6, dtype=torch.float32),
        "b": torch.tensor([[1, 2], [3, 4]], dtype=torch.int16),
        "n": (1, "x"),
    }
    return asyncckpt.save(tmp_dir / "small.ckpt", state, step=5), state


def checksummed_ranges(path: Path) -> list[range]:
    """Byte ranges some CRC32C covers: prelude, blobs, header and trailer."""
    with open(path, "rb") as file:
        layout = fmt.read_layout(file, str(path))
    blobs = [range(b.offset, b.offset + b.nbytes) for b in layout.blobs]
    return [range(0, 64), *blobs, range(layout.header_offset, layout.file_size)]


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


# --------------------------------------------------------------------------- hostile headers


@pytest.fixture
def refused(tmp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[bytes, str], str]]:
    """Load crafted bytes; assert a CorruptedCheckpointError matching ``pattern`` that came before
    any blob was read (so nothing of a declared size was allocated) and with a small peak of
    Python memory (under 16 MiB; the most is decoding 10,000 nested tuples, which stops at
    depth 129 after copying each level's payload). Returns the message."""

    def no_blob_reads(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a blob was read from a file that should have been refused")

    monkeypatch.setattr(checkpoint, "_read_blobs", no_blob_reads)

    def load(data: bytes, pattern: str) -> str:
        path = tmp_dir / "hostile.ckpt"
        path.write_bytes(data)
        tracemalloc.start()
        try:
            with pytest.raises(asyncckpt.CorruptedCheckpointError, match=pattern) as caught:
                asyncckpt.load(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert type(caught.value) is asyncckpt.CorruptedCheckpointError
        assert str(caught.value).startswith(f"{path}: ")
        assert peak < 16 << 20, f"peak Python allocation {peak} bytes"
        return str(caught.value)

    yield load


def test_huge_header_length_is_refused_before_reading(refused: Callable[[bytes, str], str]) -> None:
    body = spec_prelude() + bytes(4096 - 64) + DATA
    size = len(body) + 64
    trailer = spec_trailer(len(body), 2**62, size, 0)

    refused(body + trailer, f"header length {2**62} exceeds the limit of {64 << 20} bytes")

    log = ReadLog(body + trailer)
    with pytest.raises(asyncckpt.CorruptedCheckpointError):
        fmt.read_layout(log, "mem")
    assert max(log.asked) <= 64, log.asked


def test_header_length_within_limit_but_beyond_the_file_is_refused(
    refused: Callable[[bytes, str], str],
) -> None:
    body = spec_prelude() + bytes(4096 - 64)
    trailer = spec_trailer(len(body), 60 << 20, len(body) + 64, 0)

    refused(body + trailer, "does not end at the trailer")

    log = ReadLog(body + trailer)
    with pytest.raises(asyncckpt.CorruptedCheckpointError):
        fmt.read_layout(log, "mem")
    assert max(log.asked) <= 64, log.asked


def test_header_offset_inside_the_prelude_is_refused(refused: Callable[[bytes, str], str]) -> None:
    raw = fmt.pack(header_fields(blobs=[], tensors=[], tree={}))
    body = spec_prelude() + bytes(4096 - 64)
    size = len(body) + len(raw) + 64
    data = body + raw + spec_trailer(10, len(body) + len(raw) - 10, size, crc32c.crc32c(raw))

    refused(data, "header at 10")


def test_file_size_in_trailer_must_match(refused: Callable[[bytes, str], str]) -> None:
    raw = fmt.pack(header_fields())
    body = spec_prelude() + bytes(4096 - 64) + DATA
    trailer = spec_trailer(len(body), len(raw), len(body) + len(raw) + 64 + 4096, crc32c.crc32c(raw))

    refused(body + raw + trailer, "truncated or extended: the trailer says")


def test_trailer_checksum_is_checked(refused: Callable[[bytes, str], str]) -> None:
    data = bytearray(build_file(header_fields()))
    data[-20] ^= 0xFF  # inside the trailer's reserved bytes

    refused(bytes(data), "trailer checksum mismatch")


def test_header_checksum_is_checked(refused: Callable[[bytes, str], str]) -> None:
    data = bytearray(build_file(header_fields()))
    data[4096 + len(DATA) + 3] ^= 0x01

    refused(bytes(data), "header checksum mismatch at offset 4112")


@pytest.mark.parametrize(
    ("blobs", "pattern"),
    [
        (
            [[4096, 2**62, 0]],
            "blob 0 at offset 4096 \\(\\+4611686018427387904\\) lies outside the data region",
        ),
        ([[2**40, 16, 0]], "blob 0 at offset 1099511627776 \\(\\+16\\) lies outside"),
        ([[0, 16, 0]], "blob 0 at offset 0 .* lies outside"),
        ([[4100, 8, 0]], "not 4096-byte aligned"),
        ([[4096, 16, 0], [4096, 0, 0]], "blob 1 at offset 4096 .* \\[4112, 4112\\)"),
        ([[4096, -1, 0]], "blob 0 is not \\[offset, nbytes, crc\\]"),
        ([[-4096, 16, 0]], "blob 0 is not \\[offset, nbytes, crc\\]"),
        ([[4096, 16]], "blob 0 is not \\[offset, nbytes, crc\\]"),
        ([[4096, "16", 0]], "blob 0 is not \\[offset, nbytes, crc\\]"),
        ([[4096, 16, True]], "blob 0 is not \\[offset, nbytes, crc\\]"),
        ([(4096, 16, 0)], "blob 0 is not \\[offset, nbytes, crc\\]"),
        ([[4096, 16, 2**32]], "blob 0 has a crc32c of 4294967296, more than 32 bits"),
        ({"0": [4096, 16, 0]}, "field 'blobs' is missing or of the wrong type"),
    ],
)
def test_hostile_blob_table(refused: Callable[[bytes, str], str], blobs: Any, pattern: str) -> None:
    refused(build_file(header_fields(blobs=blobs, tensors=[], tree={})), pattern)


def test_too_many_blobs(refused: Callable[[bytes, str], str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt, "MAX_BLOBS", 2)
    blobs = [[4096, 0, 0]] * 3

    refused(build_file(header_fields(blobs=blobs, tensors=[], tree={})), "3 blobs exceed the limit of 2")


def test_too_many_tensors(refused: Callable[[bytes, str], str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt, "MAX_TENSORS", 2)
    tensors = [["w", "float32", [4], [1], 0, 0]] * 3

    refused(build_file(header_fields(tensors=tensors)), "3 tensors exceed the limit of 2")


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        (["w", "float32", [5], [1], 0, 0], r"tensor 0 \(w\) does not fit inside blob 0 \(16 bytes\)"),
        (["w", "float32", [2**40], [1], 0, 0], "does not fit inside blob 0"),
        (["w", "float32", [2, 2], [2**40, 1], 0, 0], "does not fit inside blob 0"),
        (["w", "float32", [1], [1], 0, 16], "does not fit inside blob 0"),
        (["w", "float32", [3], [1], 0, 2], "does not fit inside blob 0"),  # misaligned element
        (["w", "float64", [2], [1], 0, 8], "does not fit inside blob 0"),
        (["w", "float32", [2**64 - 1], [0], 0, 0], "beyond 9223372036854775807"),
        (["w", "float32", [2**40, 2**40], [0, 0], 0, 0], "beyond 9223372036854775807"),
        (["w", "float32", [1], [2**64 - 1], 0, 0], "beyond 9223372036854775807"),
        (["w", "float32", [-1], [1], 0, 0], r"bad shape \[-1\]"),
        (["w", "float32", [4], [-1], 0, 0], "bad shape"),
        (["w", "float32", [4], [1, 1], 0, 0], "bad shape"),
        (["w", "float32", [1] * 65, [1] * 65, 0, 0], "bad shape"),
        (["w", "float32", (4,), (1,), 0, 0], "bad shape"),
        (["w", "float32", [4.0], [1], 0, 0], "bad shape"),
        (["w", "float32", [4], [1], 1, 0], "refers to blob 1 at 0, which does not exist"),
        (["w", "float32", [4], [1], -1, 0], "refers to blob -1"),
        (["w", "float32", [4], [1], 0, -4], "refers to blob 0 at -4"),
        (["w", "float32", [4], [1], True, 0], "refers to blob True"),
        (["w", "float128", [4], [1], 0, 0], "unknown dtype 'float128'"),
        (["w", "qint8", [4], [1], 0, 0], "unknown dtype 'qint8'"),
        (["w", "float32", [4], [1], 0], r"tensor 0 is not \[key, dtype, shape, stride, blob, offset\]"),
        ([7, "float32", [4], [1], 0, 0], "tensor 0 is not"),
        ({"key": "w"}, "tensor 0 is not"),
    ],
)
def test_hostile_tensor_table(refused: Callable[[bytes, str], str], row: Any, pattern: str) -> None:
    refused(build_file(header_fields(tensors=[row])), pattern)


def test_huge_declared_shapes_with_zero_extent_are_bounded(refused: Callable[[bytes, str], str]) -> None:
    # A stride-0 view of one element is legal (an expanded tensor); its element count must
    # still fit torch's int64 or the reader would fail with an OverflowError of its own.
    refused(build_file(header_fields(tensors=[["w", "float32", [2**32, 2**32], [0, 0], 0, 0]])), "beyond")


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"format": "safetensors"}, "format is 'safetensors', expected 'asyncckpt'"),
        ({"version": "1.1"}, "version '1.1' differs from the prelude's '1.0'"),
        ({"status": "writing"}, "status is 'writing', not 'complete'"),
        ({"status": None}, "field 'status' is missing or of the wrong type"),
        ({"step": -1}, r"step -1 is outside \[0, 9223372036854775807\]"),
        ({"step": 2**64 - 1}, "step 18446744073709551615 is outside"),
        ({"step": "3"}, "field 'step' is missing or of the wrong type"),
        ({"step": True}, "field 'step' is missing or of the wrong type"),
        ({"step": BigInt(2**70)}, "field 'step' is missing or of the wrong type"),
        ({"created": 0}, "field 'created' is missing or of the wrong type"),
        ({"writer": b"asyncckpt"}, "field 'writer' is missing or of the wrong type"),
        ({"tensors": "w"}, "field 'tensors' is missing or of the wrong type"),
        ({"tree": {"w": TensorRef(1)}}, "tree refers to tensor 1; the table has 1"),
        ({"tree": [TensorRef(2**63)]}, "tree refers to tensor 9223372036854775808"),
        ({"tree": {1.5: 0}}, "tree has a dict key of type float"),
        ({"tree": {True: 0}}, "tree has a dict key of type bool"),
        ({"tree": {(1, 2): 0}}, "tree has a dict key of type tuple"),
        ({"metadata": {"w": TensorRef(0)}}, "tree refers to tensor 0; the table has 0"),
    ],
)
def test_hostile_header_fields(
    refused: Callable[[bytes, str], str], changes: dict[str, Any], pattern: str
) -> None:
    refused(build_file(header_fields(**changes)), pattern)


def test_missing_header_field(refused: Callable[[bytes, str], str]) -> None:
    fields = header_fields()
    del fields["step"]

    refused(build_file(fields), "field 'step' is missing or of the wrong type")


def test_header_that_is_not_a_map(refused: Callable[[bytes, str], str]) -> None:
    refused(build_file(fmt.pack([1, 2, 3])), "bad header: not a map")


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        (b"\xc1", "does not decode"),  # never used
        (b"\xdd\xff\xff\xff\xff", "does not decode: 4294967295 exceeds max_array_len"),
        (b"\xdf\xff\xff\xff\xff", "does not decode"),
        (b"\xdb\xff\xff\xff\xff", "does not decode"),
        (b"\x80\x80", "does not decode"),  # extra data
        (b"", "does not decode"),
        (msgpack.packb(msgpack.ExtType(9, b"")), "unknown msgpack extension type 9"),
        (msgpack.packb(msgpack.ExtType(1, msgpack.packb(5))), "tuple payload is not an array"),
    ],
)
def test_undecodable_header(refused: Callable[[bytes, str], str], raw: bytes, pattern: str) -> None:
    refused(build_file(raw), pattern)


def test_ten_thousand_nested_lists(refused: Callable[[bytes, str], str]) -> None:
    tree = b"\x91" * 10_000 + b"\x90"
    raw = raw_map(header_fields(tensors=[], blobs=[]), tree=tree)

    refused(build_file(raw), "does not decode: it nests deeper than 128 levels")


def test_ten_thousand_nested_tuples(refused: Callable[[bytes, str], str]) -> None:
    raw = raw_map(header_fields(tensors=[], blobs=[]), tree=nested_tuples(10_000))

    refused(build_file(raw), "does not decode: nesting deeper than 128 levels")


def test_nested_tuples_copying_too_much_are_refused(
    refused: Callable[[bytes, str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # msgpack copies every extension payload, so 100 tuples around 256 KiB would copy 25 MiB.
    monkeypatch.setattr(fmt, "MAX_TUPLE_BYTES", 1 << 20)
    tree: Any = bytes(256 << 10)
    for _ in range(100):
        tree = (tree,)
    raw = fmt.pack(header_fields(tensors=[], blobs=[], tree=tree))

    refused(build_file(raw), "tuples nest more than 1048576 bytes in total")


def test_writer_refuses_what_the_reader_would(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = {"step": 1, "metadata": {}, "tensors": [], "blobs": []}
    monkeypatch.setattr(fmt, "MAX_TUPLE_BYTES", 1 << 20)
    deep: Any = bytes(256 << 10)
    for _ in range(4):
        deep = (deep,)
    with pytest.raises(ValueError, match="tuples in the state nest 1048[0-9]+ bytes in total, more than"):
        fmt.encode_header(tree=deep, **fields)
    fmt.encode_header(tree=deep[0], **fields)  # three levels copy less than 1 MiB

    monkeypatch.setattr(fmt, "MAX_HEADER_BYTES", 1000)
    with pytest.raises(ValueError, match="the header would take [0-9]+ bytes, more than the limit of 1000"):
        fmt.encode_header(tree=bytes(1000), **fields)


def test_ten_thousand_nested_maps(refused: Callable[[bytes, str], str]) -> None:
    tree = b"\x81\xa1k" * 10_000 + b"\xc0"
    raw = raw_map(header_fields(tensors=[], blobs=[]), tree=tree)

    refused(build_file(raw), "nests deeper than 128 levels")


@pytest.mark.parametrize("levels", [130, 500])
def test_nesting_within_msgpack_limits_but_beyond_max_depth(
    refused: Callable[[bytes, str], str], levels: int
) -> None:
    tree = b"\x91" * levels + b"\x90"
    raw = raw_map(header_fields(tensors=[], blobs=[]), tree=tree)

    refused(build_file(raw), "tree nesting deeper than 128 levels")


def test_maximal_nesting_is_accepted(tmp_dir: Path) -> None:
    tree = b"\x91" * fmt.MAX_DEPTH + b"\x90"  # a list at depth MAX_DEPTH, the deepest allowed
    path = tmp_dir / "deep.ckpt"
    path.write_bytes(build_file(raw_map(header_fields(tensors=[], blobs=[]), tree=tree)))

    value = asyncckpt.load(path).state

    depth = 0
    while value:
        value, depth = value[0], depth + 1
    assert (value, depth) == ([], fmt.MAX_DEPTH)


def test_reader_allocates_blob_memory_only_for_checked_sizes(tmp_dir: Path) -> None:
    # The largest allocation a valid header can cause is bounded by the file: every blob lies
    # inside [4096, header offset). A 16-byte blob gets a 16-byte tensor.
    path = tmp_dir / "spec.ckpt"
    path.write_bytes(build_file(header_fields()))
    with open(path, "rb") as file:
        layout = fmt.read_layout(file, str(path))

    assert sum(blob.nbytes for blob in layout.blobs) <= layout.header_offset - fmt.DATA_OFFSET
    assert math.prod(layout.tensors[0].shape) * 4 <= layout.blobs[0].nbytes
