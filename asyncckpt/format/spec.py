"""The constants, limits and plain data of on-disk format v1, in one place.

docs/FORMAT.md specifies the bytes; the names here are the ones it uses. Layout::

    [0, 64)            prelude: magic, format version, required release, CRC32C
    [64, 4096)         zero padding
    [4096, H)          blobs, each at a 4 KiB-aligned offset, zero padding between
    [H, H + L)         header: msgpack map (metadata, tree, blob and tensor tables)
    [H + L, H + L+64)  trailer: header offset/length/CRC32C, file size, CRC32C, magic

The other modules read the limits as ``spec.MAX_...`` at call time, so that a test may lower one.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

import torch

# --------------------------------------------------------------------------- identity and versions

MAGIC = b"ASYNCKPT"
TRAILER_MAGIC = b"ACKPTEND"
FORMAT_NAME = "asyncckpt"
FORMAT_VERSION = "1.0"
READABLE_MAJORS = (1,)
READS_TEXT = "0.x and 1.x"  # legacy torch.save files are "0.x"
REQUIRES_RELEASE = "0.1.0"  # the first asyncckpt release that reads FORMAT_VERSION
STATUS_COMPLETE = "complete"

# --------------------------------------------------------------------------- layout

PRELUDE_SIZE = 64
TRAILER_SIZE = 64
ALIGN = 4096
DATA_OFFSET = ALIGN
PRELUDE = struct.Struct("<8s16s16s20sI")  # magic, version, requires, reserved, crc
TRAILER = struct.Struct("<QQQI24sI8s")  # hdr off, hdr len, file size, hdr crc, reserved, crc, magic
TRAILER_CRC_AT = 52  # the trailer's CRC32C covers its bytes before this offset
MAX_VERSION_FIELD = 16  # bytes of the prelude's version and requires fields

# msgpack extension types of the header
EXT_TUPLE = 1
EXT_TENSOR = 2
EXT_BIGINT = 3
EXT_TYPED = 4  # a typed value: [kind, type name, payload] (docs/FORMAT.md, "Typed values")

# --------------------------------------------------------------------------- limits

# The header's size. A state of N tensors needs about 80 bytes a tensor with short keys (a
# model and its AdamW state: 1,164 tensors, 89,526 bytes) and about 200 with long ones (tree key
# and table key): 64 MiB holds some 300,000 tensors, an unsharded DeepSeek-V3-sized model and its
# optimizer state in one file, with room for metadata.
MAX_HEADER_BYTES = 64 << 20
# What decoding a header may build is bounded by the header's size (docs/FORMAT.md, "Decoding
# cost"). Every list, tuple, map, tensor reference and big int is one *object*: a header may hold
# HEADER_FREE_OBJECTS of them plus one per HEADER_BYTES_PER_OBJECT bytes. Real headers hold one per
# 7 to 15 bytes; a header of empty lists (one per byte) would cost 64 bytes of memory a byte.
HEADER_FREE_OBJECTS = 4096
HEADER_BYTES_PER_OBJECT = 4
# msgpack hands each extension payload to the decoder as a fresh copy, so nested tuples copy
# their contents once per level: the total of all tuple payloads bounds the decoder's copies, at
# most TUPLE_FREE_BYTES plus TUPLE_COPIES times the header's size, and never MAX_TUPLE_BYTES.
MAX_TUPLE_BYTES = 2 * MAX_HEADER_BYTES
TUPLE_FREE_BYTES = 1 << 20
TUPLE_COPIES = 8
# Ints beyond 64 bits (ext type 3). Python prints ints of up to 4,300 digits by default; 8192
# bits are 2,467 digits, so every stored int can be shown (inspect, validate --json).
MAX_BIGINT_BITS = 8192
MAX_TENSORS = 1_000_000
MAX_BLOBS = MAX_TENSORS
MAX_NDIM = 64
MAX_DEPTH = 128
MAX_STEP = 2**63 - 1  # steps are 0..MAX_STEP (file names hold at most 19 digits)
# Bound of every dimension, stride, element count, byte size and span (torch's int64): torch
# multiplies all dimensions of a shape even when one is 0, so the product of the non-zero ones
# must fit too.
MAX_INDEX = 2**63 - 1
MAX_CRC = 0xFFFFFFFF
MAX_TYPED_KIND = 32  # characters of a typed value's kind
MAX_TYPED_NAME = 512  # characters of a typed value's type name

# --------------------------------------------------------------------------- I/O tuning (not format)

CHUNK = 8 << 20  # bytes written (and checksummed on read) per call
PARALLEL_CRC_MIN = 1 << 20  # blobs at least this large may be checksummed beside the write

_SEMVER = re.compile(r"^(\d{1,6})\.(\d{1,6})(?:\.(\d{1,6}))?$")


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor's place in the tree: an index into the tensor table, and what to rebuild there.

    ``requires_grad`` and ``parameter`` say what the saved object was: a tensor that required
    grad, or a ``torch.nn.Parameter`` (with its ``requires_grad``). Both False is a plain tensor.
    """

    index: int
    requires_grad: bool = False
    parameter: bool = False

    @property
    def flags(self) -> int:
        """The reference's flags as stored (docs/FORMAT.md): bit 0 requires_grad, bit 1 Parameter."""
        return int(self.requires_grad) | int(self.parameter) << 1


@dataclass(frozen=True, slots=True)
class BigInt:
    """A Python int beyond msgpack's 64-bit integers."""

    value: int


@dataclass(frozen=True, slots=True)
class TypedValue:
    """A value of a common Python type stored exactly, without pickle (msgpack ext ``EXT_TYPED``).

    ``kind`` says how ``payload`` (itself an encoded tree without tensors) rebuilds it, e.g.
    ``"path"``, ``"enum"``, ``"dataclass"``; ``type`` names the class (``"module:Qualname"``).
    Which kinds exist and how they are rebuilt is not the format's business.
    """

    kind: str
    type: str
    payload: Any


@dataclass(frozen=True)
class BlobEntry:
    """Where one blob lies in the file and its CRC32C."""

    offset: int
    nbytes: int
    crc: int


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the table: a strided view into a blob.

    The same record serves both directions: the snapshot builds it from a live tensor before a
    save, the reader builds it from a checked header.
    """

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    blob: int
    offset: int  # bytes from the start of the blob


@dataclass(frozen=True)
class Layout:
    """Everything the header and trailer of a checked file say."""

    version: str
    step: int
    created: str
    writer: str
    metadata: Any
    tree: Any
    blobs: tuple[BlobEntry, ...]
    tensors: tuple[TensorEntry, ...]
    header_offset: int
    file_size: int

    def blob_key(self, blob: int) -> str:
        """The key of the first tensor stored in ``blob`` (for messages)."""
        return self.tensor_key(blob) or f"blob {blob}"

    def tensor_key(self, blob: int) -> str | None:
        """The key of the first tensor stored in ``blob``; None when no tensor lies in it."""
        return next((t.key for t in self.tensors if t.blob == blob), None)


def max_header_objects(header_bytes: int) -> int:
    """How many lists, tuples, maps, tensor references and big ints a header of this size may hold."""
    return HEADER_FREE_OBJECTS + header_bytes // HEADER_BYTES_PER_OBJECT


def max_tuple_bytes(header_bytes: int) -> int:
    """How many bytes of tuple payloads (all levels together) a header of this size may hold."""
    return min(MAX_TUPLE_BYTES, TUPLE_FREE_BYTES + TUPLE_COPIES * header_bytes)


def tensor_size_problem(
    shape: tuple[int, ...] | list[int], stride: tuple[int, ...] | list[int], size: int
) -> str | None:
    """Why torch cannot view a tensor of ``shape``, ``stride`` and element ``size`` bytes; None if it can.

    ``shape`` and ``stride`` are non-negative ints of the same length. Refused: a dimension or
    stride beyond :data:`MAX_INDEX`; a product of the non-zero dimensions times ``size`` beyond it
    (torch multiplies every dimension, even when one is 0, and a tensor's bytes must fit int64);
    a span ``(sum of stride * (n - 1) over non-zero n, plus 1) * size`` beyond it.
    """
    if max((*shape, *stride), default=0) > MAX_INDEX:
        return f"has a shape {list(shape)!r} or stride {list(stride)!r} beyond {MAX_INDEX}"
    elements = size
    span = 1
    for n, step in zip(shape, stride, strict=True):
        if n:
            elements *= n
            span += (n - 1) * step
            if elements > MAX_INDEX:
                return f"has a shape {list(shape)!r} of more than {MAX_INDEX} bytes: beyond {MAX_INDEX}"
    if span * size > MAX_INDEX:
        spanned = f"spanning {span * size} bytes: beyond {MAX_INDEX}"
        return f"has a shape {list(shape)!r} and stride {list(stride)!r} {spanned}"
    return None


def parse_version(text: str) -> tuple[int, int] | None:
    """``"1.0"`` → ``(1, 0)``; None when ``text`` is not a semantic version."""
    match = _SEMVER.match(text)
    return (int(match[1]), int(match[2])) if match else None


def align_up(n: int) -> int:
    """``n`` rounded up to the next multiple of :data:`ALIGN`."""
    return (n + ALIGN - 1) // ALIGN * ALIGN
