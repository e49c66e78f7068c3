"""Helpers of the hostile-file tests: a pickle that leaves a mark when unpickled, a guard that
fails on any unpickling, and a way to plant bytes in a shard with every checksum made right."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from asyncckpt import catalog
from asyncckpt import dist as adist
from asyncckpt import format as fmt
from asyncckpt.dist.commit import write_record
from asyncckpt.dist.shards import header_digest
from asyncckpt.storage import PosixStorage


class Boom:
    """Unpickling this creates ``marker`` (any code could run there instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@contextlib.contextmanager
def no_unpickling() -> Iterator[list[str]]:
    """Every way to unpickle fails (and is recorded) inside the block."""
    calls: list[str] = []
    saved = {
        name: getattr(pickle, name)
        for name in ("load", "loads", "Unpickler", "_load", "_loads", "_Unpickler")
    }
    saved_torch_load = torch.load

    def refuse(name: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} was called")

        return refused

    try:
        for name in saved:
            setattr(pickle, name, refuse(f"pickle.{name}"))
        torch.load = refuse("torch.load")
        yield calls
    finally:
        for name, value in saved.items():
            setattr(pickle, name, value)
        torch.load = saved_torch_load


def plain_model_and_optimizer(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def plant(root: Path, step: int, fqn: str, payload: bytes) -> None:
    """Replace the stored bytes of value ``fqn`` with ``payload`` and make every checksum and
    the commit record's digest agree: only the codec stands between the bytes and the reader."""
    storage = PosixStorage(root)
    record = adist.read_record(storage, step)
    where = next(loc for index, loc in record.metadata.storage_data.items() if index.fqn == fqn)
    name = catalog.shard_name(step, where.rank)
    with open(root / name, "rb") as file:
        layout = fmt.read_layout(file, name)
        blobs = []
        for blob in layout.blobs:
            file.seek(blob.offset)
            blobs.append(file.read(blob.nbytes))
    target = layout.tensors[where.tensor]
    tensors = list(layout.tensors)
    shared = [i for i, t in enumerate(tensors) if t.blob == target.blob]  # plain values share a blob
    parts = []
    offset = 0
    for i in shared:
        entry = tensors[i]
        data = (
            payload if i == where.tensor else blobs[entry.blob][entry.offset : entry.offset + entry.shape[0]]
        )
        tensors[i] = fmt.TensorEntry(entry.key, torch.uint8, (len(data),), (1,), entry.blob, offset)
        parts.append(data)
        offset += len(data)
    blobs[target.blob] = b"".join(parts)

    def body(sink: Any) -> int:
        return fmt.write_checkpoint(
            sink,
            step=step,
            metadata=layout.metadata,
            tree=layout.tree,
            tensors=tensors,
            sizes=[len(b) for b in blobs],
            blobs=[memoryview(b) for b in blobs],
        )

    storage.commit(storage.write(name, body))
    with storage.open(name) as handle:
        digest, _ = header_digest(handle, name, where.rank)
    shards = [digest if s.rank == where.rank else s for s in record.shards]
    write_record(storage, step=step, world_size=record.world_size, shards=shards, metadata=record.metadata)
