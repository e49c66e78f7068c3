"""Encoding a v1 file's fixed parts: prelude, trailer, and the header, checked before writing.

The header sits after the blobs so that a file is written in one pass (:mod:`.writing`),
checksumming each blob just before (or while) it is written. Every limit a reader enforces is
checked before the first byte is written (:func:`prepare_header`): the header is encoded up
front, all but the small blob table, whose size is bounded (with every checksum at its widest)
before anything is written and which is encoded once the checksums are known. What depends on
the state's structure only (the tensor table, the tree, the blob offsets) can be encoded once
(:func:`encode_layout`) and reused by every file of that structure.
"""

from __future__ import annotations

import functools
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import crc32c
import msgpack

from .._version import __version__
from ..dtypes import dtype_name, itemsize
from ..errors import StateTooLargeError, UnsupportedValueError
from . import spec
from .codec import Encoder, count_objects, pack, pack_map_header
from .spec import (
    DATA_OFFSET,
    EXT_TENSOR,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAGIC,
    PARALLEL_CRC_MIN,
    PRELUDE,
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
    the tuple payloads in it, ``offsets`` each blob's file offset, ``tree_objects`` the objects
    a reader counts in the tree. Files of one structure share
    it; :func:`prepare_header` adds what each file has of its own (step, time, metadata).
    """

    tail: bytes
    tuple_bytes: int
    tensor_count: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    tree_objects: int  # what a reader counts in the tree (see codec.count_objects)
    tree_at: int  # where the "tree" entry starts in ``tail`` (after the tensor table)

    def with_tree(self, tree: Any) -> EncodedLayout:
        """This layout for another tree over the same tensors (a state whose plain values
        changed: a learning rate, an epoch): the tensor table is reused, only the tree encoded.

        Raises :class:`UnsupportedValueError` for a value msgpack cannot hold.
        """
        encoder = _TreeEncoder()
        tail = self.tail[: self.tree_at] + encoder.pack("tree") + encoder.pack(tree)
        layout = EncodedLayout(
            tail,
            encoder.tuple_bytes,
            self.tensor_count,
            self.offsets,
            self.sizes,
            count_objects(tree),
            self.tree_at,
        )
        layout.__dict__["_region_plans"] = self._region_plans  # the blobs are the same
        return layout

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
        if type(value) is TensorRef and not value.flags and value.index >= 0:
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
    :class:`StateTooLargeError` for too many tensors or blobs, or a tensor row readers refuse.
    """
    _check_count(len(tensors), spec.MAX_TENSORS, "tensors")
    _check_count(len(sizes), spec.MAX_BLOBS, "blobs")
    encoder = _TreeEncoder()
    rows = [_tensor_row(t) for t in tensors]
    table = encoder.pack("tensors") + encoder.pack(rows)
    tail = table + encoder.pack("tree") + encoder.pack(tree)
    offsets, _ = blob_offsets(sizes)
    return EncodedLayout(
        tail, encoder.tuple_bytes, len(tensors), tuple(offsets), tuple(sizes), count_objects(tree), len(table)
    )


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
    """Encode the head of the header map; refuse a header too costly to decode."""
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
    # The root map, the blob table and its rows, the tensor table and its rows with their shape
    # and stride lists: what a reader counts besides the metadata and the tree.
    sizes = layout.sizes
    objects = 3 + len(sizes) + 3 * layout.tensor_count + count_objects(metadata) + layout.tree_objects
    known = len(head) + len(layout.tail)
    _check_decoding_cost(encoder.tuple_bytes + layout.tuple_bytes, objects, known, layout.offsets, sizes)
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
    rows = [_tensor_row(t) for t in tensors]
    table = encoder.pack("tensors") + encoder.pack(rows)
    tail = table + encoder.pack("tree") + encoder.pack(tree)
    offsets, sizes = tuple(b.offset for b in blobs), tuple(b.nbytes for b in blobs)
    layout = EncodedLayout(
        tail, encoder.tuple_bytes, len(tensors), offsets, sizes, count_objects(tree), len(table)
    )
    header = _prepare(step, metadata, created, layout).finish([b.crc for b in blobs])
    _check_header_size(len(header))
    return header


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
