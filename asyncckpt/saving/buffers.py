"""Host buffers for staging: a pool of buffer sets, each laid out like the file or bounded.

A :class:`StagingBuffers` set is one uint8 host tensor holding every blob at the offset it will
have in the file (minus the 4 KiB prelude page), so the writer streams it out without another
copy. With a staging budget, a state larger than its share of the budget gets a
:class:`RingBuffers` set instead, which the state streams through in pieces
(:mod:`asyncckpt.saving.streaming`). Buffers are pinned when CUDA is present.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from .. import format as fmt
from ..dtypes import itemsize
from ..errors import UsageError
from .snapshot import LayoutKey, contiguous_stride

MIN_BUDGET_PER_SLOT = 64 << 10  # two halves of 32 KiB: the smallest ring that still streams


@dataclass
class StagingBuffers:
    """One host buffer set, sized for one snapshot layout."""

    layout: LayoutKey
    data: torch.Tensor  # 1-D uint8, zero-filled at allocation (the padding stays zero)
    offsets: list[int]  # of each blob inside ``data``
    sizes: list[int]
    destinations: list[torch.Tensor]  # per blob: a view of ``data`` shaped like its source
    plan: Any = None  # the last (structure, deferred, CopyPlan) staged into these buffers

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


class RingBuffers:
    """A host buffer of two halves for a state larger than the staging budget.

    Stands in for a :class:`StagingBuffers` set in the pool: same ``layout``, ``sizes`` and
    ``nbytes``; ``plan`` caches the last stream plan (:mod:`asyncckpt.saving.streaming`).
    """

    def __init__(self, layout: LayoutKey, capacity: int, *, pin_memory: bool) -> None:
        self.layout = layout
        self.sizes = [entry[0] for entry in layout]
        self.half = max(capacity // 2 // fmt.ALIGN * fmt.ALIGN, fmt.ALIGN)
        self.data = aligned_zeros(2 * self.half, pin_memory=pin_memory)
        self.plan: Any = None

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())


Buffers = StagingBuffers | RingBuffers


class StagingPool:
    """At most ``slots`` buffer sets; a set of the same layout is reused, never reallocated.

    ``acquire`` hands out a free set (reallocating it only when the layout changed), or returns
    None when all are in use and ``block`` is false (or ``timeout`` passes). With a ``budget``
    (bytes, all sets together), a layout larger than its share gets a :class:`RingBuffers` set
    of that share.
    """

    def __init__(self, slots: int, *, pin_memory: bool, budget: int | None = None) -> None:
        if slots < 1:
            raise UsageError(f"max_pending must be >= 1, got {slots}")
        if budget is not None and budget < MIN_BUDGET_PER_SLOT * slots:
            raise UsageError(
                f"staging_budget must be at least {MIN_BUDGET_PER_SLOT * slots} bytes "
                f"({MIN_BUDGET_PER_SLOT} per pending save), got {budget}"
            )
        self.slots = slots
        self.pin_memory = pin_memory
        self.budget = budget
        self.allocations = 0  # buffer sets allocated so far (a test checks reuse with it)
        self._free: list[Buffers | None] = [None] * slots
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

    def try_acquire(self, layout: LayoutKey) -> Buffers | None:
        """A free set for ``layout`` without waiting, or None when all are busy."""
        with self._cond:
            if not self._free:
                return None
            return self._take(layout)

    def acquire(self, layout: LayoutKey, *, timeout: float | None = None) -> Buffers | None:
        """Wait until a set is free (at most ``timeout`` seconds); None on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._free), timeout):
                return None
            return self._take(layout)

    def _take(self, layout: LayoutKey) -> Buffers:
        match = next((i for i, b in enumerate(self._free) if b is not None and _same(b.layout, layout)), None)
        buffers = self._free.pop(match if match is not None else -1)
        self._in_use += 1
        if buffers is None or not _same(buffers.layout, layout):
            if buffers is not None:
                self._bytes -= buffers.nbytes
            del buffers  # drop the old set before allocating its replacement
            buffers = self._allocate(layout)
            self._bytes += buffers.nbytes
        return buffers

    def release(self, buffers: Buffers) -> None:
        with self._cond:
            self._free.append(buffers)
            self._in_use -= 1
            self._cond.notify()

    def _allocate(self, layout: LayoutKey) -> Buffers:
        sizes = [entry[0] for entry in layout]
        file_offsets, end = fmt.blob_offsets(sizes)
        share = None if self.budget is None else self.budget // self.slots
        if share is not None and end - fmt.DATA_OFFSET > share:
            self.allocations += 1
            return RingBuffers(layout, share, pin_memory=self.pin_memory)
        offsets = [o - fmt.DATA_OFFSET for o in file_offsets]
        data = aligned_zeros(end - fmt.DATA_OFFSET, pin_memory=self.pin_memory)
        destinations = [
            destination(data, offset, dtype, shape)
            for offset, (_, _, dtype, shape) in zip(offsets, layout, strict=True)
        ]
        self.allocations += 1
        return StagingBuffers(layout, data, offsets, sizes, destinations)


def _same(a: LayoutKey, b: LayoutKey) -> bool:
    """Equal layouts; a reused structure hands over the same tuple (no walk of 10,000 entries)."""
    return a is b or a == b


def aligned_zeros(nbytes: int, *, pin_memory: bool) -> torch.Tensor:
    """A zeroed 1-D uint8 host tensor of ``nbytes`` whose first byte is 4 KiB-aligned, as blobs
    are in the file: the writer can then send long runs of it around the page cache
    (:mod:`asyncckpt.storage.direct`). Torch aligns large host tensors to 64 bytes only."""
    raw = torch.zeros(nbytes + fmt.ALIGN, dtype=torch.uint8, pin_memory=pin_memory)
    shift = -raw.data_ptr() % fmt.ALIGN
    return raw[shift : shift + nbytes]


def destination(data: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous ``dtype`` view of ``data`` at byte ``offset`` with ``shape`` (``offset`` a
    multiple of the element size, as is ``data``'s own offset in its storage)."""
    view = torch.empty(0, dtype=dtype)
    start = data.storage_offset() + offset
    view.set_(data.untyped_storage(), start // itemsize(dtype), shape, contiguous_stride(shape))
    return view
