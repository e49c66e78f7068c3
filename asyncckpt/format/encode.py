"""Writing a v1 file: prelude, blobs, header and trailer, in one sequential pass.

The header sits after the blobs so that a file is written in one pass, checksumming each chunk
just before (or while) it is written, while it is still in the CPU cache. Every limit a reader
enforces is checked before the first byte is written (:func:`prepare_header`): the header is
encoded up front, all but the small blob table, whose size is bounded (with every checksum at
its widest) before anything is written and which is encoded once the checksums are known. What
depends on the state's structure only (the tensor table, the tree, the blob offsets) can be
encoded once (:func:`encode_layout`) and reused by every file of that structure.

Small blobs are written in batches, with the zero padding between them: one ``writev`` of many
buffers where the sink has one (:func:`write_file`), or one ``write`` of a contiguous region
that already holds the blobs at their file offsets (:func:`write_region`).
"""

from __future__ import annotations

import bisect
import functools
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import crc32c
import msgpack

from .._version import __version__
from ..dtypes import dtype_name
from ..errors import StateTooLargeError, UnsupportedValueError
from . import spec
from .codec import Encoder, pack, pack_map_header
from .spec import (
    ALIGN,
    CHUNK,
    DATA_OFFSET,
    EXT_TENSOR,
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
    TensorRef,
    align_up,
)

_HEADER_FIELDS = 10  # format, version, status, step, created, writer, metadata, blobs, tensors, tree


class Sink(Protocol):
    """Where the writer's bytes go; ``write`` writes all of ``data`` or raises.

    A sink may also have ``writev(buffers)``, writing all of several buffers in order (one
    system call for many small blobs); the writer uses it when it is there.
    """

    def write(self, data: memoryview | bytes) -> None: ...


Buffer = memoryview | bytes
_ZEROS = memoryview(bytes(ALIGN))  # padding between blobs is shorter than ALIGN
_BATCH_BUFFERS = 512  # buffers per writev (Linux allows 1024)


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
class EncodedLayout:
    """The parts of a header that depend on the state's structure only, encoded once.

    ``tail`` is the ``"tensors"`` and ``"tree"`` entries (the map's last two), ``tuple_bytes``
    the tuple payloads in it, ``offsets`` each blob's file offset. Files of one structure share
    it; :func:`prepare_header` adds what each file has of its own (step, time, metadata).
    """

    tail: bytes
    tuple_bytes: int
    tensor_count: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def table_bound(self) -> int:
        """A bound on the packed blob table: at most 24 bytes a row (array tag, two uint64, a
        uint32) and 5 for the array's own tag."""
        return 5 + 24 * len(self.sizes)

    def region_plan(self, *, pooled: bool) -> RegionPlan:
        """How :func:`write_region` checksums the blobs (computed once per layout)."""
        plan = self._region_plans.get(pooled)
        if plan is None:
            plan = self._region_plans[pooled] = RegionPlan.of(self.offsets, self.sizes, pooled=pooled)
        return plan

    @functools.cached_property
    def _region_plans(self) -> dict[bool, RegionPlan]:
        return {}

    @functools.cached_property
    def widest_table(self) -> int:
        """The exact size of the blob table with every checksum at its widest."""
        return len(pack([[o, n, spec.MAX_CRC] for o, n in zip(self.offsets, self.sizes, strict=True)]))


class _TreeEncoder(Encoder):
    """:class:`Encoder` with the extension value of each tensor ref made once per process (a
    skeleton holds thousands; the bytes are the same)."""

    _refs: list[msgpack.ExtType] = []
    _lock = threading.Lock()

    def _default(self, value: Any) -> Any:
        if type(value) is TensorRef and value.index >= 0:
            refs = self._refs
            if len(refs) <= value.index:
                with self._lock:
                    while len(refs) <= value.index:
                        refs.append(msgpack.ExtType(EXT_TENSOR, pack(len(refs))))
            return refs[value.index]
        return super()._default(value)


def encode_layout(*, tree: Any, tensors: Sequence[TensorEntry], sizes: Sequence[int]) -> EncodedLayout:
    """Encode what the header of a state of this structure says about its tensors and tree.

    Raises :class:`UnsupportedValueError` for a value msgpack cannot hold and
    :class:`StateTooLargeError` for too many tensors or blobs.
    """
    _check_count(len(tensors), spec.MAX_TENSORS, "tensors")
    _check_count(len(sizes), spec.MAX_BLOBS, "blobs")
    encoder = _TreeEncoder()
    rows = [[t.key, dtype_name(t.dtype), list(t.shape), list(t.stride), t.blob, t.offset] for t in tensors]
    tail = encoder.pack("tensors") + encoder.pack(rows) + encoder.pack("tree") + encoder.pack(tree)
    offsets, _ = blob_offsets(sizes)
    return EncodedLayout(tail, encoder.tuple_bytes, len(tensors), tuple(offsets), tuple(sizes))


@dataclass(frozen=True)
class RegionPlan:
    """Per blob, the slice of a region (see :func:`write_region`) that holds it: ``slices_all``;
    ``slices`` is the same except for the ``large`` blobs checksummed in a pool (empty there)."""

    slices_all: list[slice]
    slices: list[slice]
    large: list[int]

    @classmethod
    def of(cls, offsets: Sequence[int], sizes: Sequence[int], *, pooled: bool) -> RegionPlan:
        starts = [o - DATA_OFFSET for o in offsets]
        everything = [slice(start, start + n) for start, n in zip(starts, sizes, strict=True)]
        large = [i for i, n in enumerate(sizes) if pooled and n >= PARALLEL_CRC_MIN]
        inline = list(everything)
        for i in large:
            inline[i] = slice(0, 0)
        return cls(everything, inline, large)


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
    layout: EncodedLayout | None = None

    def region_plan(self, *, pooled: bool) -> RegionPlan:
        """See :meth:`EncodedLayout.region_plan`."""
        if self.layout is not None:
            return self.layout.region_plan(pooled=pooled)
        return RegionPlan.of(self.offsets, self.sizes, pooled=pooled)

    def finish(self, crcs: Sequence[int]) -> bytes:
        """The whole header, given each blob's CRC32C in order."""
        if len(crcs) != len(self.sizes):
            raise ValueError(f"{len(crcs)} checksums for {len(self.sizes)} blobs")
        # Rows as tuples: plain msgpack packs them as the arrays the format specifies, in C.
        table: bytes = msgpack.packb(list(zip(self.offsets, self.sizes, crcs, strict=True)))
        return self.head + table + self.tail


def prepare_header(
    *,
    step: int,
    metadata: Any,
    tree: Any = None,
    tensors: Sequence[TensorEntry] = (),
    sizes: Sequence[int] = (),
    created: str | None = None,
    layout: EncodedLayout | None = None,
) -> PreparedHeader:
    """Encode the header of a file with blobs of ``sizes`` and check every limit readers enforce.

    ``layout`` is :func:`encode_layout` of ``tree``, ``tensors`` and ``sizes``, when the caller
    has it already (those three are then not read). Raises :class:`UnsupportedValueError` /
    :class:`StateTooLargeError` (step, tensor and blob counts, tuple bytes, header bytes) before
    anything is written; a header that might exceed ``MAX_HEADER_BYTES`` once its checksums are
    known is refused too.
    """
    check_step(step)
    if layout is None:
        layout = encode_layout(tree=tree, tensors=tensors, sizes=sizes)
    else:  # the limits are read at call time
        _check_count(layout.tensor_count, spec.MAX_TENSORS, "tensors")
        _check_count(len(layout.sizes), spec.MAX_BLOBS, "blobs")
    prepared = _prepare(step, metadata, created, layout)
    _check_header_size(prepared.max_bytes)
    return prepared


def _prepare(step: int, metadata: Any, created: str | None, layout: EncodedLayout) -> PreparedHeader:
    """Encode the head of the header map; refuse tuples that nest too many bytes."""
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
    if encoder.tuple_bytes + layout.tuple_bytes > spec.MAX_TUPLE_BYTES:
        raise StateTooLargeError(
            f"tuples in the state nest {encoder.tuple_bytes + layout.tuple_bytes} bytes in total, more "
            f"than the limit of {spec.MAX_TUPLE_BYTES}; use lists or tensors for large nested data"
        )
    bound = len(head) + len(layout.tail) + layout.table_bound()
    if bound > spec.MAX_HEADER_BYTES:
        bound = len(head) + layout.widest_table + len(layout.tail)
    return PreparedHeader(head, layout.tail, layout.offsets, layout.sizes, bound, layout)


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
    encoder = Encoder()
    rows = [[t.key, dtype_name(t.dtype), list(t.shape), list(t.stride), t.blob, t.offset] for t in tensors]
    tail = encoder.pack("tensors") + encoder.pack(rows) + encoder.pack("tree") + encoder.pack(tree)
    offsets, sizes = tuple(b.offset for b in blobs), tuple(b.nbytes for b in blobs)
    layout = EncodedLayout(tail, encoder.tuple_bytes, len(tensors), offsets, sizes)
    header = _prepare(step, metadata, created, layout).finish([b.crc for b in blobs])
    _check_header_size(len(header))
    return header


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
    time on the write path) while they are written; without a pool, before. Smaller blobs and
    the padding between them are written in batches (see :class:`_Batch`). Raises
    ``ValueError`` when a blob's length differs from its size (the caller's bug) and whatever
    ``sink`` raises.
    """
    out = _Batch(sink)
    out.add(encode_prelude())
    position = PRELUDE_SIZE
    crcs: list[Future[int] | int] = []
    for offset, size, data in zip(header.offsets, header.sizes, blobs, strict=True):
        if len(data) != size:
            raise ValueError(f"blob at {offset} has {len(data)} bytes, expected {size}")
        out.pad(offset - position)
        if size >= PARALLEL_CRC_MIN:
            crcs.append(
                crc32c.crc32c(data) if checksum_pool is None else checksum_pool.submit(crc32c.crc32c, data)
            )
            out.flush()
            write_all(sink, data)
        else:
            crcs.append(crc32c.crc32c(data))
            out.add(data)
        position = offset + size
    return _finish(out, header, [c if isinstance(c, int) else c.result() for c in crcs], position)


def write_region(
    sink: Sink,
    header: PreparedHeader,
    region: memoryview,
    *,
    ready: Callable[[int], int] | None = None,
    checksum_pool: Executor | None = None,
) -> int:
    """Write a file whose blobs already lie in ``region`` as in the file; return the file size.

    ``region`` holds the file's bytes from ``DATA_OFFSET`` to the end of the last blob, zeros
    between the blobs (a staging buffer laid out like the file); it is written in ``CHUNK``
    pieces. ``ready(i)``, when given, blocks until blob ``i`` is in ``region`` and returns an
    index beyond ``i`` below which every blob is; the bytes before blob ``i`` are written before
    it waits. Checksums are computed as in :func:`write_file`. Raises ``ValueError`` when
    ``region`` has the wrong length and whatever ``sink`` or ``ready`` raises.
    """
    count = len(header.sizes)
    end = header.offsets[-1] + header.sizes[-1] - DATA_OFFSET if count else 0
    if len(region) != end:
        raise ValueError(f"the region has {len(region)} bytes, the blobs take {end}")
    plan = header.region_plan(pooled=checksum_pool is not None)
    sink.write(encode_prelude() + bytes(DATA_OFFSET - PRELUDE_SIZE))
    crcs: list[int] = []
    pending: list[tuple[int, Future[int]]] = []
    written = 0
    index = 0
    while index < count:
        start = header.offsets[index] - DATA_OFFSET
        if ready is not None and start > written:  # what is there already goes out first
            write_all(sink, region[written:start])
            written = start
        upto = count if ready is None else min(ready(index), count)
        for large in plan.large[bisect.bisect_left(plan.large, index) : bisect.bisect_left(plan.large, upto)]:
            assert checksum_pool is not None
            pending.append((large, checksum_pool.submit(crc32c.crc32c, region[plan.slices_all[large]])))
        crcs += map(crc32c.crc32c, map(region.__getitem__, plan.slices[index:upto]))
        stop = header.offsets[upto - 1] + header.sizes[upto - 1] - DATA_OFFSET
        write_all(sink, region[written:stop])
        written, index = stop, upto
    for large, future in pending:
        crcs[large] = future.result()
    return _finish(_Batch(sink), header, crcs, DATA_OFFSET + end)


Part = tuple[int, memoryview, Callable[[], None] | None]


def write_parts(sink: Sink, header: PreparedHeader, parts: Iterable[Part]) -> int:
    """Write a file whose blobs arrive in parts; return the file size.

    Each part is ``(blob, data, then)``: the next bytes of blob ``blob``; parts come in file
    order and each blob's parts add up to its size (empty blobs need none). ``then``, when
    given, is called once ``data`` and every part before it are written, so that its memory
    may be reused (a staging buffer smaller than the state). Small parts are written in
    batches; checksums run on each part as it comes. Raises ``ValueError`` for parts out of
    order or of the wrong total length, and whatever ``sink`` raises.
    """
    offsets, sizes = header.offsets, header.sizes
    out = _Batch(sink)
    out.add(encode_prelude())
    crcs = [0] * len(sizes)
    position = PRELUDE_SIZE
    blob = -1
    filled = 0
    for index, data, then in parts:
        if index != blob:
            if not 0 <= index < len(sizes):
                raise ValueError(f"there is no blob {index}")
            _check_blobs_between(blob, filled, index, sizes)
            out.pad(offsets[index] - position)
            position = offsets[index]
            blob, filled = index, 0
        crcs[blob] = crc32c.crc32c(data, crcs[blob])
        out.add(data)
        filled += len(data)
        position += len(data)
        if then is not None:
            out.flush()
            then()
    _check_blobs_between(blob, filled, len(sizes), sizes)
    if sizes:
        end = offsets[-1] + sizes[-1]
        out.pad(end - position)
        position = end
    return _finish(out, header, crcs, position)


def _check_blobs_between(blob: int, filled: int, following: int, sizes: Sequence[int]) -> None:
    """Blob ``blob`` got all its bytes, and the blobs before blob ``following`` are empty."""
    if blob >= 0 and filled != sizes[blob]:
        raise ValueError(f"blob {blob} got {filled} bytes, expected {sizes[blob]}")
    if following <= blob or following > len(sizes):
        raise ValueError(f"a part of blob {following} came after blob {blob}")
    skipped = next((i for i in range(blob + 1, following) if sizes[i]), None)
    if skipped is not None:
        raise ValueError(f"blob {skipped} got no bytes, expected {sizes[skipped]}")


def _finish(out: _Batch, header: PreparedHeader, crcs: list[int], position: int) -> int:
    """Write the header (after the blobs, which end at ``position``) and the trailer."""
    raw = header.finish(crcs)
    assert len(raw) <= header.max_bytes
    header_offset = max(position, DATA_OFFSET)
    out.pad(header_offset - position)
    out.add(raw)
    out.add(encode_trailer(header_offset, raw))
    out.flush()
    return header_offset + len(raw) + TRAILER_SIZE


class _Batch:
    """Small buffers gathered and written together: with one ``writev`` where the sink has it,
    else joined into one ``write`` (at most ``CHUNK`` bytes are gathered)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.writev: Callable[[list[Buffer]], None] | None = getattr(sink, "writev", None)
        self.buffers: list[Buffer] = []
        self.nbytes = 0

    def add(self, data: Buffer) -> None:
        if not len(data):
            return
        self.buffers.append(data)
        self.nbytes += len(data)
        if len(self.buffers) >= _BATCH_BUFFERS or self.nbytes >= CHUNK:
            self.flush()

    def pad(self, count: int) -> None:
        """``count`` zero bytes."""
        while count > 0:
            self.add(_ZEROS[: min(count, ALIGN)])
            count -= ALIGN

    def flush(self) -> None:
        buffers, self.buffers, self.nbytes = self.buffers, [], 0
        if not buffers:
            return
        if self.writev is not None:
            self.writev(buffers)
        elif len(buffers) == 1:
            self.sink.write(buffers[0])
        else:
            self.sink.write(b"".join(buffers))


def write_all(sink: Sink, data: memoryview) -> None:
    """Write ``data`` in CHUNK-sized calls (bounded syscalls, responsive to faults)."""
    for start in range(0, len(data), CHUNK):
        sink.write(data[start : start + CHUNK])
