"""Each rank's share of the replicated tensors: it stages and writes those, and leaves the rest.

Under DDP (and for any plain tensor of a module or optimizer) every rank holds the same tensor,
and DCP's planner has it written by one rank only. Staging every replicated tensor on every rank
before ``save()`` returns would copy the whole replica ``W`` times for one write. So each rank
keeps, of the tree it saves, only the replicated tensors it owns: the tensors are spread over
the ranks by a rule every rank computes alike from the same input (each tensor's key path and
size, in the order found: largest first to the least loaded rank, ties to the lowest rank), and
DCP then finds each one on exactly one rank. The others are never read, staged or watched.

The decision is made once per structure and reused while the replicated tensors keep their key
paths and sizes. Its digest travels with the step's first exchange: ranks whose replicated
tensors differ (a tensor one rank has and its owner lacks would be lost) fail the step on every
rank, before anything is written.
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass
from typing import Any, NamedTuple

KeyPath = tuple[Any, ...]
Signature = tuple[tuple[KeyPath, int], ...]  # per replicated tensor: key path, bytes


@dataclass(frozen=True)
class ShareStats:
    """One save's replicated tensors (all of them, on every rank) and this rank's share of them
    (the tensors it stages and writes): counts and bytes."""

    replicated_tensors: int = 0
    replicated_bytes: int = 0
    staged_tensors: int = 0
    staged_bytes: int = 0


@dataclass(frozen=True)
class _Decision:
    """Which positions of a signature this rank owns, and the signature's digest."""

    signature: Signature
    owned: frozenset[int]
    digest: str


class Replicated(NamedTuple):
    """A replicated tensor in a dict of the localized tree: ``parent[key]``, at ``path``."""

    parent: dict[Any, Any]
    key: Any
    path: KeyPath
    nbytes: int


class ReplicaShare:
    """This rank's share of the replicated tensors of the states it saves (rank ``rank`` of
    ``world_size``). ``stats`` holds the last save's figures; ``decisions`` counts the times the
    share was decided (once per structure)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.stats = ShareStats()
        self.decisions = 0
        self._last: _Decision | None = None

    def keep_own(self, found: list[Replicated]) -> str | None:
        """Remove from their dicts the replicated tensors of ``found`` that other ranks write
        (``found``: every replicated tensor of one save's tree, in the order found, as
        :func:`~asyncckpt.dist.stage.localize` lists them; their dicts are that tree's own).
        Returns the digest every rank must agree on, or None on one rank (nothing is removed
        then)."""
        total = sum(f.nbytes for f in found)
        if self.world_size == 1:
            self.stats = ShareStats(len(found), total, len(found), total)
            return None
        decision = self._decide(tuple((f.path, f.nbytes) for f in found))
        kept = 0
        for position, item in enumerate(found):
            if position in decision.owned:
                kept += item.nbytes
            else:
                del item.parent[item.key]
        self.stats = ShareStats(len(found), total, len(decision.owned), kept)
        return decision.digest

    def _decide(self, signature: Signature) -> _Decision:
        last = self._last
        if last is not None and last.signature == signature:
            return last
        owners = spread([nbytes for _, nbytes in signature], self.world_size)
        owned = frozenset(i for i, owner in enumerate(owners) if owner == self.rank)
        digest = hashlib.blake2b(repr(signature).encode(), digest_size=16).hexdigest()
        self._last = _Decision(signature, owned, digest)
        self.decisions += 1
        return self._last


def spread(sizes: list[int], world_size: int) -> list[int]:
    """The owner rank of each of ``sizes``: largest first, each to the rank with the fewest
    bytes so far (ties: the lowest rank). Depends only on ``sizes`` and their order."""
    owners = [0] * len(sizes)
    loads = [(0, rank) for rank in range(world_size)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + sizes[index], rank))
    return owners
