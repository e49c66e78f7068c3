"""On-disk format v1: layout constants, header encoding, writing, and checked reading.

The byte-level specification is docs/FORMAT.md; this module is its implementation. Layout::

    [0, 64)            prelude: magic, format version, required release, CRC32C
    [64, 4096)         zero padding
    [4096, H)          blobs, each at a 4 KiB-aligned offset, zero padding between
    [H, H + L)         header: msgpack map (metadata, tree, blob and tensor tables)
    [H + L, H + L+64)  trailer: header offset/length/CRC32C, file size, CRC32C, magic

The header sits after the blobs so that a file is written in one sequential pass, checksumming
each chunk just before it is written, while it is still in the CPU cache.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO, Protocol

import crc32c
import msgpack
import torch

from ._version import __version__
from .dtypes import DTYPE_BY_NAME, dtype_name, itemsize
from .errors import CorruptedCheckpointError, UnsupportedVersionError

MAGIC = b"ASYNCKPT"
TRAILER_MAGIC = b"ACKPTEND"
FORMAT_VERSION = "1.0"
READABLE_MAJORS = (1,)
READS_TEXT = "0.x and 1.x"  # legacy torch.save files are "0.x"
REQUIRES_RELEASE = "0.1.0"  # the first asyncckpt release that reads FORMAT_VERSION
FORMAT_NAME = "asyncckpt"
STATUS_COMPLETE = "complete"

PRELUDE_SIZE = 64
TRAILER_SIZE = 64
ALIGN = 4096
DATA_OFFSET = ALIGN
CHUNK = 8 << 20  # bytes written (and checksummed on read) per call
PARALLEL_CRC_MIN = 1 << 20  # blobs at least this large are checksummed beside the write

MAX_HEADER_BYTES = 64 << 20
# msgpack hands each extension payload to the decoder as a fresh copy, so nested tuples copy
# their contents once per level: the total of all tuple payloads bounds the decoder's memory.
MAX_TUPLE_BYTES = 2 * MAX_HEADER_BYTES
MAX_TENSORS = 1_000_000
MAX_BLOBS = MAX_TENSORS
MAX_NDIM = 64
MAX_DEPTH = 128
MAX_VERSION_FIELD = 16
MAX_STEP = 2**63 - 1  # steps are 0..MAX_STEP (file names hold at most 19 digits)
MAX_INDEX = 2**63 - 1  # bound of every dimension, stride and element count (torch's int64)

_PRELUDE = struct.Struct("<8s16s16s20sI")  # magic, version, requires, reserved, crc
_TRAILER = struct.Struct("<QQQI24sI8s")  # hdr off, hdr len, file size, hdr crc, reserved, crc, magic
_TRAILER_CRC_AT = 52
_HAVE_NUMPY = importlib.util.find_spec("numpy") is not None
_SEMVER = re.compile(r"^(\d{1,6})\.(\d{1,6})(?:\.(\d{1,6}))?$")

EXT_TUPLE = 1
EXT_TENSOR = 2
EXT_BIGINT = 3


@dataclass(frozen=True)
class TensorRef:
    """A tensor's place in the tree: an index into the tensor table."""

    index: int


@dataclass(frozen=True)
class BigInt:
    """A Python int beyond msgpack's 64-bit integers."""

    value: int


@dataclass(frozen=True)
class BlobEntry:
    """Where one blob lies in the file and its CRC32C."""

    offset: int
    nbytes: int
    crc: int


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the table: a strided view into a blob."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    blob: int
    offset: int


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
        return next((t.key for t in self.tensors if t.blob == blob), f"blob {blob}")


class Sink(Protocol):
    """Where the writer's bytes go; ``write`` writes all of ``data`` or raises."""

    def write(self, data: memoryview | bytes) -> None: ...


# --------------------------------------------------------------------------- writing


def blob_offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    """File offsets of blobs of ``sizes`` and the offset just past the last one."""
    offsets = []
    position = DATA_OFFSET
    for size in sizes:
        offsets.append(position)
        position = align_up(position + size)
    end = offsets[-1] + sizes[-1] if sizes else DATA_OFFSET
    return offsets, end


def align_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy view of the bytes of a contiguous CPU tensor; the view keeps the tensor alive."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    nbytes = tensor.numel() * itemsize(tensor.dtype)
    if nbytes == 0:
        return memoryview(bytearray(0))
    if _HAVE_NUMPY:  # 4x cheaper than a ctypes array (a new ctypes type per size)
        flat = tensor.detach().as_strided((tensor.numel(),), (1,))  # a size-1 dim may carry any stride
        array_: Any = flat.view(torch.uint8).numpy()  # keeps the tensor alive
        return memoryview(array_).cast("B")
    array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    array._owner = tensor  # type: ignore[attr-defined]  # keeps the memory alive with the view
    return memoryview(array).cast("B")


def encode_prelude(version: str = FORMAT_VERSION, requires: str = REQUIRES_RELEASE) -> bytes:
    """The 64-byte prelude: magic, version, required release, CRC32C of the first 60 bytes."""
    body = _PRELUDE.pack(MAGIC, version.encode("ascii"), requires.encode("ascii"), b"", 0)
    return body[:-4] + struct.pack("<I", crc32c.crc32c(body[:-4]))


def encode_header(
    *,
    step: int,
    metadata: Any,
    tree: Any,
    tensors: Sequence[Any],
    blobs: Sequence[BlobEntry],
    created: str | None = None,
) -> bytes:
    """The msgpack header. ``tensors`` are objects with the attributes of :class:`TensorEntry`."""
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "status": STATUS_COMPLETE,
        "step": step,
        "created": created or datetime.now(UTC).isoformat(timespec="microseconds"),
        "writer": f"asyncckpt {__version__}",
        "metadata": metadata,
        "blobs": [[b.offset, b.nbytes, b.crc] for b in blobs],
        "tensors": [
            [t.key, dtype_name(t.dtype), list(t.shape), list(t.stride), t.blob, t.offset] for t in tensors
        ],
        "tree": tree,
    }
    encoder = _Encoder()
    packed = encoder.pack(header)
    # Never write a header that readers refuse.
    if len(packed) > MAX_HEADER_BYTES:
        raise ValueError(
            f"the header would take {len(packed)} bytes, more than the limit of {MAX_HEADER_BYTES}; "
            "store large values as tensors"
        )
    if encoder.tuple_bytes > MAX_TUPLE_BYTES:
        raise ValueError(
            f"tuples in the state nest {encoder.tuple_bytes} bytes in total, more than the limit of "
            f"{MAX_TUPLE_BYTES}; use lists or tensors for large nested data"
        )
    return packed


def encode_trailer(header_offset: int, header: bytes) -> bytes:
    file_size = header_offset + len(header) + TRAILER_SIZE
    body = _TRAILER.pack(header_offset, len(header), file_size, crc32c.crc32c(header), b"", 0, TRAILER_MAGIC)
    crc = crc32c.crc32c(body[:_TRAILER_CRC_AT])
    return body[:_TRAILER_CRC_AT] + struct.pack("<I", crc) + TRAILER_MAGIC


def write_checkpoint(
    sink: Sink,
    *,
    step: int,
    metadata: Any,
    tree: Any,
    tensors: Sequence[Any],
    sizes: Sequence[int],
    blobs: Iterable[memoryview],
) -> int:
    """Write a whole v1 file to ``sink`` in one sequential pass; return its size in bytes.

    ``blobs`` yields the bytes of each blob (``sizes`` says how many, in order); large blobs are
    checksummed in a helper thread while they are written.
    Raises ``TypeError`` / ``ValueError`` from :func:`check_step` before writing anything.
    """
    check_step(step)
    offsets, _ = blob_offsets(sizes)
    sink.write(encode_prelude())
    position = PRELUDE_SIZE
    crcs: list[Future[int] | int] = []
    # CRC32C of large blobs runs in a second thread while this one writes the same bytes
    # (both release the GIL), so checksumming costs no time on the write path.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncckpt-crc") as checksummer:
        for offset, size, data in zip(offsets, sizes, blobs, strict=True):
            if len(data) != size:
                raise ValueError(f"blob at {offset} has {len(data)} bytes, expected {size}")
            sink.write(bytes(offset - position))
            if size >= PARALLEL_CRC_MIN:
                crcs.append(checksummer.submit(crc32c.crc32c, data))
                write_all(sink, data)
            else:
                crcs.append(crc32c.crc32c(data))
                sink.write(data)
            position = offset + size
        checksums = [c if isinstance(c, int) else c.result() for c in crcs]
    entries = [BlobEntry(o, n, c) for o, n, c in zip(offsets, sizes, checksums, strict=True)]
    header = encode_header(step=step, metadata=metadata, tree=tree, tensors=tensors, blobs=entries)
    header_offset = max(position, DATA_OFFSET)
    sink.write(bytes(header_offset - position))
    sink.write(header)
    sink.write(encode_trailer(header_offset, header))
    return header_offset + len(header) + TRAILER_SIZE


def check_step(step: Any) -> None:
    """Raise ``TypeError`` unless ``step`` is an int, ``ValueError`` unless 0 <= step <= MAX_STEP.

    Writers call this before writing, so that no file is written that readers would refuse.
    """
    if not isinstance(step, int) or isinstance(step, bool):
        raise TypeError(f"step must be an int, got {type(step).__qualname__}")
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be in [0, {MAX_STEP}], got {step}")


def write_all(sink: Sink, data: memoryview) -> None:
    """Write ``data`` in CHUNK-sized calls (bounded syscalls, responsive to faults)."""
    for start in range(0, len(data), CHUNK):
        sink.write(data[start : start + CHUNK])


# --------------------------------------------------------------------------- msgpack tree


class _Encoder:
    """msgpack with exact types; counts the bytes of all tuple payloads (see MAX_TUPLE_BYTES)."""

    def __init__(self) -> None:
        self.tuple_bytes = 0

    def pack(self, value: Any) -> bytes:
        packed: bytes = msgpack.packb(value, default=self.default, strict_types=True, use_bin_type=True)
        return packed

    def default(self, value: Any) -> Any:
        if isinstance(value, tuple):
            payload = self.pack(list(value))
            self.tuple_bytes += len(payload)
            return msgpack.ExtType(EXT_TUPLE, payload)
        if isinstance(value, TensorRef):
            return msgpack.ExtType(EXT_TENSOR, self.pack(value.index))
        if isinstance(value, BigInt):
            length = (value.value.bit_length() + 8) // 8
            return msgpack.ExtType(EXT_BIGINT, value.value.to_bytes(length, "big", signed=True))
        raise TypeError(f"cannot encode {type(value).__qualname__}")


def pack(value: Any) -> bytes:
    """msgpack with exact types: tuples, tensor refs and big ints as extension types."""
    return _Encoder().pack(value)


def unpack(data: bytes) -> Any:
    """Inverse of :func:`pack`; nesting deeper than MAX_DEPTH, or tuples holding more than
    MAX_TUPLE_BYTES in total, raise ``ValueError``."""
    depth = 0
    tuple_bytes = 0

    def hook(code: int, payload: bytes) -> Any:
        nonlocal depth, tuple_bytes
        if code == EXT_TENSOR:
            index = msgpack.unpackb(payload)
            if not isinstance(index, int) or isinstance(index, bool):
                raise ValueError("tensor reference is not an int")
            return TensorRef(index)
        if code == EXT_BIGINT:
            return BigInt(int.from_bytes(payload, "big", signed=True))
        if code != EXT_TUPLE:
            raise ValueError(f"unknown msgpack extension type {code}")
        tuple_bytes += len(payload)
        if tuple_bytes > MAX_TUPLE_BYTES:
            raise ValueError(f"tuples nest more than {MAX_TUPLE_BYTES} bytes in total")
        depth += 1
        # The root of a tree is depth 0, so MAX_DEPTH + 1 tuples may nest (as in flatten).
        if depth > MAX_DEPTH + 1:
            raise ValueError(f"nesting deeper than {MAX_DEPTH} levels")
        try:
            items = _unpack_raw(payload, hook)
        finally:
            depth -= 1
        if not isinstance(items, list):
            raise ValueError("tuple payload is not an array")
        return tuple(items)

    return _unpack_raw(data, hook)


def _unpack_raw(data: bytes, hook: Callable[[int, bytes], Any]) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=hook, use_list=True)


# --------------------------------------------------------------------------- reading


def parse_version(text: str) -> tuple[int, int] | None:
    """``"1.0"`` → ``(1, 0)``; None when ``text`` is not a semantic version."""
    match = _SEMVER.match(text)
    return (int(match[1]), int(match[2])) if match else None


def check_prelude(prelude: bytes, path: str) -> str:
    """Check magic, version and CRC of the first 64 bytes; return the version string."""
    if len(prelude) < PRELUDE_SIZE:
        raise CorruptedCheckpointError(
            f"{path}: truncated: {len(prelude)} bytes, shorter than the {PRELUDE_SIZE}-byte prelude"
        )
    magic, raw_version, raw_requires, _, crc = _PRELUDE.unpack(prelude[:PRELUDE_SIZE])
    if magic != MAGIC:
        raise CorruptedCheckpointError(f"{path}: not an asyncckpt checkpoint (bad magic {magic!r})")
    crc_ok = crc32c.crc32c(prelude[: PRELUDE_SIZE - 4]) == crc
    version = bytes(raw_version).rstrip(b"\0").decode("ascii", "replace")
    requires = bytes(raw_requires).rstrip(b"\0").decode("ascii", "replace")
    parsed = parse_version(version)
    # A newer major may checksum its prelude differently: judge its version before the CRC.
    if parsed is not None and parsed[0] > max(READABLE_MAJORS):
        raise UnsupportedVersionError(unsupported_version_message(path, version, requires))
    if not crc_ok:
        raise CorruptedCheckpointError(f"{path}: prelude checksum mismatch (bytes 0-{PRELUDE_SIZE})")
    if parsed is None or parsed[0] not in READABLE_MAJORS:
        raise UnsupportedVersionError(unsupported_version_message(path, version, requires))
    return version


def unsupported_version_message(path: str, version: str, requires: str) -> str:
    """The deterministic text of :class:`UnsupportedVersionError`."""
    if parse_version(version) is None:
        text = f"{path}: checkpoint format version {version!r} is not a semantic version; "
        text += f"asyncckpt {__version__} reads {READS_TEXT}"
    else:
        text = f"{path}: checkpoint format {version} is not supported by asyncckpt {__version__} "
        text += f"(reads {READS_TEXT})"
    if requires:
        text += f"; it requires asyncckpt >= {requires}"
    return text


def read_header_bytes(file: BinaryIO, path: str) -> tuple[str, bytes, int, int]:
    """Check prelude, trailer and the header's CRC32C without decoding it.

    Returns the version, the raw header, its offset and the file size. This is the structural
    check the writer runs on every committed file (it knows what the header says).
    """
    file.seek(0, 2)
    size = file.tell()
    file.seek(0)
    version = check_prelude(file.read(PRELUDE_SIZE), path)
    if size < DATA_OFFSET + TRAILER_SIZE:
        raise CorruptedCheckpointError(f"{path}: truncated: {size} bytes, too short for a v1 file")
    file.seek(size - TRAILER_SIZE)
    header_offset, header_len, header_crc = _check_trailer(file.read(TRAILER_SIZE), size, path)
    file.seek(header_offset)
    raw = file.read(header_len)
    if len(raw) != header_len:
        raise CorruptedCheckpointError(f"{path}: truncated while reading the header at {header_offset}")
    if crc32c.crc32c(raw) != header_crc:
        raise CorruptedCheckpointError(
            f"{path}: header checksum mismatch at offset {header_offset} ({header_len} bytes)"
        )
    return version, raw, header_offset, size


def read_layout(file: BinaryIO, path: str) -> Layout:
    """Read and check prelude, trailer and header of an open file; no blob is read.

    Raises :class:`CorruptedCheckpointError` or :class:`UnsupportedVersionError` saying what
    failed and where. Every length is checked against the file size before it is used.
    """
    version, raw, header_offset, size = read_header_bytes(file, path)
    try:
        header = unpack(raw)
    except msgpack.StackError:  # raised without a message
        raise CorruptedCheckpointError(
            f"{path}: header at offset {header_offset} does not decode: it nests deeper than "
            f"{MAX_DEPTH} levels"
        ) from None
    except Exception as exc:  # msgpack raises many types on hostile bytes
        reason = str(exc) or type(exc).__name__
        raise CorruptedCheckpointError(
            f"{path}: header at offset {header_offset} does not decode: {reason}"
        ) from None
    return _HeaderChecker(header, version, header_offset, size, path).layout()


def _check_trailer(trailer: bytes, size: int, path: str) -> tuple[int, int, int]:
    header_offset, header_len, file_size, header_crc, _, crc, magic = _TRAILER.unpack(trailer)
    where = f"trailer at offset {size - TRAILER_SIZE}"
    if magic != TRAILER_MAGIC:
        raise CorruptedCheckpointError(f"{path}: truncated or torn: no trailer magic ({where})")
    if crc32c.crc32c(trailer[:_TRAILER_CRC_AT]) != crc:
        raise CorruptedCheckpointError(f"{path}: trailer checksum mismatch ({where})")
    if file_size != size:
        raise CorruptedCheckpointError(
            f"{path}: truncated or extended: the trailer says {file_size} bytes, the file has {size}"
        )
    if header_len > MAX_HEADER_BYTES:
        raise CorruptedCheckpointError(
            f"{path}: header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes"
        )
    if header_offset < DATA_OFFSET or header_offset + header_len + TRAILER_SIZE != size:
        raise CorruptedCheckpointError(
            f"{path}: header at {header_offset} (+{header_len}) does not end at the trailer ({where})"
        )
    return header_offset, header_len, header_crc


class _HeaderChecker:
    """Checks every field of a decoded header before anything trusts it."""

    def __init__(self, header: Any, version: str, header_offset: int, size: int, path: str) -> None:
        self.header = header
        self.version = version
        self.header_offset = header_offset
        self.size = size
        self.path = path

    def fail(self, what: str) -> CorruptedCheckpointError:
        return CorruptedCheckpointError(f"{self.path}: bad header: {what}")

    def field(self, name: str, kind: type | tuple[type, ...]) -> Any:
        value = self.header.get(name)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise self.fail(f"field {name!r} is missing or of the wrong type")
        return value

    def layout(self) -> Layout:
        if not isinstance(self.header, dict):
            raise self.fail("not a map")
        if self.field("format", str) != FORMAT_NAME:
            raise self.fail(f"format is {self.header['format']!r}, expected {FORMAT_NAME!r}")
        if self.field("version", str) != self.version:
            raise self.fail(f"version {self.header['version']!r} differs from the prelude's {self.version!r}")
        status = self.field("status", str)
        if status != STATUS_COMPLETE:
            raise self.fail(f"status is {status!r}, not {STATUS_COMPLETE!r}")
        blobs = self.blobs()
        tensors = self.tensors(blobs)
        tree = self.header.get("tree")
        _check_tree(tree, len(tensors), self.fail)
        metadata = self.header.get("metadata")
        _check_tree(metadata, 0, self.fail)
        step = self.field("step", int)
        if not 0 <= step <= MAX_STEP:
            raise self.fail(f"step {step} is outside [0, {MAX_STEP}]")
        return Layout(
            version=self.version,
            step=step,
            created=self.field("created", str),
            writer=self.field("writer", str),
            metadata=metadata,
            tree=tree,
            blobs=blobs,
            tensors=tensors,
            header_offset=self.header_offset,
            file_size=self.size,
        )

    def blobs(self) -> tuple[BlobEntry, ...]:
        rows = self.field("blobs", list)
        if len(rows) > MAX_BLOBS:
            raise self.fail(f"{len(rows)} blobs exceed the limit of {MAX_BLOBS}")
        entries = []
        end = DATA_OFFSET
        for i, row in enumerate(rows):
            if not _int_list(row, 3):
                raise self.fail(f"blob {i} is not [offset, nbytes, crc]")
            offset, nbytes, crc = row
            if crc > 0xFFFFFFFF:
                raise self.fail(f"blob {i} has a crc32c of {crc}, more than 32 bits")
            if offset < end or offset % ALIGN or offset + nbytes > self.header_offset:
                raise self.fail(
                    f"blob {i} at offset {offset} (+{nbytes}) lies outside the data region "
                    f"[{end}, {self.header_offset}) or is not {ALIGN}-byte aligned"
                )
            end = offset + nbytes
            entries.append(BlobEntry(offset, nbytes, crc))
        return tuple(entries)

    def tensors(self, blobs: tuple[BlobEntry, ...]) -> tuple[TensorEntry, ...]:
        rows = self.field("tensors", list)
        if len(rows) > MAX_TENSORS:
            raise self.fail(f"{len(rows)} tensors exceed the limit of {MAX_TENSORS}")
        return tuple(self.tensor(i, row, blobs) for i, row in enumerate(rows))

    def tensor(self, i: int, row: Any, blobs: tuple[BlobEntry, ...]) -> TensorEntry:
        if not (isinstance(row, list) and len(row) == 6 and all(isinstance(v, str) for v in row[:2])):
            raise self.fail(f"tensor {i} is not [key, dtype, shape, stride, blob, offset]")
        key, dtype_text, shape, stride, blob, offset = row
        where = f"tensor {i} ({key})"
        dtype = DTYPE_BY_NAME.get(dtype_text)
        if dtype is None:
            raise self.fail(f"{where} has unknown dtype {dtype_text!r}")
        if not (_int_list(shape, None) and _int_list(stride, len(shape)) and len(shape) <= MAX_NDIM):
            raise self.fail(f"{where} has a bad shape {shape!r} or stride {stride!r}")
        if max((*shape, *stride), default=0) > MAX_INDEX or math.prod(shape) > MAX_INDEX:
            raise self.fail(f"{where} has a shape {shape!r} or stride {stride!r} beyond {MAX_INDEX}")
        if not (_is_int(blob) and 0 <= blob < len(blobs) and _is_int(offset) and offset >= 0):
            raise self.fail(f"{where} refers to blob {blob!r} at {offset!r}, which does not exist")
        size = itemsize(dtype)
        if offset % size or offset + _extent(shape, stride, size) > blobs[blob].nbytes:
            raise self.fail(f"{where} does not fit inside blob {blob} ({blobs[blob].nbytes} bytes)")
        return TensorEntry(key, dtype, tuple(shape), tuple(stride), blob, offset)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any, length: int | None) -> bool:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        return False
    return all(_is_int(v) and v >= 0 for v in value)


def _extent(shape: Sequence[int], stride: Sequence[int], size: int) -> int:
    if any(s == 0 for s in shape):
        return 0
    return (sum((n - 1) * st for n, st in zip(shape, stride, strict=True)) + 1) * size


def _check_tree(tree: Any, n_tensors: int, fail: Callable[[str], Exception]) -> None:
    """Every tensor ref in range, every dict key a str or an int, nesting bounded."""
    stack: list[tuple[Any, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise fail(f"tree nesting deeper than {MAX_DEPTH} levels")
        if isinstance(node, TensorRef):
            if not 0 <= node.index < n_tensors:
                raise fail(f"tree refers to tensor {node.index}; the table has {n_tensors}")
        elif isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, bool) or not isinstance(key, str | int):
                    raise fail(f"tree has a dict key of type {type(key).__name__}")
                stack.append((value, depth + 1))
        elif isinstance(node, list | tuple):
            stack.extend((value, depth + 1) for value in node)
        elif not (node is None or isinstance(node, bool | int | float | str | bytes | BigInt)):
            raise fail(f"tree holds a value of type {type(node).__name__}")


def read_blob_into(
    file: BinaryIO, layout: Layout, index: int, dest: memoryview, *, verify: bool, path: str
) -> None:
    """Read blob ``index`` straight into ``dest`` (its exact size), checking its CRC32C if ``verify``."""
    blob = layout.blobs[index]
    assert len(dest) == blob.nbytes
    file.seek(blob.offset)
    crc = 0
    for start in range(0, blob.nbytes, CHUNK):
        chunk = dest[start : start + CHUNK]
        got = file.readinto(chunk)  # type: ignore[attr-defined]
        if got != len(chunk):
            raise _truncated_blob(layout, index, start, path)
        if verify:
            crc = crc32c.crc32c(chunk, crc)
    if verify and crc != blob.crc:
        raise _crc_mismatch(layout, index, crc, path)


def verify_crc(layout: Layout, index: int, data: memoryview, *, path: str) -> None:
    """Check the CRC32C of blob ``index`` whose bytes ``data`` already holds."""
    crc = crc32c.crc32c(data)
    if crc != layout.blobs[index].crc:
        raise _crc_mismatch(layout, index, crc, path)


def check_blob(file: BinaryIO, layout: Layout, index: int, *, path: str, scratch: memoryview) -> None:
    """Read blob ``index`` chunk by chunk through ``scratch`` and check its CRC32C; keep nothing.

    ``scratch`` may be any size; :data:`CHUNK` bytes is enough. Raises
    :class:`CorruptedCheckpointError` like :func:`read_blob_into`.
    """
    blob = layout.blobs[index]
    file.seek(blob.offset)
    crc = 0
    for start in range(0, blob.nbytes, len(scratch)):
        chunk = scratch[: min(len(scratch), blob.nbytes - start)]
        got = file.readinto(chunk)  # type: ignore[attr-defined]
        if got != len(chunk):
            raise _truncated_blob(layout, index, start, path)
        crc = crc32c.crc32c(chunk, crc)
    if crc != blob.crc:
        raise _crc_mismatch(layout, index, crc, path)


def _truncated_blob(layout: Layout, index: int, start: int, path: str) -> CorruptedCheckpointError:
    offset = layout.blobs[index].offset + start
    return CorruptedCheckpointError(f"{path}: truncated inside {layout.blob_key(index)} at offset {offset}")


def _crc_mismatch(layout: Layout, index: int, crc: int, path: str) -> CorruptedCheckpointError:
    blob = layout.blobs[index]
    return CorruptedCheckpointError(
        f"{path}: checksum mismatch in {layout.blob_key(index)} (blob {index} at offset "
        f"{blob.offset}, {blob.nbytes} bytes): expected crc32c {blob.crc:08x}, found {crc:08x}"
    )


def view_tensor(entry: TensorEntry, blob: torch.Tensor) -> torch.Tensor:
    """The tensor ``entry`` describes, as a view of ``blob`` (a 1-D uint8 tensor)."""
    size = itemsize(entry.dtype)
    view = torch.empty(0, dtype=entry.dtype, device=blob.device)
    offset = (blob.storage_offset() + entry.offset) // size
    view.set_(blob.untyped_storage(), offset, entry.shape, entry.stride)
    return view


def verify_blobs(file: BinaryIO, layout: Layout, *, path: str, scratch_bytes: int = CHUNK) -> None:
    """Re-read every blob through one small scratch buffer and check its CRC32C (:func:`check_blob`)."""
    scratch = memoryview(bytearray(scratch_bytes))
    for index in range(len(layout.blobs)):
        check_blob(file, layout, index, path=path, scratch=scratch)
