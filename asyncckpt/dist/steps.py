"""Whole multi-rank steps: listing, deleting, and cleaning up what failed saves left.

One rank does these (rank 0 of the coordination group), and never while a save is in flight:
a step folder without its record is also what a save looks like before its commit.
"""

from __future__ import annotations

from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from .. import catalog
from .. import format as fmt
from ..errors import CheckpointError, CorruptedCheckpointError, Diagnostic
from ..storage import Location, open_storage
from .commit import read_record
from .planner import decode_value
from .record import CommitRecord, ItemLocation
from .shards import ShardFiles
from .verify import diagnose, utc_now


def committed_steps(location: Location) -> list[catalog.StepInfo]:
    """The committed multi-rank steps of ``location``, oldest first (see :mod:`asyncckpt.catalog`)."""
    return catalog.committed_steps(open_storage(location))


def check_step(location: Location, step: int) -> list[Diagnostic]:
    """Check all of ``step``, whatever world size will read it: the commit record, then every
    rank's shard (its digest, every blob's CRC32C, every item against the record, every plain
    value decodes). One diagnostic per broken file; an empty list when the step is intact."""
    storage = open_storage(location)
    where = storage.where(catalog.step_folder_name(step))
    try:
        record = read_record(storage, step)
    except FileNotFoundError:
        reason = "no commit record: the step was never committed"
        return [Diagnostic(where, "corrupted", reason, utc_now(), step)]
    except (CheckpointError, OSError) as exc:
        return [diagnose(exc, where, step)]
    found = []
    with ShardFiles(storage, record) as shards:
        for rank in range(record.world_size):
            try:
                _check_shard(shards, record, rank)
            except (CheckpointError, OSError) as exc:
                found.append(diagnose(exc, shards.where(rank), step))
    return found


def _check_shard(shards: ShardFiles, record: CommitRecord, rank: int) -> None:
    layout = shards.layout(rank)
    for tensor in range(len(layout.tensors)):
        shards.verify(rank, tensor)
    shards.per_rank(rank)
    items: dict[MetadataIndex, ItemLocation] = record.metadata.storage_data
    for index, location in items.items():
        if location.rank != rank:
            continue
        entry = shards.entry(rank, location.tensor)
        md = record.metadata.state_dict_metadata[index.fqn]
        if not isinstance(md, TensorStorageMetadata):
            decode_value(bytes(fmt.tensor_bytes(shards.read(rank, location.tensor))), key=index.fqn)
            continue
        sizes = [tuple(c.sizes) for c in md.chunks if index.offset is not None and c.offsets == index.offset]
        if entry.dtype != md.properties.dtype or entry.shape not in sizes:
            raise CorruptedCheckpointError(
                f"tensor {location.tensor} ({entry.key}) is not the chunk of {index.fqn} "
                "the record describes",
                path=shards.where(rank),
                rank=rank,
            )


def delete_step(location: Location, step: int) -> None:
    """Remove ``step`` durably: its commit record first, so that the step stops existing at once
    and a crash halfway leaves an uncommitted folder, never a committed step missing a shard;
    then its other files and what abandoned writes left in it, then the folder."""
    storage = open_storage(location)
    folder = catalog.step_folder_name(step)
    storage.delete([catalog.commit_record_name(step)])
    stray = storage.leftovers_in(folder)
    storage.delete([obj.name for obj in storage.ls(folder) if obj.kind == "file"])
    storage.remove_leftovers(stray)
    storage.delete([folder])


def remove_uncommitted(location: Location) -> list[str]:
    """Remove every step folder without a commit record (saves that failed or were
    interrupted) and what abandoned writes left in step folders (temp files; on object stores
    uploads without their commit object); return the folders removed.

    What a live writer may still be writing is kept (see :meth:`Storage.leftovers`). Call it at
    start-up on one rank, before any save: an in-flight save of this run looks the same.
    """
    storage = open_storage(location)
    folders = catalog.uncommitted_step_folders(storage)
    stray = [
        name
        for name in storage.leftovers()
        if "/" in name and catalog.parse_step_folder(name.partition("/")[0]) is not None
    ]
    for folder in folders:
        storage.delete([obj.name for obj in storage.ls(folder) if obj.kind == "file"])
    storage.remove_leftovers(stray)
    storage.delete(folders)
    return folders
