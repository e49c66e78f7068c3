"""What a rank reports of the shard it wrote, and what the coordinator makes of the reports.

DCP gathers every rank's write results to the coordinator, pickled: a rank reports its whole
shard as one :class:`ShardWrites` (its digest, the index of its first item, its items' keys as
one msgpack blob) rather than one ``WriteResult`` per item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.checkpoint.storage import WriteResult

from .. import format as fmt
from ..errors import CheckpointWriteError
from .record import ItemLocation, ShardDigest


class LocalOnly(dict[Any, Any]):
    """A dict that pickles as an empty one: kept whole here, not sent to the other ranks."""

    def __reduce__(self) -> tuple[type[dict[Any, Any]], tuple[()]]:
        return dict, ()


@dataclass(frozen=True)
class ShardWrites:
    """A rank's write results as one: its shard's digest, the index of the shard's first item
    tensor, and the items' keys in the order written (:func:`item_keys`)."""

    digest: ShardDigest
    first: int
    keys: bytes


def item_keys(items: list[WriteItem]) -> bytes:
    """The items' ``[fqn, offset or None]`` as msgpack, in order."""
    rows = [[i.index.fqn, None if i.index.offset is None else [*i.index.offset]] for i in items]
    return fmt.pack(rows)


def collect(
    results: list[list[WriteResult]], step: int
) -> tuple[list[ShardDigest], dict[MetadataIndex, ItemLocation]]:
    """Every rank's shard digest and the location of every item, from the ranks' results.
    Raises :class:`CheckpointWriteError` naming a rank that reported no shard."""
    digests: list[ShardDigest] = []
    locations: dict[MetadataIndex, ItemLocation] = {}
    for rank, rank_results in enumerate(results):
        found = [r.storage_data for r in rank_results if isinstance(r.storage_data, ShardWrites)]
        if len(found) != 1 or found[0].digest.rank != rank:
            raise CheckpointWriteError(
                f"rank {rank} reported no durable shard; the step is not committed", rank=rank, step=step
            )
        writes = found[0]
        digests.append(writes.digest)
        for tensor, (fqn, offset) in enumerate(fmt.unpack(writes.keys), start=writes.first):
            locations[MetadataIndex(fqn, offset)] = ItemLocation(rank, tensor)
    return digests, locations
