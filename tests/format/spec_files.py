"""Files built from the byte layout of docs/FORMAT.md, independently of the writer.

The format tests build files with these so that they check the spec, and not just the writer's
agreement with its own reader.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import crc32c
import msgpack
import torch

from asyncckpt import format as fmt
from asyncckpt.format import TensorRef

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


def nested_tuples(levels: int) -> bytes:
    inner = msgpack.packb([])
    for _ in range(levels - 1):
        inner = msgpack.packb([msgpack.ExtType(fmt.EXT_TUPLE, inner)])
    return msgpack.packb(msgpack.ExtType(fmt.EXT_TUPLE, inner))


def checksummed_ranges(path: Path) -> list[range]:
    """Byte ranges some CRC32C covers: prelude, blobs, header and trailer."""
    with open(path, "rb") as file:
        layout = fmt.read_layout(file, str(path))
    blobs = [range(b.offset, b.offset + b.nbytes) for b in layout.blobs]
    return [range(0, 64), *blobs, range(layout.header_offset, layout.file_size)]
