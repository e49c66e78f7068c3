"""Writing a v1 file: prelude, blobs, header and trailer, in one sequential pass.

The header sits after the blobs so that a file is written in one pass, checksumming each chunk
just before (or while) it is written, while it is still in the CPU cache. Every limit a reader
enforces is checked before the first byte is written (:func:`prepare_header`): the header is
encoded up front, all but the small blob table, whose size is bounded (with every checksum at
its widest) before anything is written and which is encoded once the checksums are known.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import crc32c

from .._version import __version__
from ..dtypes import dtype_name, itemsize
from ..errors import StateTooLargeError, UnsupportedValueError
from . import spec
from .codec import Encoder, count_objects, pack, pack_map_header
from .spec import (
    CHUNK,
    DATA_OFFSET,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAGIC,
    PARALLEL_CRC_MIN,
    PRELUDE,
    PRELUDE_SIZE,
    REQUIRES_RELEASE,
    STATUS_COMPLETE,
    TRAILER,
    TRAILER_CRC_AT,
    TRAILER_MAGIC,
    TRAILER_SIZE,
    BlobEntry,
    TensorEntry,
    align_up,
)

_HEADER_FIELDS = 10  # format, version, status, step, created, writer, metadata, blobs, tensors, tree


class Sink(Protocol):
    """Where the writer's bytes go; ``write`` writes all of ``data`` or raises."""

    def write(self, data: memoryview | bytes) -> None: ...


def check_step(step: Any) -> None:
    """Refuse a step the format cannot hold, before anything is written.

    Raises :class:`UnsupportedValueError` (a ``TypeError``) unless ``step`` is an int and
    :class:`StateTooLargeError` (a ``ValueError``) unless ``0 <= step <= MAX_STEP``.
    """
    if not isinstance(step, int) or isinstance(step, bool):
        raise UnsupportedValueError(f"step must be an int, got {type(step).__qualname__}")
    if not 0 <= step <= spec.MAX_STEP:
        raise StateTooLargeError(f"step must be in [0, {spec.MAX_STEP}], got {step}")


def blob_offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    """File offsets of blobs of ``sizes`` and the offset just past the last one."""
    offsets = []
    position = DATA_OFFSET
    for size in sizes:
        offsets.append(position)
        position = align_up(position + size)
    end = offsets[-1] + sizes[-1] if sizes else DATA_OFFSET
    return offsets, end


def encode_prelude(version: str = FORMAT_VERSION, requires: str = REQUIRES_RELEASE) -> bytes:
    """The 64-byte prelude: magic, version, required release, CRC32C of the first 60 bytes."""
    body = PRELUDE.pack(MAGIC, version.encode("ascii"), requires.encode("ascii"), b"", 0)
    return body[:-4] + struct.pack("<I", crc32c.crc32c(body[:-4]))


def encode_trailer(header_offset: int, header: bytes) -> bytes:
    """The 64-byte trailer of a file whose ``header`` starts at ``header_offset``."""
    file_size = header_offset + len(header) + TRAILER_SIZE
    body = TRAILER.pack(header_offset, len(header), file_size, crc32c.crc32c(header), b"", 0, TRAILER_MAGIC)
    crc = crc32c.crc32c(body[:TRAILER_CRC_AT])
    return body[:TRAILER_CRC_AT] + struct.pack("<I", crc) + TRAILER_MAGIC


@dataclass(frozen=True)
class PreparedHeader:
    """A header encoded before its blobs are written: everything but the blob checksums.

    ``head`` is the map up to the ``"blobs"`` key, ``tail`` the entries after the blob table;
    ``max_bytes`` bounds the finished header, whatever the checksums turn out to be (exactly,
    with every checksum at its widest, when a looser bound would exceed ``MAX_HEADER_BYTES``).
    """

    head: bytes
    tail: bytes
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    max_bytes: int

    def finish(self, crcs: Sequence[int]) -> bytes:
        """The whole header, given each blob's CRC32C in order."""
        table = pack([[o, n, c] for o, n, c in zip(self.offsets, self.sizes, crcs, strict=True)])
        return self.head + table + self.tail


def prepare_header(
    *,
    step: int,
    metadata: Any,
    tree: Any,
    tensors: Sequence[TensorEntry],
    sizes: Sequence[int],
    created: str | None = None,
) -> PreparedHeader:
    """Encode the header of a file with blobs of ``sizes`` and check every limit readers enforce.

    Raises :class:`UnsupportedValueError` / :class:`StateTooLargeError` (step, tensor and blob
    counts, tuple bytes, header bytes) before anything is written; a header that might exceed
    ``MAX_HEADER_BYTES`` once its checksums are known is refused too.
    """
    check_step(step)
    _check_count(len(tensors), spec.MAX_TENSORS, "tensors")
    _check_count(len(sizes), spec.MAX_BLOBS, "blobs")
    offsets, _ = blob_offsets(sizes)
    prepared = _encode_pieces(
        step=step,
        metadata=metadata,
        tree=tree,
        tensors=tensors,
        offsets=offsets,
        sizes=sizes,
        created=created,
    )
    _check_header_size(prepared.max_bytes)
    return prepared


def encode_header(
    *,
    step: int,
    metadata: Any,
    tree: Any,
    tensors: Sequence[TensorEntry],
    blobs: Sequence[BlobEntry],
    created: str | None = None,
) -> bytes:
    """The msgpack header of a file whose blobs (with their checksums) are known.

    Raises :class:`StateTooLargeError` for a header readers would refuse.
    """
    prepared = _encode_pieces(
        step=step,
        metadata=metadata,
        tree=tree,
        tensors=tensors,
        offsets=[b.offset for b in blobs],
        sizes=[b.nbytes for b in blobs],
        created=created,
    )
    header = prepared.finish([b.crc for b in blobs])
    _check_header_size(len(header))
    return header


def _encode_pieces(
    *,
    step: int,
    metadata: Any,
    tree: Any,
    tensors: Sequence[TensorEntry],
    offsets: Sequence[int],
    sizes: Sequence[int],
    created: str | None,
) -> PreparedHeader:
    encoder = Encoder()
    fields = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "status": STATUS_COMPLETE,
        "step": step,
        "created": created or datetime.now(UTC).isoformat(timespec="microseconds"),
        "writer": f"asyncckpt {__version__}",
        "metadata": metadata,
    }
    # Packed piece by piece, these are the bytes msgpack gives for the whole map in this order.
    head = pack_map_header(_HEADER_FIELDS)
    head += b"".join(encoder.pack(key) + encoder.pack(value) for key, value in fields.items())
    head += encoder.pack("blobs")
    rows = [_tensor_row(t) for t in tensors]
    tail = encoder.pack("tensors") + encoder.pack(rows) + encoder.pack("tree") + encoder.pack(tree)
    # A blob row packs to at most 24 bytes (array tag, two uint64, a uint32), the table's array
    # tag to at most 5: enough to judge almost every header without packing a widest table.
    bound = len(head) + len(tail) + 5 + 24 * len(sizes)
    if bound > spec.MAX_HEADER_BYTES:
        widest = pack([[o, n, spec.MAX_CRC] for o, n in zip(offsets, sizes, strict=True)])
        bound = len(head) + len(widest) + len(tail)
    # The root map, the blob table and its rows, the tensor table and its rows with their shape
    # and stride lists: what a reader counts besides the metadata and the tree.
    objects = 3 + len(sizes) + 3 * len(tensors) + count_objects(metadata) + count_objects(tree)
    _check_decoding_cost(encoder.tuple_bytes, objects, len(head) + len(tail), offsets, sizes)
    return PreparedHeader(head, tail, tuple(offsets), tuple(sizes), bound)


def _tensor_row(entry: TensorEntry) -> list[Any]:
    problem = spec.tensor_size_problem(entry.shape, entry.stride, itemsize(entry.dtype))
    if problem is not None:
        raise StateTooLargeError(f"tensor {entry.key} {problem}", key=entry.key)
    return [
        entry.key,
        dtype_name(entry.dtype),
        list(entry.shape),
        list(entry.stride),
        entry.blob,
        entry.offset,
    ]


def _check_decoding_cost(
    tuple_bytes: int, objects: int, known_bytes: int, offsets: Sequence[int], sizes: Sequence[int]
) -> None:
    """Refuse what readers would refuse as too costly to decode, judged on the smallest header
    these pieces can make (every blob checksum 0 packs to one byte): the real one is larger."""
    smallest = known_bytes + 1 + 6 * len(sizes)  # a blob row is at least 6 bytes (offsets >= 4096)
    if tuple_bytes <= spec.max_tuple_bytes(smallest) and objects <= spec.max_header_objects(smallest):
        return
    smallest = known_bytes + len(pack([[o, n, 0] for o, n in zip(offsets, sizes, strict=True)]))
    if tuple_bytes > spec.max_tuple_bytes(smallest):
        raise StateTooLargeError(
            f"tuples in the state nest {tuple_bytes} bytes in total, more than the limit of "
            f"{spec.max_tuple_bytes(smallest)} for this header; use lists or tensors for large nested data"
        )
    if objects > spec.max_header_objects(smallest):
        raise StateTooLargeError(
            f"the header would hold {objects} lists, tuples, dicts, tensors and big ints in {smallest} "
            f"bytes, more than the limit of {spec.max_header_objects(smallest)} (at most "
            f"{spec.HEADER_FREE_OBJECTS} and one per {spec.HEADER_BYTES_PER_OBJECT} bytes); store large "
            "collections of small values as tensors"
        )


def _check_header_size(nbytes: int) -> None:
    # Never write a header that readers refuse.
    if nbytes > spec.MAX_HEADER_BYTES:
        raise StateTooLargeError(
            f"the header would take {nbytes} bytes, more than the limit of {spec.MAX_HEADER_BYTES}; "
            "store large values as tensors"
        )


def _check_count(count: int, limit: int, what: str) -> None:
    if count > limit:
        raise StateTooLargeError(f"the state has {count} {what}, more than the limit of {limit}")


def write_checkpoint(
    sink: Sink,
    *,
    step: int,
    metadata: Any,
    tree: Any,
    tensors: Sequence[TensorEntry],
    sizes: Sequence[int],
    blobs: Iterable[memoryview],
    checksum_pool: Executor | None = None,
) -> int:
    """Write a whole v1 file to ``sink`` in one sequential pass; return its size in bytes.

    ``blobs`` yields the bytes of each blob (``sizes`` says how many, in order). Raises what
    :func:`prepare_header` raises before writing anything; see :func:`write_file` for the rest.
    """
    header = prepare_header(step=step, metadata=metadata, tree=tree, tensors=tensors, sizes=sizes)
    return write_file(sink, header, blobs, checksum_pool=checksum_pool)


def write_file(
    sink: Sink, header: PreparedHeader, blobs: Iterable[memoryview], *, checksum_pool: Executor | None = None
) -> int:
    """Write prelude, ``blobs``, the finished ``header`` and the trailer; return the file size.

    Blobs of at least ``PARALLEL_CRC_MIN`` bytes are checksummed in ``checksum_pool`` (a thread
    of the caller's: CRC32C and the write both release the GIL, so checksumming then costs no
    time on the write path) while they are written; without a pool, before. Raises ``ValueError``
    when a blob's length differs from its size (the caller's bug) and whatever ``sink`` raises.
    """
    sink.write(encode_prelude())
    position = PRELUDE_SIZE
    crcs: list[Future[int] | int] = []
    for offset, size, data in zip(header.offsets, header.sizes, blobs, strict=True):
        if len(data) != size:
            raise ValueError(f"blob at {offset} has {len(data)} bytes, expected {size}")
        sink.write(bytes(offset - position))
        if size >= PARALLEL_CRC_MIN:
            crcs.append(
                crc32c.crc32c(data) if checksum_pool is None else checksum_pool.submit(crc32c.crc32c, data)
            )
            write_all(sink, data)
        else:
            crcs.append(crc32c.crc32c(data))
            sink.write(data)
        position = offset + size
    raw = header.finish([c if isinstance(c, int) else c.result() for c in crcs])
    assert len(raw) <= header.max_bytes
    header_offset = max(position, DATA_OFFSET)
    sink.write(bytes(header_offset - position))
    sink.write(raw)
    sink.write(encode_trailer(header_offset, raw))
    return header_offset + len(raw) + TRAILER_SIZE


def write_all(sink: Sink, data: memoryview) -> None:
    """Write ``data`` in CHUNK-sized calls (bounded syscalls, responsive to faults)."""
    for start in range(0, len(data), CHUNK):
        sink.write(data[start : start + CHUNK])
