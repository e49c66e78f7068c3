"""Reading a v1 file's structure: prelude, trailer and header, every field checked before use.

No blob is read here (see :mod:`.blobs`). Every length is checked against the file size or a
limit before it is trusted, so a hostile file gets a :class:`CorruptedCheckpointError` naming
what failed and where (``path``, ``offset``, ``blob``, ``key``), never an allocation of its
declared size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

import crc32c
import msgpack

from .._version import __version__
from ..dtypes import DTYPE_BY_NAME, itemsize
from ..errors import CorruptedCheckpointError, UnsupportedVersionError, Where
from . import spec
from .codec import unpack
from .rows import usual_tensor
from .spec import (
    ALIGN,
    DATA_OFFSET,
    FORMAT_NAME,
    MAGIC,
    PRELUDE,
    PRELUDE_SIZE,
    READABLE_MAJORS,
    READS_TEXT,
    STATUS_COMPLETE,
    TRAILER,
    TRAILER_CRC_AT,
    TRAILER_MAGIC,
    TRAILER_SIZE,
    BigInt,
    BlobEntry,
    Layout,
    TensorEntry,
    TensorRef,
    TypedValue,
    parse_version,
)


def check_prelude(prelude: bytes, path: Where = None) -> str:
    """Check magic, version and CRC of the first 64 bytes; return the version string.

    Raises :class:`CorruptedCheckpointError` (short, bad magic, checksum mismatch) or
    :class:`UnsupportedVersionError` (a major this release does not read).
    """
    if len(prelude) < PRELUDE_SIZE:
        raise CorruptedCheckpointError(
            f"truncated: {len(prelude)} bytes, shorter than the {PRELUDE_SIZE}-byte prelude",
            path=path,
            offset=len(prelude),
        )
    magic, raw_version, raw_requires, _, crc = PRELUDE.unpack(prelude[:PRELUDE_SIZE])
    if magic != MAGIC:
        raise CorruptedCheckpointError(
            f"not an asyncckpt checkpoint (bad magic {magic!r})", path=path, offset=0
        )
    crc_ok = crc32c.crc32c(prelude[: PRELUDE_SIZE - 4]) == crc
    version = bytes(raw_version).rstrip(b"\0").decode("ascii", "replace")
    requires = bytes(raw_requires).rstrip(b"\0").decode("ascii", "replace")
    parsed = parse_version(version)
    # A newer major may checksum its prelude differently: judge its version before the CRC.
    if parsed is not None and parsed[0] > max(READABLE_MAJORS):
        raise unsupported_version(version, requires, path=path)
    if not crc_ok:
        raise CorruptedCheckpointError(
            f"prelude checksum mismatch (bytes 0-{PRELUDE_SIZE})", path=path, offset=0
        )
    if parsed is None or parsed[0] not in READABLE_MAJORS:
        raise unsupported_version(version, requires, path=path)
    return version


def unsupported_version(version: str, requires: str, *, path: Where = None) -> UnsupportedVersionError:
    """The error for a file of format ``version`` that this release does not read.

    Its text is deterministic (docs/FORMAT.md); ``requires`` is the prelude's required release.
    """
    if parse_version(version) is None:
        text = f"checkpoint format version {version!r} is not a semantic version; "
        text += f"asyncckpt {__version__} reads {READS_TEXT}"
    else:
        text = f"checkpoint format {version} is not supported by asyncckpt {__version__} "
        text += f"(reads {READS_TEXT})"
    if requires:
        text += f"; it requires asyncckpt >= {requires}"
    return UnsupportedVersionError(text, path=path)


def read_header_bytes(file: BinaryIO, path: Where = None) -> tuple[str, bytes, int, int]:
    """Check prelude, trailer and the header's CRC32C of an open file without decoding the header.

    Returns the version, the raw header, its offset and the file size. This is the structural
    check the writer runs on every committed file (it knows what the header says).
    """
    file.seek(0, 2)
    size = file.tell()
    file.seek(0)
    version = check_prelude(file.read(PRELUDE_SIZE), path)
    if size < DATA_OFFSET + TRAILER_SIZE:
        raise CorruptedCheckpointError(
            f"truncated: {size} bytes, too short for a v1 file", path=path, offset=size
        )
    file.seek(size - TRAILER_SIZE)
    header_offset, header_len, header_crc = _check_trailer(file.read(TRAILER_SIZE), size, path)
    file.seek(header_offset)
    raw = file.read(header_len)
    if len(raw) != header_len:
        raise CorruptedCheckpointError(
            f"truncated while reading the header at {header_offset}", path=path, offset=header_offset
        )
    if crc32c.crc32c(raw) != header_crc:
        raise CorruptedCheckpointError(
            f"header checksum mismatch at offset {header_offset} ({header_len} bytes)",
            path=path,
            offset=header_offset,
        )
    return version, raw, header_offset, size


def read_layout(file: BinaryIO, path: Where = None) -> Layout:
    """Read and check prelude, trailer and header of an open file; no blob is read.

    Raises :class:`CorruptedCheckpointError` or :class:`UnsupportedVersionError` saying what
    failed and where. Every length is checked against the file size before it is used.
    """
    version, raw, header_offset, size = read_header_bytes(file, path)
    try:
        header = unpack(raw)
    except msgpack.StackError:  # raised without a message
        raise CorruptedCheckpointError(
            f"header at offset {header_offset} does not decode: it nests deeper than {spec.MAX_DEPTH} levels",
            path=path,
            offset=header_offset,
        ) from None
    except Exception as exc:  # msgpack raises many types on hostile bytes
        reason = str(exc) or type(exc).__name__
        raise CorruptedCheckpointError(
            f"header at offset {header_offset} does not decode: {reason}", path=path, offset=header_offset
        ) from None
    return _HeaderChecker(header, version, header_offset, size, path).layout()


def _check_trailer(trailer: bytes, size: int, path: Where) -> tuple[int, int, int]:
    header_offset, header_len, file_size, header_crc, _, crc, magic = TRAILER.unpack(trailer)
    at = size - TRAILER_SIZE
    where = f"trailer at offset {at}"

    def corrupted(reason: str) -> CorruptedCheckpointError:
        return CorruptedCheckpointError(reason, path=path, offset=at)

    if magic != TRAILER_MAGIC:
        raise corrupted(f"truncated or torn: no trailer magic ({where})")
    if crc32c.crc32c(trailer[:TRAILER_CRC_AT]) != crc:
        raise corrupted(f"trailer checksum mismatch ({where})")
    if file_size != size:
        raise corrupted(f"truncated or extended: the trailer says {file_size} bytes, the file has {size}")
    if header_len > spec.MAX_HEADER_BYTES:
        raise corrupted(f"header length {header_len} exceeds the limit of {spec.MAX_HEADER_BYTES} bytes")
    if header_offset < DATA_OFFSET or header_offset + header_len + TRAILER_SIZE != size:
        raise corrupted(f"header at {header_offset} (+{header_len}) does not end at the trailer ({where})")
    return header_offset, header_len, header_crc


class _HeaderChecker:
    """Checks every field of a decoded header before anything trusts it."""

    def __init__(self, header: Any, version: str, header_offset: int, size: int, path: Where) -> None:
        self.header = header
        self.version = version
        self.header_offset = header_offset
        self.size = size
        self.path = path

    def fail(self, what: str, *, blob: int | None = None, key: Any = None) -> CorruptedCheckpointError:
        return CorruptedCheckpointError(
            f"bad header: {what}",
            path=self.path,
            offset=self.header_offset,
            blob=blob,
            key=key if isinstance(key, str) else None,
        )

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
        _check_tree(tree, tensors, self.fail)
        metadata = self.header.get("metadata")
        _check_tree(metadata, (), self.fail)
        step = self.field("step", int)
        if not 0 <= step <= spec.MAX_STEP:
            raise self.fail(f"step {step} is outside [0, {spec.MAX_STEP}]")
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
        if len(rows) > spec.MAX_BLOBS:
            raise self.fail(f"{len(rows)} blobs exceed the limit of {spec.MAX_BLOBS}")
        entries = []
        end = DATA_OFFSET
        limit, max_crc = self.header_offset, spec.MAX_CRC
        for i, row in enumerate(rows):
            # Runs once per blob of every file read: the usual row is accepted in one condition;
            # anything else goes to blob(), which raises the precise error.
            if type(row) is list and len(row) == 3:
                offset, nbytes, crc = row
                if (
                    type(offset) is int
                    and type(nbytes) is int
                    and type(crc) is int
                    and 0 <= crc <= max_crc
                    and nbytes >= 0
                    and end <= offset
                    and not offset % ALIGN
                    and offset + nbytes <= limit
                ):
                    end = offset + nbytes
                    entries.append(BlobEntry(offset, nbytes, crc))
                    continue
            entry = self.blob(i, row, end)
            end = entry.offset + entry.nbytes
            entries.append(entry)
        return tuple(entries)

    def blob(self, i: int, row: Any, end: int) -> BlobEntry:
        """Blob ``i`` of the table, checked; ``end``: where the blob before it ends."""
        if not _int_list(row, 3):
            raise self.fail(f"blob {i} is not [offset, nbytes, crc]", blob=i)
        offset, nbytes, crc = row
        if crc > spec.MAX_CRC:
            raise self.fail(f"blob {i} has a crc32c of {crc}, more than 32 bits", blob=i)
        if offset < end or offset % ALIGN or offset + nbytes > self.header_offset:
            raise self.fail(
                f"blob {i} at offset {offset} (+{nbytes}) lies outside the data region "
                f"[{end}, {self.header_offset}) or is not {ALIGN}-byte aligned",
                blob=i,
            )
        return BlobEntry(offset, nbytes, crc)

    def tensors(self, blobs: tuple[BlobEntry, ...]) -> tuple[TensorEntry, ...]:
        rows = self.field("tensors", list)
        if len(rows) > spec.MAX_TENSORS:
            raise self.fail(f"{len(rows)} tensors exceed the limit of {spec.MAX_TENSORS}")
        sizes = [blob.nbytes for blob in blobs]
        entries = []
        for i, row in enumerate(rows):
            entry = usual_tensor(row, sizes)
            entries.append(entry if entry is not None else self.tensor(i, row, blobs))
        return tuple(entries)

    def tensor(self, i: int, row: Any, blobs: tuple[BlobEntry, ...]) -> TensorEntry:
        """Tensor ``i`` of the table, checked field by field (a failure says which)."""
        if not (type(row) is list and len(row) == 6 and type(row[0]) is str and type(row[1]) is str):
            raise self.fail(f"tensor {i} is not [key, dtype, shape, stride, blob, offset]")
        key, dtype_text, shape, stride, blob, offset = row
        dtype = DTYPE_BY_NAME.get(dtype_text)
        if dtype is None:
            raise self.fail(f"tensor {i} ({key}) has unknown dtype {dtype_text!r}", key=key)
        if not (_int_list(shape, None) and _int_list(stride, len(shape)) and len(shape) <= spec.MAX_NDIM):
            raise self.fail(f"tensor {i} ({key}) has a bad shape {shape!r} or stride {stride!r}", key=key)
        size = itemsize(dtype)
        problem = spec.tensor_size_problem(shape, stride, size)
        if problem is not None:
            raise self.fail(f"tensor {i} ({key}) {problem}", key=key)
        if not (type(blob) is int and 0 <= blob < len(blobs) and type(offset) is int and offset >= 0):
            raise self.fail(
                f"tensor {i} ({key}) refers to blob {blob!r} at {offset!r}, which does not exist", key=key
            )
        if offset % size or offset + _extent(shape, stride, size) > blobs[blob].nbytes:
            raise self.fail(
                f"tensor {i} ({key}) does not fit inside blob {blob} ({blobs[blob].nbytes} bytes)",
                blob=blob,
                key=key,
            )
        return TensorEntry(key, dtype, tuple(shape), tuple(stride), blob, offset)


def _int_list(value: Any, length: int | None) -> bool:
    """A list of non-negative ints (exactly: msgpack decodes ints as ``int``, never a subclass)."""
    if type(value) is not list or (length is not None and len(value) != length):
        return False
    return all(type(item) is int and item >= 0 for item in value)


def _extent(shape: Sequence[int], stride: Sequence[int], size: int) -> int:
    span = 1
    for n, step in zip(shape, stride, strict=True):
        if not n:
            return 0
        span += (n - 1) * step
    return span * size


def _check_tree(tree: Any, tensors: Sequence[TensorEntry], fail: Callable[[str], Exception]) -> None:
    """Every tensor ref in range (and asking for grad only of a dtype that can have one), every
    dict key a str or an int, nesting bounded.

    Walks depth first with one iterator per open container, so its memory is bounded by the
    depth, not by the size of the tree.
    """
    levels: list[Iterator[Any]] = [iter((tree,))]
    while levels:
        for node in levels[-1]:  # a node's depth is len(levels) - 1; the root's is 0
            kind = type(node)
            if kind in _LEAVES:
                continue
            if kind is TensorRef:
                _check_ref(node, tensors, fail)
                continue
            if kind is TypedValue:  # plain values only: its payload refers to no tensor
                if len(levels) > spec.MAX_DEPTH:
                    raise fail(f"tree nesting deeper than {spec.MAX_DEPTH} levels")
                _check_tree(node.payload, (), fail)
                continue
            if kind is not dict and kind is not list and kind is not tuple:
                raise fail(f"tree holds a value of type {kind.__name__}")
            if node and len(levels) > spec.MAX_DEPTH:  # its items would lie deeper than MAX_DEPTH
                raise fail(f"tree nesting deeper than {spec.MAX_DEPTH} levels")
            if kind is dict:
                _check_keys(node, fail)
                levels.append(iter(node.values()))
            else:
                levels.append(iter(node))
            break
        else:
            levels.pop()


_LEAVES = frozenset({type(None), bool, int, float, str, bytes, BigInt})


def _check_keys(node: dict[Any, Any], fail: Callable[[str], Exception]) -> None:
    for key in node:
        if type(key) is not str and type(key) is not int:  # msgpack gives exact types; never bool
            raise fail(f"tree has a dict key of type {type(key).__name__}")


def _check_ref(ref: TensorRef, tensors: Sequence[TensorEntry], fail: Callable[[str], Exception]) -> None:
    if not 0 <= ref.index < len(tensors):
        raise fail(f"tree refers to tensor {ref.index}; the table has {len(tensors)}")
    dtype = tensors[ref.index].dtype
    if ref.requires_grad and not (dtype.is_floating_point or dtype.is_complex):
        key = tensors[ref.index].key
        raise fail(f"tree asks tensor {ref.index} ({key}) to require grad, which its dtype {dtype} cannot")
