"""Ranks of the shard read-back tests (imported by the forkserver)."""

from __future__ import annotations

from typing import Any

import torch

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt.dist import shards


def save_counting_read_backs(rank: int, world: int, root: str, verify: str) -> dict[str, Any]:
    """A DDP model saved twice by the checkpointer with ``verify``; how many shard files this
    rank read back blob by blob (``fmt.verify_blobs``) before reporting them durable."""
    calls = []
    real = fmt.verify_blobs

    def spy(*args: Any, **kwargs: Any) -> Any:
        if "rank-" in str(kwargs.get("path")):  # a shard file (the commit record is always read)
            calls.append(1)
        return real(*args, **kwargs)

    shards.fmt.verify_blobs = spy  # type: ignore[attr-defined]
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 64))
        with asyncckpt.AsyncCheckpointer(root, verify=verify, coordination_timeout=10.0) as ckpt:  # type: ignore[arg-type]
            for step in (1, 2):
                ckpt.save(step, {"model": model}).result()
    finally:
        shards.fmt.verify_blobs = real  # type: ignore[attr-defined]
    return {"read_backs": len(calls)}
