"""What the ranks of the object-store tests run (imported by the forkserver): multi-rank steps
written to and restored from an S3 bucket (a moto server) through the checkpointer."""

from __future__ import annotations

import copy
from typing import Any

import dist_workers as w
import torch

import asyncckpt

TIMEOUT_S = 20.0


def s3_options(endpoint: str) -> dict[str, Any]:
    """storage_options for s3fs against the moto server at ``endpoint``."""
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "use_listings_cache": False,
    }


def save_two_steps(rank: int, world: int, url: str, endpoint: str) -> dict[str, Any]:
    """Train an FSDP2 MLP + Adam and save steps 1 and 2 to ``url``; the full state at step 1
    (rank 0) and the steps listed."""
    model, optimizer = w.fsdp_trained(1, 1)
    options = s3_options(endpoint)
    with asyncckpt.AsyncCheckpointer(url, storage_options=options, coordination_timeout=TIMEOUT_S) as ckpt:
        ckpt.save(1, {"model": model, "optimizer": optimizer, "rng": asyncckpt.rng_state()})
        ckpt.flush()
        full = copy.deepcopy(w.full_state(model, optimizer))  # (its plain tensors are the live ones)
        w.train(model, optimizer, 2)
        handle = ckpt.save(2, {"model": model, "optimizer": optimizer, "rng": asyncckpt.rng_state()})
        ckpt.flush()
    listed = asyncckpt.list_checkpoints(url, storage_options=options)
    return {"full": full, "listed": [(c.step, str(c.path)) for c in listed], "path": str(handle.path)}


def restore_from(rank: int, world: int, url: str, endpoint: str) -> dict[str, Any]:
    """Restore into a fresh FSDP2 MLP + Adam from ``url``: the step, its diagnostics and the
    full state restored (rank 0)."""
    torch.manual_seed(50 + rank)
    model, optimizer = w.fsdp_trained(9, 1)  # other weights: the restore must replace them
    options = s3_options(endpoint)
    with asyncckpt.AsyncCheckpointer(url, storage_options=options, coordination_timeout=TIMEOUT_S) as ckpt:
        restored = ckpt.restore({"model": model, "optimizer": optimizer})
    assert restored is not None
    return {
        "step": restored.step,
        "path": str(restored.path),
        "diagnostics": [(d.path, d.kind, d.reason) for d in restored.diagnostics],
        "full": w.full_state(model, optimizer),
    }


def leave_half_step(rank: int, world: int, url: str, endpoint: str, part_size: int) -> None:
    """What a save of step 3 killed before its commit record leaves, then exit (the harness's
    ``os._exit``: no clean-up runs): rank 0's shard committed, rank 1's shard uploaded without
    its commit object, and rank 1's re-upload of its step-2 shard started, never finished (an
    unfinished multipart upload in a committed step's folder)."""
    from asyncckpt import catalog
    from asyncckpt.storage.records import data_name, new_token
    from asyncckpt.storage.remote import FsspecStorage

    storage = FsspecStorage(url, storage_options=s3_options(endpoint), part_size=part_size)

    def shard(sink: Any) -> int:
        sink.write(b"shard bytes" * 100)
        return 1100

    written = storage.write(catalog.shard_name(3, rank), shard)
    if rank == 0:
        storage.commit(written)
        return
    upload = storage.store.upload(storage.key(data_name(catalog.shard_name(2, 1), new_token())))
    upload.write(bytes(part_size + 1))  # the first part is sent: the multipart upload exists


def save_one_step(rank: int, world: int, url: str, endpoint: str, step: int) -> list[int]:
    """Open a checkpointer on ``url`` and save ``step`` of an FSDP2 MLP + Adam; the steps listed."""
    model, optimizer = w.fsdp_trained(1, 1)
    options = s3_options(endpoint)
    with asyncckpt.AsyncCheckpointer(url, storage_options=options, coordination_timeout=TIMEOUT_S) as ckpt:
        ckpt.save(step, {"model": model, "optimizer": optimizer, "rng": asyncckpt.rng_state()})
        ckpt.flush()
    return [c.step for c in asyncckpt.list_checkpoints(url, storage_options=options)]
