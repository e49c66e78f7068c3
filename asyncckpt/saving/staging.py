"""Staging: copy a snapshot's tensors into reused host buffers laid out like the file.

A buffer set is one uint8 host tensor holding every blob at the offset it will have in the file
(minus the 4 KiB prelude page), so the writer streams it out without another copy. On CUDA the
buffers are pinned and the copies are enqueued on a side stream; CPU blobs that only the
optimizer step changes may be copied by a background thread while forward and backward run. The
returned :class:`StagedCopy` tells when each blob is there.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .. import format as fmt
from ..dtypes import itemsize
from ..errors import UsageError
from .snapshot import LayoutKey, Snapshot, contiguous_stride


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


class StagedCopy:
    """A snapshot being copied into a buffer set.

    Blobs are copied in up to three ways: at once by ``stage()`` (the trainer's thread), in the
    background by a :class:`Copier` (``deferred`` blobs, in blob order), or on a CUDA side stream.
    The writer takes each blob as soon as its bytes are there (:meth:`blob_bytes`); the trainer's
    optimizer hook waits for all of them (:meth:`guard`); :meth:`settle` waits without raising
    before the buffers go back to the pool.
    """

    def __init__(self, buffers: StagingBuffers, deferred: Sequence[int] = ()) -> None:
        self.buffers = buffers
        self.event: Any = None  # torch.cuda.Event after the last CUDA copy
        self.sources: list[torch.Tensor] = []  # CUDA sources kept alive until their copy ran
        self.deferred = list(deferred)  # ascending blob indices the copier fills
        self._copied = 0  # how many of ``deferred`` are copied
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._finished = threading.Event()
        self._watched: list[tuple[torch.Tensor, ...]] = []  # per deferred blob, see BlobSource.watched
        self._versions: list[tuple[int, ...]] = []  # their version counters at stage()
        if not self.deferred:
            self._finished.set()

    def run_deferred(self, destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        """Copy the deferred blobs (in the copier thread), publishing progress group by group.

        Each source's version counter is compared with its value at ``stage()`` after its group
        is copied: a source changed in place in between (not by the optimizer step, which waits
        for this copy) would make the checkpoint a mix of two states, so the copy fails.
        """
        watched, versions = self._watched, self._versions
        try:
            for begin, end in _groups([self.buffers.sizes[i] for i in self.deferred]):
                _copy_all(destinations[begin:end], sources[begin:end], non_blocking=False)
                for k in range(begin, end):
                    if _versions(watched[k]) != versions[k]:
                        raise StagingRaceError(self.deferred[k])
                with self._cond:
                    self._copied = end
                    self._cond.notify_all()
        except BaseException as exc:  # handed to the writer; the trainer's hook only waits
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:
            sources.clear()
            watched.clear()
            versions.clear()
            self._finished.set()

    def background_done(self) -> bool:
        """Whether the background copy has ended (at once true when there is none)."""
        return self._finished.is_set()

    def done(self) -> bool:
        """Whether every copy has ended: the background one and those on the CUDA side stream."""
        return self._finished.is_set() and (self.event is None or bool(self.event.query()))

    def wait_blob(self, index: int) -> None:
        """Block until blob ``index`` is in the buffers; raise if the background copy failed."""
        position = bisect.bisect_left(self.deferred, index)
        if position == len(self.deferred) or self.deferred[position] != index:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._copied > position or self._error is not None)
            if self._copied <= position:
                raise _copy_failed(self._error)

    def blob_bytes(self) -> Iterator[memoryview]:
        """Each blob's staged bytes, in order, each yielded once it is copied."""
        if self.event is not None:
            self.event.synchronize()
            self.sources.clear()
        for index, view in enumerate(self.buffers.blob_bytes()):
            self.wait_blob(index)
            yield view

    def wait(self) -> None:
        """Block until every blob is copied; raise if the background copy failed."""
        self.settle()
        if self._error is not None:
            raise _copy_failed(self._error)

    def settle(self) -> None:
        """Block until no copy into the buffers or out of the sources is still running."""
        self._finished.wait()
        if self.event is not None:
            self.event.synchronize()
        self.sources.clear()

    def guard(self) -> None:
        """Order the trainer after the copies: wait for the background copy, and make the
        current CUDA stream wait (on the GPU) for the side stream's copies."""
        self._finished.wait()
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)


def _versions(tensors: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    return tuple(t._version for t in tensors)


class StagingRaceError(RuntimeError):
    """A source tensor changed in place while its background copy was pending."""

    def __init__(self, blob: int) -> None:
        super().__init__(f"blob {blob} changed in place before it was copied")
        self.blob = blob


def _copy_failed(error: BaseException | None) -> BaseException:
    if isinstance(error, StagingRaceError):
        return error
    failure = RuntimeError(f"staging copy failed: {error!r}")
    failure.__cause__ = error
    return failure


# Background copies are published to the writer in groups of about this many bytes.
GROUP_BYTES = 16 << 20


def _groups(sizes: list[int]) -> Iterator[tuple[int, int]]:
    """``[begin, end)`` index ranges of consecutive sizes adding up to about GROUP_BYTES."""
    begin, acc = 0, 0
    for index, size in enumerate(sizes):
        acc += size
        if acc >= GROUP_BYTES:
            yield begin, index + 1
            begin, acc = index + 1, 0
    if begin < len(sizes):
        yield begin, len(sizes)


class Copier:
    """One background thread that runs deferred copies, oldest save first.

    Torch's copy kernels release the GIL, so the trainer's thread runs on meanwhile.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None

    def submit(
        self, staged: StagedCopy, destinations: list[torch.Tensor], sources: list[torch.Tensor]
    ) -> None:
        """Queue ``staged``'s deferred copies (``destinations[i].copy_(sources[i])``)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncckpt-stage")
        self._executor.submit(self.run, staged, destinations, sources)

    def run(self, staged: StagedCopy, destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        """Run one save's deferred copies (in the copier thread)."""
        staged.run_deferred(destinations, sources)

    def close(self) -> None:
        """Wait for the copies queued so far and stop the thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class StagingPool:
    """At most ``slots`` buffer sets; a set of the same layout is reused, never reallocated.

    ``acquire`` hands out a free set (reallocating it only when the layout changed), or returns
    None when all are in use and ``block`` is false (or ``timeout`` passes).
    """

    def __init__(self, slots: int, *, pin_memory: bool) -> None:
        if slots < 1:
            raise UsageError(f"max_pending must be >= 1, got {slots}")
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


def stage(
    snapshot: Snapshot,
    buffers: StagingBuffers,
    *,
    side_stream: Any = None,
    deferred: Collection[int] = (),
    copier: Copier | None = None,
) -> StagedCopy:
    """Copy every blob of ``snapshot`` into ``buffers``.

    CPU blobs: one memcpy per tensor (strided inputs are made contiguous by the copy itself),
    issued as one batched call; with a ``copier``, the blobs in ``deferred`` are instead copied
    by its background thread after this returns. CUDA blobs: ``non_blocking`` copies on
    ``side_stream`` after it waits for the current stream, each source marked with
    ``record_stream`` so the caching allocator does not reuse its memory before the copy ran.
    CUDA blobs not in ``deferred`` are copied first and the current stream waits for them (on
    the GPU), so later kernels of the trainer cannot overwrite them before they are copied;
    the blobs in ``deferred`` are only ordered by :meth:`StagedCopy.guard`.
    """
    if copier is None:
        deferred = ()
    later = sorted(i for i in deferred if snapshot.blobs[i].nbytes and not snapshot.blobs[i].tensor.is_cuda)
    staged = StagedCopy(buffers, later)
    now: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    background: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    cuda_first: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    cuda_last: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for index, (blob, destination) in enumerate(zip(snapshot.blobs, buffers.destinations, strict=True)):
        if not blob.nbytes:
            continue
        if blob.tensor.is_cuda:
            pair = cuda_last if index in deferred else cuda_first
        else:
            pair = background if index in deferred and copier is not None else now
        pair[0].append(destination)
        pair[1].append(blob.tensor)
    _copy_all(*now, non_blocking=False)
    if cuda_first[0] or cuda_last[0]:
        staged.event = _stage_cuda(cuda_first, cuda_last, side_stream, staged.sources)
    if background[0]:
        assert copier is not None
        staged._watched = [snapshot.blobs[i].watched() for i in later]
        staged._versions = [_versions(tensors) for tensors in staged._watched]
        copier.submit(staged, *background)
    return staged


def _stage_cuda(
    first: tuple[list[torch.Tensor], list[torch.Tensor]],
    last: tuple[list[torch.Tensor], list[torch.Tensor]],
    side_stream: Any,
    keep_alive: list[torch.Tensor],
) -> Any:
    """Enqueue ``first`` then ``last`` on the side stream; the current stream waits for ``first``."""
    trainer_stream = torch.cuda.current_stream()
    # The side stream must not start copying before the trainer's queued work wrote the values.
    side_stream.wait_stream(trainer_stream)
    with torch.cuda.stream(side_stream):
        first_done = _enqueue_cuda(*first, side_stream, keep_alive)
        if first[0]:
            trainer_stream.wait_event(first_done)
        return _enqueue_cuda(*last, side_stream, keep_alive)


def _enqueue_cuda(
    destinations: list[torch.Tensor],
    sources: list[torch.Tensor],
    side_stream: Any,
    keep_alive: list[torch.Tensor],
) -> Any:
    """Enqueue the copies on ``side_stream`` (the current stream here); return an event after them."""
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
