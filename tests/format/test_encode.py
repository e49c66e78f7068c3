"""format.encode: prelude, trailer, blob offsets, the writer, and limits checked before the first byte."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import Any

import crc32c
import pytest
import torch
from spec_files import spec_prelude, spec_trailer

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt.format import TensorRef

SameState = Callable[[Any, Any], None]


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


def test_writer_refuses_what_the_reader_would(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = {"step": 1, "metadata": {}, "tensors": [], "blobs": []}
    monkeypatch.setattr(fmt.spec, "MAX_TUPLE_BYTES", 1 << 20)
    deep: Any = bytes(256 << 10)
    for _ in range(4):
        deep = (deep,)
    with pytest.raises(ValueError, match="tuples in the state nest 1048[0-9]+ bytes in total, more than"):
        fmt.encode_header(tree=deep, **fields)
    fmt.encode_header(tree=deep[0], **fields)  # three levels copy less than 1 MiB

    monkeypatch.setattr(fmt.spec, "MAX_HEADER_BYTES", 1000)
    with pytest.raises(ValueError, match="the header would take [0-9]+ bytes, more than the limit of 1000"):
        fmt.encode_header(tree=bytes(1000), **fields)
