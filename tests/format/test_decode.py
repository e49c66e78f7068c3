"""format.decode: the checked reader of prelude, trailer and header; hostile headers are refused
before anything of a declared size is allocated."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import msgpack
import pytest
import torch
from spec_files import (
    DATA,
    ReadLog,
    build_file,
    header_fields,
    nested_tuples,
    raw_map,
    spec_prelude,
    spec_trailer,
)

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt.format import BigInt, TensorRef


def test_spec_built_file_loads(tmp_dir: Path) -> None:
    path = tmp_dir / "spec.ckpt"
    path.write_bytes(build_file(header_fields()))

    loaded = asyncckpt.load(path)

    assert loaded.step == 3 and loaded.version == "1.0" and loaded.metadata == {}
    assert torch.equal(loaded.state["w"], torch.arange(4, dtype=torch.float32))


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
    error = fmt.unsupported_version("3.1", "", path="f")
    message = str(error)
    assert message == "f: checkpoint format 3.1 is not supported by asyncckpt 0.1.0 (reads 0.x and 1.x)"
    assert error.path == "f" and error.reason == message.removeprefix("f: ")


# --------------------------------------------------------------------------- hostile headers


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
    monkeypatch.setattr(fmt.spec, "MAX_BLOBS", 2)
    blobs = [[4096, 0, 0]] * 3

    refused(build_file(header_fields(blobs=blobs, tensors=[], tree={})), "3 blobs exceed the limit of 2")


def test_too_many_tensors(refused: Callable[[bytes, str], str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt.spec, "MAX_TENSORS", 2)
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
        (b"\xdd\xff\xff\xff\xff", "does not decode: a container at byte 5 declares 4294967295 values, more"),
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
    # Each level copies the ~50 KB below it: the copies pass 1 MiB + 8 times the header long
    # before level 129 (a shallower chain is refused by depth: test_codec).
    raw = raw_map(header_fields(tensors=[], blobs=[]), tree=nested_tuples(10_000))

    refused(build_file(raw), "does not decode: tuples nest more than [0-9]+ bytes in total")


def test_nested_tuples_copying_too_much_are_refused(
    refused: Callable[[bytes, str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # msgpack copies every extension payload, so 100 tuples around 256 KiB would copy 25 MiB.
    monkeypatch.setattr(fmt.spec, "MAX_TUPLE_BYTES", 1 << 20)
    tree: Any = bytes(256 << 10)
    for _ in range(100):
        tree = (tree,)
    raw = fmt.pack(header_fields(tensors=[], blobs=[], tree=tree))

    refused(build_file(raw), "tuples nest more than 1048576 bytes in total")


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

    # Refused by the pre-scan, before msgpack builds (or reserves room for) any of the levels.
    refused(build_file(raw), "does not decode: it nests deeper than 128 levels")


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


# --------------------------------------------------------------------------- where: errors carry fields


def read_error(data: bytes) -> asyncckpt.CheckpointError:
    with pytest.raises(asyncckpt.CheckpointError) as caught:
        fmt.read_layout(io.BytesIO(data), "run/x.ckpt")
    error = caught.value
    assert error.path == "run/x.ckpt" and str(error) == f"run/x.ckpt: {error.reason}"
    assert "run/x.ckpt" not in error.reason  # the place is a field, not part of the reason
    return error


def test_structural_errors_carry_the_offset() -> None:
    good = build_file(header_fields())
    header_offset = 4096 + len(DATA)
    trailer_offset = len(good) - 64

    torn = bytearray(good)
    torn[-1] ^= 1
    assert read_error(bytes(torn)).offset == trailer_offset
    bad_crc = bytearray(good)
    bad_crc[header_offset + 3] ^= 1
    assert read_error(bytes(bad_crc)).offset == header_offset
    short = read_error(good[:100])
    assert (short.reason, short.offset) == ("truncated: 100 bytes, too short for a v1 file", 100)
    prelude = read_error(good[:10])
    assert prelude.offset == 10 and prelude.reason.startswith("truncated: 10 bytes, shorter than")
    version = read_error(spec_prelude(b"9.0", b"9.0.0") + good[64:])
    assert isinstance(version, asyncckpt.UnsupportedVersionError)
    assert version.reason.endswith("it requires asyncckpt >= 9.0.0")


def test_header_errors_name_the_blob_and_the_key() -> None:
    blob = read_error(build_file(header_fields(blobs=[[4100, 8, 0]], tensors=[], tree={})))
    assert (blob.blob, blob.key, blob.offset) == (0, None, 4096 + len(DATA))
    assert blob.reason.startswith("bad header: blob 0 at offset 4100")

    tensor = read_error(build_file(header_fields(tensors=[["model.w", "float32", [5], [1], 0, 0]])))
    assert (tensor.key, tensor.blob) == ("model.w", 0)
    assert tensor.reason == "bad header: tensor 0 (model.w) does not fit inside blob 0 (16 bytes)"

    unknown = read_error(build_file(header_fields(tensors=[["w", "float128", [4], [1], 0, 0]])))
    assert (unknown.key, unknown.blob) == ("w", None)

    not_a_key = read_error(build_file(header_fields(tensors=[[7, "float32", [4], [1], 0, 0]])))
    assert not_a_key.key is None


def test_check_prelude_errors_carry_fields() -> None:
    with pytest.raises(asyncckpt.CorruptedCheckpointError) as caught:
        fmt.check_prelude(b"ASYNCKPX" + spec_prelude()[8:], Path("p"))
    assert (caught.value.path, caught.value.offset) == ("p", 0)
    assert caught.value.reason == "not an asyncckpt checkpoint (bad magic b'ASYNCKPX')"
