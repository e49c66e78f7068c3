"""The commit record of a multi-rank step: DCP's ``Metadata`` and the shard digests, without pickle.

The record is a v1 file (``step-0000000300/commit.record``, see docs/MULTI_GPU.md) whose header
tree lists one digest per rank's shard file and whose one blob holds DCP's ``Metadata`` encoded
with asyncckpt's msgpack codec (exact types). Decoding checks every field's type and bound before
anything is built from it: a hostile record is a :class:`CorruptedCheckpointError`, never code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from .. import format as fmt
from ..dtypes import DTYPE_BY_NAME, dtype_name
from ..errors import CorruptedCheckpointError, UnsupportedValueError
from ..saving.snapshot import gc_paused

RECORD_KIND = "asyncckpt.dist.commit"
SHARD_KIND = "asyncckpt.dist.shard"
RECORD_VERSION = 1
MAX_WORLD_SIZE = 1_000_000
_MEMORY_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "preserve": torch.preserve_format,
}
_MEMORY_FORMAT_NAMES = {value: name for name, value in _MEMORY_FORMATS.items()}


@dataclass(frozen=True)
class ItemLocation:
    """Where one DCP write item lies: tensor ``tensor`` of the shard file of ``rank``."""

    rank: int
    tensor: int


@dataclass(frozen=True)
class ShardDigest:
    """What a rank reports once its shard file is durable: its size and the CRC32C of its header.

    The header holds every blob's CRC32C, so the two identify the whole file's bytes.
    """

    rank: int
    nbytes: int
    header_crc: int


@dataclass(frozen=True)
class CommitRecord:
    """A decoded commit record."""

    step: int
    world_size: int
    shards: tuple[ShardDigest, ...]  # one per rank, by rank
    metadata: Metadata


# --------------------------------------------------------------------------- encoding


def record_tree(world_size: int, shards: list[ShardDigest]) -> dict[str, Any]:
    """The record's header tree; blob 0 (tensor 0) holds :func:`encode_metadata`'s bytes."""
    return {
        "world_size": world_size,
        "shards": [[s.rank, s.nbytes, s.header_crc] for s in shards],
        "dcp": fmt.TensorRef(0),
    }


def encode_metadata(metadata: Metadata) -> bytes:
    """DCP's ``Metadata`` as msgpack: tensors, byte values, planner data, item locations.

    Raises :class:`UnsupportedValueError` for what the codec cannot store (a sparse layout,
    planner data that is not plain values, a location that is not ours).
    """
    with gc_paused():  # many small lists: collections would cost more than the encoding
        return _encode_metadata(metadata)


def _encode_metadata(metadata: Metadata) -> bytes:
    tensors, byte_values = [], []
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            byte_values.append(fqn)
        else:
            tensors.append([fqn, *_properties(fqn, md.properties), [*md.size], _chunks(md.chunks)])
    body = {
        "version": metadata.version,
        "tensors": tensors,
        "bytes": byte_values,
        "planner_data": dict(metadata.planner_data) if isinstance(metadata.planner_data, dict) else None,
        "storage": _locations(metadata.storage_data),
        "storage_meta": _storage_meta(metadata.storage_meta),
    }
    try:
        return fmt.pack(body)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnsupportedValueError(f"DCP metadata cannot be stored without pickle: {exc}") from None


def _properties(fqn: str, props: TensorProperties) -> list[Any]:
    name = dtype_name(props.dtype)
    if name is None or props.layout != torch.strided:
        raise UnsupportedValueError(f"{fqn}: {props.dtype} / {props.layout} cannot be stored", key=fqn)
    return [name, bool(props.requires_grad), _MEMORY_FORMAT_NAMES.get(props.memory_format, "contiguous")]


def _chunks(chunks: list[ChunkStorageMetadata]) -> list[list[list[int]]]:
    # [*size], not list(size): list() of a torch.Size costs 20x more (it shows at 10k tensors)
    return [[[*c.offsets], [*c.sizes]] for c in chunks]


def _locations(storage_data: Any) -> list[list[Any]]:
    if not isinstance(storage_data, dict):
        raise UnsupportedValueError("DCP metadata has no item locations: was it written by AsyncckptWriter?")
    rows = []
    for index, where in storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(where, ItemLocation):
            raise UnsupportedValueError(f"item location {index!r} -> {where!r} is not an asyncckpt location")
        offset = None if index.offset is None else [*index.offset]
        rows.append([index.fqn, offset, where.rank, where.tensor])
    return rows


def _storage_meta(meta: StorageMeta | None) -> list[Any] | None:
    if meta is None:
        return None
    checkpoint_id = None if meta.checkpoint_id is None else str(meta.checkpoint_id)
    return [checkpoint_id, meta.save_id, meta.load_id, list(meta.modules)]


# --------------------------------------------------------------------------- decoding


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any, length: int | None) -> bool:
    """A list of non-negative ints (of ``length`` items when given)."""
    if not isinstance(value, list) or (length is not None and len(value) != length):
        return False
    return all(_is_int(v) and v >= 0 for v in value)


class _Decoder:
    """Checks a decoded record body field by field; every failure names the record."""

    def __init__(self, path: str, world_size: int) -> None:
        self.path = path
        self.world_size = world_size

    def fail(self, what: str) -> NoReturn:
        raise CorruptedCheckpointError(f"bad commit record: {what}", path=self.path)

    def metadata(self, body: Any) -> Metadata:
        if not isinstance(body, dict):
            self.fail("the DCP metadata is not a map")
        state: dict[str, Any] = {}
        for row in self.rows(body, "tensors"):
            fqn, md = self.tensor(row)
            state[self.new_key(state, fqn)] = md
        for fqn in self.rows(body, "bytes"):
            if not isinstance(fqn, str):
                self.fail("a byte value's key is not a str")
            state[self.new_key(state, fqn)] = BytesStorageMetadata()
        version = body.get("version")
        if version is not None and not isinstance(version, str):
            self.fail("version is not a str")
        return Metadata(
            state_dict_metadata=state,
            planner_data=self.planner_data(body.get("planner_data"), len(state)),
            storage_data=self.locations(self.rows(body, "storage"), state),
            storage_meta=self.storage_meta(body.get("storage_meta")),
            version=version,
        )

    def rows(self, body: dict[str, Any], name: str) -> list[Any]:
        rows = body.get(name)
        if not isinstance(rows, list):
            self.fail(f"field {name!r} is missing or not a list")
        return rows

    def new_key(self, state: dict[str, Any], fqn: str) -> str:
        if fqn in state:
            self.fail(f"key {fqn!r} appears twice")
        return fqn

    def tensor(self, row: Any) -> tuple[str, TensorStorageMetadata]:
        if not (isinstance(row, list) and len(row) == 6):
            self.fail("a tensor entry is not [key, dtype, requires_grad, memory_format, size, chunks]")
        fqn, dtype_text, requires_grad, memory_format, size, chunks = row
        if not isinstance(fqn, str) or dtype_text not in DTYPE_BY_NAME or not isinstance(requires_grad, bool):
            self.fail(f"tensor entry {fqn!r} has a bad key, dtype or requires_grad")
        if memory_format not in _MEMORY_FORMATS:
            self.fail(f"tensor {fqn!r} has an unknown memory format {memory_format!r}")
        shape = self.ints(size, None, fqn)
        if not isinstance(chunks, list):
            self.fail(f"tensor {fqn!r} has no chunk list")
        properties = TensorProperties(
            dtype=DTYPE_BY_NAME[dtype_text],
            requires_grad=requires_grad,
            memory_format=_MEMORY_FORMATS[memory_format],
        )
        return fqn, TensorStorageMetadata(
            properties, torch.Size(shape), [self.chunk(c, shape, fqn) for c in chunks]
        )

    def chunk(self, row: Any, shape: list[int], fqn: str) -> ChunkStorageMetadata:
        if not (isinstance(row, list) and len(row) == 2):
            self.fail(f"a chunk of {fqn!r} is not [offsets, sizes]")
        offsets = self.ints(row[0], len(shape), fqn)
        sizes = self.ints(row[1], len(shape), fqn)
        if any(o + n > d for o, n, d in zip(offsets, sizes, shape, strict=True)):
            self.fail(f"a chunk of {fqn!r} at {offsets} (+{sizes}) lies outside its size {shape}")
        return ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))

    def ints(self, value: Any, length: int | None, fqn: str) -> list[int]:
        if not _int_list(value, length) or len(value) > fmt.MAX_NDIM:
            self.fail(f"{fqn!r} has a bad shape or offset list {value!r}")
        if max(value, default=0) > fmt.MAX_INDEX or math.prod(value) > fmt.MAX_INDEX:
            self.fail(f"{fqn!r} has a shape beyond {fmt.MAX_INDEX}")
        return list(value)

    def planner_data(self, value: Any, entries: int) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail("planner data is not a map")
        for fqn, path in value.items():
            if not (isinstance(fqn, str) and isinstance(path, tuple) and path):
                self.fail(f"planner data for {fqn!r} is not a key path")
            for part in path:
                if not isinstance(part, str) and not (_is_int(part) and 0 <= part <= entries):
                    self.fail(f"planner data for {fqn!r} holds the path element {part!r}")
        return value

    def locations(self, rows: list[Any], state: dict[str, Any]) -> dict[MetadataIndex, ItemLocation]:
        found: dict[MetadataIndex, ItemLocation] = {}
        for row in rows:
            if not (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str)):
                self.fail("an item location is not [key, offset, rank, tensor]")
            fqn, offset, rank, tensor = row
            if fqn not in state:
                self.fail(f"an item location names {fqn!r}, which the metadata does not have")
            if offset is not None:
                offset = self.ints(offset, None, fqn)
            if not (_is_int(rank) and 0 <= rank < self.world_size and _is_int(tensor) and tensor >= 0):
                self.fail(f"item {fqn!r} is in rank {rank!r}'s tensor {tensor!r}, which does not exist")
            found[MetadataIndex(fqn, offset)] = ItemLocation(rank, tensor)
        return found

    def storage_meta(self, value: Any) -> StorageMeta | None:
        if value is None:
            return None
        ok = isinstance(value, list) and len(value) == 4
        ok = ok and all(v is None or isinstance(v, str) for v in value[:3])
        ok = ok and isinstance(value[3], list) and all(isinstance(m, str) for m in value[3])
        if not ok:
            self.fail("storage meta is not [checkpoint_id, save_id, load_id, modules]")
        return StorageMeta(value[0], value[1], value[2], list(value[3]))


def decode_record(layout: fmt.Layout, blob: bytes, *, path: str) -> CommitRecord:
    """Build a :class:`CommitRecord` from a checked v1 layout and its blob 0's bytes."""
    with gc_paused():  # many small objects: collections would cost more than the decoding
        return _decode_record(layout, blob, path=path)


def _decode_record(layout: fmt.Layout, blob: bytes, *, path: str) -> CommitRecord:
    meta, tree = layout.metadata, layout.tree

    def fail(what: str) -> NoReturn:
        raise CorruptedCheckpointError(f"bad commit record: {what}", path=path)

    if not isinstance(meta, dict) or meta.get("kind") != RECORD_KIND:
        fail(
            f"not an asyncckpt commit record (kind {meta.get('kind') if isinstance(meta, dict) else None!r})"
        )
    if meta.get("record") != RECORD_VERSION:
        fail(f"record version {meta.get('record')!r} is not {RECORD_VERSION}")
    if not isinstance(tree, dict):
        fail("the tree is not a map")
    world_size = tree.get("world_size")
    if not (isinstance(world_size, int) and _is_int(world_size) and 1 <= world_size <= MAX_WORLD_SIZE):
        fail(f"world size {world_size!r} is not in [1, {MAX_WORLD_SIZE}]")
    shards = tree.get("shards")
    if not (isinstance(shards, list) and len(shards) == world_size):
        fail(f"the record must list {world_size} shard digests")
    digests = []
    for rank, row in enumerate(shards):
        if not (_int_list(row, 3) and row[0] == rank and row[2] <= 0xFFFFFFFF):
            fail(f"shard digest {rank} is not [rank, nbytes, header crc32c]")
        digests.append(ShardDigest(rank, row[1], row[2]))
    try:
        body = fmt.unpack(blob)
    except Exception as exc:  # msgpack raises many types on hostile bytes
        fail(f"the DCP metadata does not decode: {str(exc) or type(exc).__name__}")
    metadata = _Decoder(path, world_size).metadata(body)
    return CommitRecord(layout.step, world_size, tuple(digests), metadata)
