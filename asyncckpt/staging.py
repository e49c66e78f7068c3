"""Staging: copy a snapshot's tensors into reused host buffers laid out like the file.

A buffer set is one uint8 host tensor holding every blob at the offset it will have in the file
(minus the 4 KiB prelude page), so the writer streams it out without another copy. On CUDA the
buffers are pinned and the copies are enqueued on a side stream; the returned
:class:`StagedCopy` tells when they are done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import format as fmt
from .dtypes import itemsize
from .snapshot import BlobSource, Snapshot, contiguous_stride

LayoutKey = tuple[tuple[int, str], ...]


@dataclass
class StagingBuffers:
    """One host buffer set, sized for one snapshot layout."""

    layout: LayoutKey
    data: torch.Tensor  # 1-D uint8, zero-filled at allocation (the padding stays zero)
    offsets: list[int]  # of each blob inside ``data``
    sizes: list[int]

    def blob(self, index: int) -> torch.Tensor:
        start = self.offsets[index]
        return self.data[start : start + self.sizes[index]]

    def blob_bytes(self) -> list[memoryview]:
        """Zero-copy views of each staged blob, for the writer."""
        return [fmt.tensor_bytes(self.blob(i)) for i in range(len(self.sizes))]

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())


@dataclass
class StagedCopy:
    """A snapshot being copied into a buffer set; ``wait()`` blocks until the bytes are there."""

    buffers: StagingBuffers
    event: Any = None  # torch.cuda.Event when any copy ran on a CUDA side stream
    sources: list[torch.Tensor] = field(default_factory=list)  # kept alive until the copy is done

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        self.sources.clear()


class StagingPool:
    """At most ``slots`` buffer sets; a set of the same layout is reused, never reallocated.

    ``acquire`` hands out a free set (reallocating it only when the layout changed), or returns
    None when all are in use and ``block`` is false (or ``timeout`` passes).
    """

    def __init__(self, slots: int, *, pin_memory: bool) -> None:
        if slots < 1:
            raise ValueError(f"max_pending must be >= 1, got {slots}")
        self.slots = slots
        self.pin_memory = pin_memory
        self.allocations = 0  # buffer sets allocated so far (a test checks reuse with it)
        self._free: list[StagingBuffers | None] = [None] * slots
        self._in_use = 0
        self._bytes = 0
        self._cond = threading.Condition()

    @property
    def nbytes(self) -> int:
        """Host memory held by the buffer sets, free or in use, as far as the pool knows."""
        with self._cond:
            return self._bytes

    @property
    def in_use(self) -> int:
        with self._cond:
            return self._in_use

    def try_acquire(self, layout: LayoutKey) -> StagingBuffers | None:
        """A free set for ``layout`` without waiting, or None when all are busy."""
        with self._cond:
            if not self._free:
                return None
            return self._take(layout)

    def acquire(self, layout: LayoutKey, *, timeout: float | None = None) -> StagingBuffers | None:
        """Wait until a set is free (at most ``timeout`` seconds); None on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._free), timeout):
                return None
            return self._take(layout)

    def _take(self, layout: LayoutKey) -> StagingBuffers:
        match = next((i for i, b in enumerate(self._free) if b is not None and b.layout == layout), None)
        buffers = self._free.pop(match if match is not None else -1)
        self._in_use += 1
        if buffers is None or buffers.layout != layout:
            if buffers is not None:
                self._bytes -= buffers.nbytes
            del buffers  # drop the old set before allocating its replacement
            buffers = self._allocate(layout)
            self._bytes += buffers.nbytes
        return buffers

    def release(self, buffers: StagingBuffers) -> None:
        with self._cond:
            self._free.append(buffers)
            self._in_use -= 1
            self._cond.notify()

    def _allocate(self, layout: LayoutKey) -> StagingBuffers:
        sizes = [size for size, _ in layout]
        file_offsets, end = fmt.blob_offsets(sizes)
        offsets = [o - fmt.DATA_OFFSET for o in file_offsets]
        data = torch.zeros(end - fmt.DATA_OFFSET, dtype=torch.uint8, pin_memory=self.pin_memory)
        self.allocations += 1
        return StagingBuffers(layout, data, offsets, sizes)


def stage(snapshot: Snapshot, buffers: StagingBuffers, *, side_stream: Any = None) -> StagedCopy:
    """Copy every blob of ``snapshot`` into ``buffers``.

    CPU tensors: one memcpy per tensor (strided inputs are made contiguous by the copy itself).
    CUDA tensors: ``non_blocking`` copies on ``side_stream`` after it waits for the current
    stream; each source is marked with ``record_stream`` so the caching allocator does not reuse
    its memory before the copy ran. Returns at once; ``StagedCopy.wait()`` blocks until done.
    """
    staged = StagedCopy(buffers)
    cuda_blobs = [i for i, b in enumerate(snapshot.blobs) if b.device.type == "cuda"]
    for index, blob in enumerate(snapshot.blobs):
        if blob.device.type != "cuda":
            _copy_blob(blob, buffers.blob(index), non_blocking=False)
    if cuda_blobs:
        staged.event = _stage_cuda(snapshot.blobs, cuda_blobs, buffers, side_stream, staged.sources)
    return staged


def _stage_cuda(
    blobs: Sequence[BlobSource],
    indices: list[int],
    buffers: StagingBuffers,
    side_stream: Any,
    keep_alive: list[torch.Tensor],
) -> Any:
    # The side stream must not start copying before the trainer's queued work wrote the values.
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        for index in indices:
            blob = blobs[index]
            _copy_blob(blob, buffers.blob(index), non_blocking=True)
            blob.tensor.record_stream(side_stream)
            keep_alive.append(blob.tensor)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(side_stream)
    return event


def _copy_blob(blob: BlobSource, dest: torch.Tensor, *, non_blocking: bool) -> None:
    if blob.nbytes == 0:
        return
    if blob.raw:
        dest.copy_(blob.tensor, non_blocking=non_blocking)
        return
    source = blob.tensor
    view = torch.empty(0, dtype=source.dtype)
    offset = int(dest.storage_offset()) // itemsize(source.dtype)
    shape = tuple(source.shape)
    view.set_(dest.untyped_storage(), offset, shape, contiguous_stride(shape))
    view.copy_(source, non_blocking=non_blocking)


def now_ms() -> float:
    return time.perf_counter() * 1000.0
