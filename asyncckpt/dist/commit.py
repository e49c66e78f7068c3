"""Writing and reading the commit record of a multi-rank step through the Storage.

The coordinator writes the record only after every rank reported its shard durable; it is
written → fsynced → read back and verified → committed (rename, directory fsync). A step whose
folder has no record does not exist.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, cast

import torch
from torch.distributed.checkpoint.metadata import Metadata

from .. import catalog
from .. import format as fmt
from ..errors import CheckpointError, CheckpointWriteError, CorruptedCheckpointError
from ..format import TensorEntry
from ..storage import Sink, Storage
from .record import (
    RECORD_KIND,
    RECORD_VERSION,
    CommitRecord,
    ShardDigest,
    decode_record,
    encode_metadata,
    record_tree,
)
from .shards import located, shard_digest

MAX_RECORD_BLOB = 1 << 32  # the encoded DCP metadata of a step (4 GiB: far beyond 10k ranks)


def write_record(
    storage: Storage, *, step: int, world_size: int, shards: list[ShardDigest], metadata: Metadata
) -> str:
    """Publish ``step``'s commit record; return its location. Raises :class:`CheckpointWriteError`
    (then the step stays uncommitted) or :class:`asyncckpt.UnsupportedValueError` (nothing written)."""
    blob = encode_metadata(metadata)
    name = catalog.commit_record_name(step)
    spec = TensorEntry("dcp-metadata", torch.uint8, (len(blob),), (1,), 0, 0)

    def body(sink: Sink) -> int:
        return fmt.write_checkpoint(
            sink,
            step=step,
            metadata={"kind": RECORD_KIND, "record": RECORD_VERSION},
            tree=record_tree(world_size, shards),
            tensors=[spec],
            sizes=[len(blob)],
            blobs=[memoryview(blob)],
        )

    written = storage.write(name, body)
    where = storage.where(name)
    try:
        with storage.open_written(written) as handle:
            file = cast(BinaryIO, handle.cursor())
            layout = fmt.read_layout(file, where)
            fmt.verify_blobs(file, layout, path=where)
    except CheckpointError as exc:
        storage.discard(written)
        raise CheckpointWriteError(
            f"validation after write failed, the step was not committed: {exc}", path=where, step=step
        ) from exc
    except BaseException:
        storage.discard(written)
        raise
    storage.commit(written)
    return where


def read_record(storage: Storage, step: int) -> CommitRecord:
    """Read and check ``step``'s commit record (structure, every checksum, every field).

    Raises ``FileNotFoundError`` when the step has no record (it was never committed),
    :class:`CorruptedCheckpointError` when the record is broken or hostile.
    """
    name = catalog.commit_record_name(step)
    where = storage.where(name)
    with storage.open(name) as handle, located(where, None):
        file = cast(BinaryIO, handle.cursor())
        layout = fmt.read_layout(file, where)
        if layout.step != step:
            raise CorruptedCheckpointError(
                f"commit record of step {layout.step} in step {step}'s folder", path=where
            )
        if len(layout.tensors) != 1 or len(layout.blobs) != 1 or layout.tensors[0].dtype != torch.uint8:
            raise CorruptedCheckpointError("bad commit record: it must hold one uint8 blob", path=where)
        nbytes = layout.blobs[0].nbytes
        if nbytes > MAX_RECORD_BLOB:
            raise CorruptedCheckpointError(f"bad commit record: {nbytes} bytes of metadata", path=where)
        data = bytearray(nbytes)
        fmt.read_blob_into(file, layout, 0, memoryview(data), verify=True, path=where)
    return decode_record(layout, bytes(data), path=where)


CHECK_THREADS = 32  # header reads in flight on the coordinator (each one is a small read)


def check_shards_durable(storage: Storage, step: int, shards: list[ShardDigest]) -> None:
    """Check that every rank's shard file reads back with the digest the rank reported (the
    coordinator does this before it commits; it reads headers only, several at a time).

    Raises :class:`CheckpointWriteError` naming the lowest rank whose file differs or is missing.
    """
    if len(shards) <= 1:
        errors = [_check_shard(storage, step, digest) for digest in shards]
    else:
        with ThreadPoolExecutor(
            min(CHECK_THREADS, len(shards)), thread_name_prefix="asyncckpt-check"
        ) as pool:
            errors = list(pool.map(lambda digest: _check_shard(storage, step, digest), shards))
    for error in errors:
        if error is not None:
            raise error


def _check_shard(storage: Storage, step: int, digest: ShardDigest) -> CheckpointWriteError | None:
    name = catalog.shard_name(step, digest.rank)
    where = storage.where(name)
    try:
        with storage.open(name) as handle:
            found = shard_digest(handle, where, digest.rank)
    except (OSError, CheckpointError) as exc:
        error = CheckpointWriteError(
            f"rank {digest.rank}'s shard does not read back before the commit: {exc}",
            path=where,
            rank=digest.rank,
            step=step,
        )
        error.__cause__ = exc
        return error
    if found != digest:
        return CheckpointWriteError(
            f"rank {digest.rank}'s shard differs from what it reported ({found} vs {digest})",
            path=where,
            rank=digest.rank,
            step=step,
        )
    return None
