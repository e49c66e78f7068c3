"""Staging: copy a snapshot's tensors into reused host buffers laid out like the file.

A buffer set is one uint8 host tensor holding every blob at the offset it will have in the file
(minus the 4 KiB prelude page), so the writer streams it out without another copy. On CUDA the
buffers are pinned and the copies are enqueued on a side stream; the returned
:class:`StagedCopy` tells when they are done.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from . import format as fmt
from .dtypes import itemsize
from .snapshot import BlobLayout, Snapshot, contiguous_stride

LayoutKey = tuple[BlobLayout, ...]


@dataclass
class StagingBuffers:
    """One host buffer set, sized for one snapshot layout."""

    layout: LayoutKey
    data: torch.Tensor  # 1-D uint8, zero-filled at allocation (the padding stays zero)
    offsets: list[int]  # of each blob inside ``data``
    sizes: list[int]
    destinations: list[torch.Tensor]  # per blob: a view of ``data`` shaped like its source

    def blob(self, index: int) -> torch.Tensor:
        start = self.offsets[index]
        return self.data[start : start + self.sizes[index]]

    def blob_bytes(self) -> list[memoryview]:
        """Zero-copy views of each staged blob, for the writer."""
        whole = fmt.tensor_bytes(self.data)
        return [whole[start : start + size] for start, size in zip(self.offsets, self.sizes, strict=True)]

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
        sizes = [entry[0] for entry in layout]
        file_offsets, end = fmt.blob_offsets(sizes)
        offsets = [o - fmt.DATA_OFFSET for o in file_offsets]
        data = torch.zeros(end - fmt.DATA_OFFSET, dtype=torch.uint8, pin_memory=self.pin_memory)
        destinations = [
            _destination(data, offset, dtype, shape)
            for offset, (_, _, dtype, shape) in zip(offsets, layout, strict=True)
        ]
        self.allocations += 1
        return StagingBuffers(layout, data, offsets, sizes, destinations)


def _destination(data: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous ``dtype`` view of ``data`` at byte ``offset`` (4 KiB aligned) with ``shape``."""
    view = torch.empty(0, dtype=dtype)
    view.set_(data.untyped_storage(), offset // itemsize(dtype), shape, contiguous_stride(shape))
    return view


def stage(snapshot: Snapshot, buffers: StagingBuffers, *, side_stream: Any = None) -> StagedCopy:
    """Copy every blob of ``snapshot`` into ``buffers``.

    CPU tensors: one memcpy per tensor (strided inputs are made contiguous by the copy itself),
    issued as one batched call. CUDA tensors: ``non_blocking`` copies on ``side_stream`` after it
    waits for the current stream; each source is marked with ``record_stream`` so the caching
    allocator does not reuse its memory before the copy ran. Returns at once on CUDA;
    ``StagedCopy.wait()`` blocks until the copies are done.
    """
    staged = StagedCopy(buffers)
    host: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    cuda: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for blob, destination in zip(snapshot.blobs, buffers.destinations, strict=True):
        if blob.nbytes:
            pair = cuda if blob.tensor.is_cuda else host
            pair[0].append(destination)
            pair[1].append(blob.tensor)
    _copy_all(*host, non_blocking=False)
    if cuda[0]:
        staged.event = _stage_cuda(*cuda, side_stream, staged.sources)
    return staged


def _stage_cuda(
    destinations: list[torch.Tensor],
    sources: list[torch.Tensor],
    side_stream: Any,
    keep_alive: list[torch.Tensor],
) -> Any:
    # The side stream must not start copying before the trainer's queued work wrote the values.
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        _copy_all(destinations, sources, non_blocking=True)
        for source in sources:
            source.record_stream(side_stream)
        keep_alive.extend(sources)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(side_stream)
    return event


def _copy_all(destinations: list[torch.Tensor], sources: list[torch.Tensor], *, non_blocking: bool) -> None:
    """``dst.copy_(src)`` for each pair, in one call where torch has the batched kernel."""
    if not destinations:
        return
    foreach_copy = getattr(torch, "_foreach_copy_", None)
    if foreach_copy is not None:
        foreach_copy(destinations, sources, non_blocking=non_blocking)
        return
    for destination, source in zip(destinations, sources, strict=True):
        destination.copy_(source, non_blocking=non_blocking)
