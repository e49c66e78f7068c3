"""Shard files: one v1 file per rank and step, written, verified and read through the Storage.

A shard file holds the rank's per-rank values first (its tree's ``"per_rank"``, tensors
``0..k-1`` as :func:`asyncckpt.snapshot.flatten` numbered them) and then one tensor per DCP write
item, each in its own checksummed blob. :func:`write_shard` writes → verifies the durable bytes →
commits, and returns the :class:`ShardDigest` the rank reports to the coordinator.
:class:`ShardFiles` reads a committed step's shards, checking each file against the digest the
commit record holds before trusting its header, and every blob's CRC32C before using its bytes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO, cast

import crc32c
import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from .. import catalog
from .. import format as fmt
from .._tree import unflatten
from ..errors import CheckpointError, CheckpointWriteError, CorruptedCheckpointError
from ..format import TensorEntry
from ..saving.snapshot import Snapshot, contiguous_stride
from ..saving.readback import VerifyMode
from ..storage import ReadHandle, Storage, Written
from .record import SHARD_KIND, CommitRecord, ItemLocation, ShardDigest

SMALL_BLOB = 1 << 20


@dataclass(frozen=True)
class ItemData:
    """One DCP write item to store as a tensor of its own: bytes resolved only when written.

    ``packed`` items (msgpack-encoded plain values, small) share one blob at the end of the
    file instead of a 4 KiB-aligned blob each.
    """

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    data: Callable[[], memoryview]
    packed: bool = False


def write_shard(
    storage: Storage,
    *,
    step: int,
    rank: int,
    world_size: int,
    per_rank: Snapshot | None,
    items: Sequence[ItemData],
    user_metadata: Any = None,
    verify: VerifyMode = "full",
) -> tuple[ShardDigest, int, Written]:
    """Write rank ``rank``'s shard file of ``step``: write → fsync → verify → commit.

    Returns the digest, the tensor index of the first item (items follow in order) and the
    storage's figures of the write. ``user_metadata`` (an encodable tree) goes into the file's
    metadata as ``"user"``. ``verify`` says what is read back before the commit (see
    :class:`~asyncckpt.dist.storage.AsyncckptWriter`); the header's digest is read always. Raises :class:`CheckpointWriteError`; then nothing is published
    under the shard's name.
    """
    name = catalog.shard_name(step, rank)
    first = len(per_rank.tensors) if per_rank else 0
    tensors: list[Any] = list(per_rank.tensors) if per_rank else []
    sizes = [b.nbytes for b in per_rank.blobs] if per_rank else []
    sources: list[Callable[[], memoryview]] = [
        partial(_cpu_bytes, source.tensor) for source in (per_rank.blobs if per_rank else ())
    ]
    tensors += _item_specs(items, len(sizes), sizes, sources)

    def blobs() -> Iterator[memoryview]:
        for source in sources:
            yield source()

    metadata = {"kind": SHARD_KIND, "rank": rank, "world_size": world_size}
    if user_metadata:
        metadata["user"] = user_metadata

    def body(sink: Any) -> int:
        return fmt.write_checkpoint(
            sink,
            step=step,
            metadata=metadata,
            tree={"per_rank": per_rank.tree if per_rank else None, "items": len(items)},
            tensors=tensors,
            sizes=sizes,
            blobs=blobs(),
        )

    written = storage.write(name, body)
    try:
        digest = _verify_written(storage, written, step=step, rank=rank, verify=verify)
    except BaseException:
        storage.discard(written)
        raise
    storage.commit(written)
    return digest, first, written


def _item_specs(
    items: Sequence[ItemData], blob: int, sizes: list[int], sources: list[Callable[[], memoryview]]
) -> list[TensorEntry]:
    """Table entries of ``items`` (in order), their blobs appended to ``sizes`` and ``sources``:
    one blob per tensor, then one shared blob for all packed items."""
    specs: list[TensorEntry | None] = [None] * len(items)
    for i, item in enumerate(items):
        if not item.packed:
            specs[i] = TensorEntry(item.key, item.dtype, item.shape, contiguous_stride(item.shape), blob, 0)
            sizes.append(item.nbytes)
            sources.append(item.data)
            blob += 1
    packed = [(i, item) for i, item in enumerate(items) if item.packed]
    offset = 0
    for i, item in packed:
        specs[i] = TensorEntry(item.key, torch.uint8, (item.nbytes,), (1,), blob, offset)
        offset += item.nbytes
    if packed:
        sizes.append(offset)
        sources.append(lambda: memoryview(b"".join(item.data() for _, item in packed)))
    return [spec for spec in specs if spec is not None]


def _cpu_bytes(tensor: torch.Tensor) -> memoryview:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return fmt.tensor_bytes(tensor.contiguous())


def _verify_written(
    storage: Storage, written: Written, *, step: int, rank: int, verify: VerifyMode
) -> ShardDigest:
    where = storage.where(written.name)
    try:
        with storage.open_written(written) as handle:
            file = cast(BinaryIO, handle.cursor())
            _, raw, _, size = fmt.read_header_bytes(file, where)
            if verify != "full":  # the structure: prelude, trailer, size, header CRC
                return ShardDigest(rank, size, crc32c.crc32c(raw))
            layout = fmt.read_layout(file, where)
            if layout.step != step:
                raise CorruptedCheckpointError(f"reads back step {layout.step}, wrote {step}", path=where)
            fmt.verify_blobs(file, layout, path=where)
    except CheckpointError as exc:
        raise CheckpointWriteError(
            f"validation after write failed, nothing was published: {exc}", path=where, rank=rank, step=step
        ) from exc
    return ShardDigest(rank, size, crc32c.crc32c(raw))


def shard_digest(handle: ReadHandle, where: str, rank: int) -> ShardDigest:
    """The digest of a committed shard file (prelude, trailer and header CRC checked; the header
    is not decoded: the coordinator's check before a commit only compares digests)."""
    _, raw, _, size = fmt.read_header_bytes(cast(BinaryIO, handle.cursor()), where)
    return ShardDigest(rank, size, crc32c.crc32c(raw))


def header_digest(handle: ReadHandle, where: str, rank: int) -> tuple[ShardDigest, fmt.Layout]:
    """The digest and checked layout of a committed shard file (prelude, trailer, header CRC)."""
    file = cast(BinaryIO, handle.cursor())
    _, raw, _, size = fmt.read_header_bytes(file, where)
    return ShardDigest(rank, size, crc32c.crc32c(raw)), fmt.read_layout(file, where)


class ShardFiles:
    """The shard files of one committed step, opened on first use and checked against the record.

    Thread-safe; close it (or use ``with``). Every method raises
    :class:`CorruptedCheckpointError` naming the shard file, and ``OSError`` when the storage
    fails.
    """

    def __init__(self, storage: Storage, record: CommitRecord) -> None:
        self.storage = storage
        self.record = record
        self._open: dict[int, tuple[ReadHandle, fmt.Layout]] = {}
        self._verified: set[tuple[int, int]] = set()
        self._last: tuple[int, int, torch.Tensor] | None = None  # the last small blob read
        self._lock = threading.Lock()

    def where(self, rank: int) -> str:
        """The location of ``rank``'s shard file (for messages)."""
        return self.storage.where(catalog.shard_name(self.record.step, rank))

    def layout(self, rank: int) -> fmt.Layout:
        """``rank``'s checked layout (its digest must equal the record's)."""
        return self._file(rank)[1]

    def _file(self, rank: int) -> tuple[ReadHandle, fmt.Layout]:
        with self._lock:
            if rank not in self._open:
                self._open[rank] = self._check(rank)
            return self._open[rank]

    def _check(self, rank: int) -> tuple[ReadHandle, fmt.Layout]:
        where = self.where(rank)
        try:
            handle = self.storage.open(catalog.shard_name(self.record.step, rank))
        except FileNotFoundError:
            raise CorruptedCheckpointError("shard file is missing", path=where, rank=rank) from None
        try:
            with located(where, rank):
                digest, layout = header_digest(handle, where, rank)
            expected = self.record.shards[rank]
            if digest != expected:
                raise CorruptedCheckpointError(
                    f"shard file differs from the one the commit record names ({digest.nbytes} bytes, "
                    f"header crc32c {digest.header_crc:08x}; the record says {expected.nbytes} bytes, "
                    f"{expected.header_crc:08x})",
                    path=where,
                    rank=rank,
                )
            _check_shard_layout(layout, self.record, rank, where)
        except BaseException:
            handle.close()
            raise
        return handle, layout

    def entry(self, rank: int, tensor: int) -> fmt.TensorEntry:
        """Tensor ``tensor`` of ``rank``'s table."""
        layout = self.layout(rank)
        if not 0 <= tensor < len(layout.tensors):
            raise CorruptedCheckpointError(
                f"the commit record names tensor {tensor}; the shard has {len(layout.tensors)}",
                path=self.where(rank),
                rank=rank,
            )
        return layout.tensors[tensor]

    def verify(self, rank: int, tensor: int) -> None:
        """Check the CRC32C of the blob holding ``rank``'s tensor ``tensor`` (once per blob)."""
        entry = self.entry(rank, tensor)
        if (rank, entry.blob) in self._verified:
            return
        handle, layout = self._file(rank)
        scratch = memoryview(bytearray(min(fmt.CHUNK, max(layout.blobs[entry.blob].nbytes, 1))))
        file = cast(BinaryIO, handle.cursor())
        with located(self.where(rank), rank):
            fmt.check_blob(file, layout, entry.blob, path=self.where(rank), scratch=scratch)
        with self._lock:
            self._verified.add((rank, entry.blob))

    def read(self, rank: int, tensor: int) -> torch.Tensor:
        """``rank``'s tensor ``tensor`` as a CPU tensor (do not write to it), its blob's CRC32C
        checked. The last small blob read is kept, for the plain values that share one."""
        entry = self.entry(rank, tensor)
        last = self._last
        if last is not None and last[:2] == (rank, entry.blob):
            return fmt.view_tensor(entry, last[2])
        blob = self.read_blob(rank, entry.blob)
        if blob.numel() <= SMALL_BLOB:
            self._last = (rank, entry.blob, blob)
        return fmt.view_tensor(entry, blob)

    def read_blob(self, rank: int, blob: int) -> torch.Tensor:
        """Blob ``blob`` of ``rank``'s file as a 1-D uint8 tensor, its CRC32C checked."""
        handle, layout = self._file(rank)
        data = torch.empty(layout.blobs[blob].nbytes, dtype=torch.uint8)
        self.read_blob_into(rank, blob, fmt.tensor_bytes(data))
        return data

    def read_blob_into(self, rank: int, blob: int, dest: memoryview) -> None:
        """Read blob ``blob`` straight into ``dest`` (its exact size), checking its CRC32C."""
        handle, layout = self._file(rank)
        file = cast(BinaryIO, handle.cursor())
        with located(self.where(rank), rank):
            fmt.read_blob_into(file, layout, blob, dest, verify=True, path=self.where(rank))

    def per_rank(self, rank: int) -> Any:
        """The per-rank values ``rank`` saved (None when it saved none), every blob checked."""
        layout = self.layout(rank)
        tree = layout.tree["per_rank"]
        count = len(layout.tensors) - layout.tree["items"]
        blobs: dict[int, torch.Tensor] = {}
        tensors = []
        for entry in layout.tensors[:count]:
            if entry.blob not in blobs:
                blobs[entry.blob] = self.read_blob(rank, entry.blob)
            tensors.append(fmt.view_tensor(entry, blobs[entry.blob]))
        return unflatten(tree, tensors)

    def close(self) -> None:
        """Close every shard file opened."""
        with self._lock:
            handles, self._open = list(self._open.values()), {}
        for handle, _ in handles:
            handle.close()

    def __enter__(self) -> ShardFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def located(where: str, rank: int | None) -> Iterator[None]:
    """Give a format error raised inside the block its file (and rank) as fields."""
    try:
        yield
    except CheckpointError as exc:
        if exc.path is not None and (rank is None or exc.rank is not None):
            raise
        raise type(exc)(
            exc.reason.removeprefix(f"{where}: "),
            path=where,
            rank=rank,
            key=exc.key,
            offset=exc.offset,
            blob=exc.blob,
            step=exc.step,
        ) from exc


def _check_shard_layout(layout: fmt.Layout, record: CommitRecord, rank: int, where: str) -> None:
    meta, tree = layout.metadata, layout.tree
    expected = {"kind": SHARD_KIND, "rank": rank, "world_size": record.world_size}
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in expected.items()):
        raise CorruptedCheckpointError(
            f"not rank {rank}'s shard of this step: {meta!r}", path=where, rank=rank
        )
    if layout.step != record.step:
        raise CorruptedCheckpointError(
            f"shard of step {layout.step}, not {record.step}", path=where, rank=rank
        )
    items = tree.get("items") if isinstance(tree, dict) else None
    if not (isinstance(items, int) and not isinstance(items, bool) and 0 <= items <= len(layout.tensors)):
        raise CorruptedCheckpointError("shard tree is not {per_rank, items}", path=where, rank=rank)
    count = len(layout.tensors) - items
    if any(ref.index >= count for ref in _refs(tree.get("per_rank"))):
        raise CorruptedCheckpointError("per-rank values refer to an item's tensor", path=where, rank=rank)


def _refs(tree: Any) -> Iterator[fmt.TensorRef]:
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, fmt.TensorRef):
            yield node
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)


def check_item(
    shards: ShardFiles, where: ItemLocation, item: ReadItem, metadata: Metadata
) -> fmt.TensorEntry:
    """The stored tensor a read item reads from, checked against the record: its dtype is the
    metadata's and the region read lies inside it. Raises :class:`CorruptedCheckpointError`."""
    entry = shards.entry(where.rank, where.tensor)
    md = metadata.state_dict_metadata.get(item.storage_index.fqn)
    inside = len(entry.shape) == len(item.storage_offsets) == len(item.lengths) and all(
        o + n <= d for o, n, d in zip(item.storage_offsets, item.lengths, entry.shape, strict=True)
    )
    if not isinstance(md, TensorStorageMetadata) or md.properties.dtype != entry.dtype or not inside:
        raise CorruptedCheckpointError(
            f"tensor {where.tensor} ({entry.key}, {entry.dtype}, {list(entry.shape)}) is not the "
            f"{item.storage_index.fqn} chunk the commit record describes",
            path=shards.where(where.rank),
            rank=where.rank,
        )
    return entry
