"""Synchronous, durable save and checked load of one checkpoint file."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import format as fmt
from ._tree import unflatten
from .format import TensorEntry
from .format.legacy import LEGACY_VERSION, legacy_step, load_legacy
from .save.snapshot import BlobSource, Snapshot, flatten, flatten_metadata
from .storage import OS, FileOps, Sink, WriteTimings, atomic_write

MapLocation = str | torch.device


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its state tree, step, user metadata, format version and file."""

    state: Any
    step: int
    metadata: dict[str, Any]
    version: str
    path: Path


def save(
    path: str | os.PathLike[str],
    state: Any,
    *,
    step: int,
    metadata: dict[str, Any] | None = None,
    ops: FileOps = OS,
) -> Path:
    """Write ``state`` to ``path`` durably and atomically; return the path.

    After a crash at any instant ``path`` holds either its previous complete content or the new
    complete file. Tensor bytes are written straight from tensor memory (CUDA tensors are copied to
    the host one at a time). Raises ``TypeError`` naming the key path of a value that cannot be
    stored, and ``TypeError`` / ``ValueError`` for a step that is not an int in
    ``[0, 2**63 - 1]``, before anything is written; :class:`CheckpointWriteError` when the
    write fails.
    """
    fmt.check_step(step)
    final = Path(path)
    snapshot = flatten(state)
    meta = flatten_metadata(metadata)
    write_snapshot(
        final,
        tree=snapshot.tree,
        tensors=snapshot.tensors,
        sizes=[blob.nbytes for blob in snapshot.blobs],
        step=step,
        metadata=meta,
        blobs=_host_bytes(snapshot),
        ops=ops,
    )
    return final


def write_snapshot(
    final: Path,
    *,
    tree: Any,
    tensors: Sequence[TensorEntry],
    sizes: Sequence[int],
    step: int,
    metadata: Any,
    blobs: Iterator[memoryview],
    ops: FileOps = OS,
) -> WriteTimings:
    """Atomically write a flattened state whose blob bytes ``blobs`` yields, in order."""

    header = fmt.prepare_header(step=step, metadata=metadata, tree=tree, tensors=tensors, sizes=sizes)

    def body(sink: Sink) -> int:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncckpt-crc") as checksums:
            return fmt.write_file(sink, header, blobs, checksum_pool=checksums)

    return atomic_write(final, body, ops=ops)


def _host_bytes(snapshot: Snapshot) -> Iterator[memoryview]:
    for blob in snapshot.blobs:
        yield fmt.tensor_bytes(_host_contiguous(blob))


def _host_contiguous(blob: BlobSource) -> torch.Tensor:
    tensor = blob.tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return tensor.contiguous()


def load(
    path: str | os.PathLike[str],
    *,
    map_location: MapLocation = "cpu",
    validate: bool = True,
) -> Checkpoint:
    """Read and check one checkpoint file.

    v1 files are checked for structure and, with ``validate=True``, every checksum; tensors are
    read straight into their own memory. Legacy ``torch.save`` files load read-only with
    ``weights_only=True`` and report ``version == "0.x"``.

    Raises :class:`CorruptedCheckpointError` (broken bytes), :class:`UnsupportedVersionError`
    (newer format), ``FileNotFoundError`` / ``PermissionError`` for a file that cannot be opened.
    """
    file_path = Path(path)
    with open(file_path, "rb", buffering=0) as file:
        if fmt.sniff(file.read(fmt.SNIFF_BYTES), path=file_path) is fmt.FileKind.V1:
            return _load_v1(file, file_path, map_location=map_location, validate=validate)
    state = load_legacy(file_path, map_location=map_location)
    step = legacy_step(state, file_path)
    return Checkpoint(state, -1 if step is None else step, {}, LEGACY_VERSION, file_path)


def _load_v1(file: Any, path: Path, *, map_location: MapLocation, validate: bool) -> Checkpoint:
    layout = fmt.read_layout(file, str(path))
    device = torch.device(map_location)
    blobs = _read_blobs(file, layout, verify=validate, path=path)
    if device.type != "cpu":
        blobs = [blob.to(device) for blob in blobs]
    tensors = [fmt.view_tensor(entry, blobs[entry.blob]) for entry in layout.tensors]
    state = unflatten(layout.tree, tensors)
    metadata = unflatten(layout.metadata, [])
    return Checkpoint(state, layout.step, metadata, layout.version, path)


def _read_blobs(file: Any, layout: fmt.Layout, *, verify: bool, path: Path) -> list[torch.Tensor]:
    """Every blob of an open v1 file, each read straight into a new 1-D uint8 CPU tensor.

    Large blobs are checksummed in a helper thread while the next ones are read; the first
    broken blob (in file order) is the one reported.
    """
    blobs = []
    checks = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncckpt-crc") as checker:
        for index, entry in enumerate(layout.blobs):
            blob = torch.empty(entry.nbytes, dtype=torch.uint8)
            data = fmt.tensor_bytes(blob)
            inline = verify and entry.nbytes < fmt.PARALLEL_CRC_MIN
            fmt.read_blob_into(file, layout, index, data, verify=inline, path=str(path))
            if verify and not inline:
                checks.append(checker.submit(fmt.verify_crc, layout, index, data, path=str(path)))
            blobs.append(blob)
        for check in checks:
            check.result()
    return blobs
