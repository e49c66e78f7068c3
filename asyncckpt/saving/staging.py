"""Staging: copy a snapshot's tensors into reused host buffers laid out like the file.

A buffer set is one uint8 host tensor holding every blob at the offset it will have in the file
(minus the 4 KiB prelude page), so the writer streams it out without another copy. On CUDA the
buffers are pinned and the copies are enqueued on a side stream; CPU blobs that only the
optimizer step changes may be copied by a background thread while forward and backward run. The
returned :class:`StagedCopy` tells when each blob is there.
"""

from __future__ import annotations

import bisect
import operator
import threading
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .. import format as fmt
from .buffers import Buffers, RingBuffers, StagingBuffers, StagingPool, destination
from .copier import Copier
from .snapshot import Snapshot, Structure

__all__ = [
    "Buffers",
    "Copier",
    "CopyPlan",
    "RingBuffers",
    "Staged",
    "StagedCopy",
    "StagingBuffers",
    "StagingPool",
    "StagingRaceError",
    "copy_all",
    "copy_plan",
    "destination",
    "failure",
    "stage",
]


class Staged(Protocol):
    """A save being copied into a buffer set (:class:`StagedCopy`, or a
    :class:`~asyncckpt.saving.streaming.StreamedCopy` through a bounded one)."""

    buffers: Any

    def write(self, sink: fmt.Sink, header: fmt.PreparedHeader, *, checksum_pool: Any = None) -> int:
        """Write the file through ``sink`` as the copies finish (the writer's thread)."""

    def settle(self) -> None:
        """Block until no copy into the buffers or out of the sources is still running."""

    def guard(self) -> None:
        """Order the trainer after the copies the step hook guards."""

    def done(self) -> bool:
        """Whether every copy has ended."""

    def wait(self) -> None:
        """Block until every blob is copied; raise if a copy failed."""


class StagedCopy:
    """A snapshot being copied into a buffer set.

    Blobs are copied in up to three ways: at once by ``stage()`` (the trainer's thread), in the
    background by a :class:`Copier` (``deferred`` blobs, in blob order), or on a CUDA side stream.
    The writer takes each blob as soon as its bytes are there (:meth:`blob_bytes`); the trainer's
    optimizer hook waits for all of them (:meth:`guard`); :meth:`settle` waits without raising
    before the buffers go back to the pool.
    """

    def __init__(
        self,
        buffers: StagingBuffers,
        deferred: Sequence[int] = (),
        *,
        groups: list[tuple[int, int]] | None = None,
    ) -> None:
        self.buffers = buffers
        self.event: Any = None  # torch.cuda.Event after the last CUDA copy
        self.sources: list[torch.Tensor] = []  # CUDA sources kept alive until their copy ran
        self.deferred = list(deferred)  # ascending blob indices the copier fills
        # ``[begin, end)`` positions in ``deferred`` published together (:func:`_groups` of
        # their sizes; a cached CopyPlan's, else computed by the copier thread).
        self.groups = groups
        self._copied = 0  # how many of ``deferred`` are copied
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._finished = threading.Event()
        # The tensors whose version counters speak for the deferred blobs (Snapshot.watched),
        # flat; deferred blob k's are _watched[_bounds[k]:_bounds[k + 1]] (one each: no bounds).
        self._watched: list[torch.Tensor] = []
        self._bounds: list[int] | None = None
        self._versions: list[int] = []  # their version counters at stage()
        if not self.deferred:
            self._finished.set()

    def watch(self, per_blob: list[tuple[torch.Tensor, ...]]) -> None:
        """Record the version counters that speak for each deferred blob (before its copy)."""
        flat: list[torch.Tensor] = []
        bounds = [0]
        for tensors in per_blob:
            flat.extend(tensors)
            bounds.append(len(flat))
        self._watched, self._bounds = flat, bounds
        self._versions = [t._version for t in flat]

    def watch_one_each(self, tensors: list[torch.Tensor], versions: list[int] | None = None) -> None:
        """:meth:`watch` where each deferred blob has one tensor (no span blob is deferred);
        ``versions``: their version counters, read earlier in this ``save()`` (else read now)."""
        self._watched, self._bounds = list(tensors), None
        self._versions = list(map(_VERSION, tensors)) if versions is None else versions

    def run_deferred(self, destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        """Copy the deferred blobs (in the copier thread), publishing progress group by group.

        Each source's version counter is compared with its value at ``stage()`` after its group
        is copied: a source changed in place in between (not by the optimizer step, which waits
        for this copy) would make the checkpoint a mix of two states, so the copy fails.
        """
        try:
            groups = self.groups
            if groups is None:
                groups = list(_groups([self.buffers.sizes[i] for i in self.deferred]))
            for begin, end in groups:
                copy_all(destinations[begin:end], sources[begin:end], non_blocking=False)
                self._check_versions(begin, end)
                with self._cond:
                    self._copied = end
                    self._cond.notify_all()
        except BaseException as exc:  # handed to the writer; the trainer's hook only waits
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:
            sources.clear()
            self._watched = []
            self._versions = []
            self._finished.set()

    def _check_versions(self, begin: int, end: int) -> None:
        """Raise :class:`StagingRaceError` if a deferred blob in ``[begin, end)`` changed."""
        bounds = self._bounds
        low, high = (begin, end) if bounds is None else (bounds[begin], bounds[end])
        if list(map(_VERSION, self._watched[low:high])) == self._versions[low:high]:
            return
        for k in range(begin, end):
            a, b = (k, k + 1) if bounds is None else (bounds[k], bounds[k + 1])
            if [t._version for t in self._watched[a:b]] != self._versions[a:b]:
                raise StagingRaceError(self.deferred[k])

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
                raise failure(self._error)

    def region(self) -> memoryview:
        """The staged bytes laid out as in the file from ``DATA_OFFSET`` (zeros between blobs);
        read each blob only after :meth:`wait_ready` says it is there."""
        return fmt.tensor_bytes(self.buffers.data)

    def wait_ready(self, index: int) -> int:
        """Block until blob ``index`` is in the buffers; return an index beyond it below which
        every blob is. Raises if the background copy failed."""
        if self.event is not None and self.sources:
            self.event.synchronize()
            self.sources.clear()
        self.wait_blob(index)
        with self._cond:
            copied = self._copied
        return self.deferred[copied] if copied < len(self.deferred) else len(self.buffers.sizes)

    def write(self, sink: fmt.Sink, header: fmt.PreparedHeader, *, checksum_pool: Any = None) -> int:
        """Write the file through ``sink``: the buffers in large pieces as the copies finish
        (see :func:`asyncckpt.format.write_region`)."""
        region = self.region()
        return fmt.write_region(sink, header, region, ready=self.wait_ready, checksum_pool=checksum_pool)

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
            raise failure(self._error)

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


_VERSION = operator.attrgetter("_version")


class StagingRaceError(RuntimeError):
    """A source tensor changed in place while its background copy was pending."""

    def __init__(self, blob: int) -> None:
        super().__init__(f"blob {blob} changed in place before it was copied")
        self.blob = blob


def failure(error: BaseException | None) -> BaseException:
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


@dataclass(frozen=True)
class CopyPlan:
    """Which blobs of a structure are copied how, into which destinations of one buffer set.

    ``now``: CPU blobs copied by ``stage()``; ``later``: CPU blobs the copier copies (ascending);
    ``cuda_first`` / ``cuda_last``: CUDA blobs enqueued before / after the trainer's stream
    waits. Empty blobs are in none. Depends on the structure, the deferred set and the buffers
    only, so it is computed once and reused while those stay the same.
    """

    now: list[int]
    later: list[int]
    cuda_first: list[int]
    cuda_last: list[int]
    destinations: dict[str, list[torch.Tensor]]
    spans_later: bool  # a span blob is among ``later`` (its members are watched, not its view)
    later_groups: list[tuple[int, int]]  # :func:`_groups` of the sizes of ``later``


def copy_plan(structure: Structure, buffers: StagingBuffers, deferred: frozenset[int]) -> CopyPlan:
    """The :class:`CopyPlan` of ``structure`` into ``buffers`` (cached on ``buffers``)."""
    cached = buffers.plan
    if cached is not None and cached[0] is structure and (cached[1] is deferred or cached[1] == deferred):
        hit: CopyPlan = cached[2]
        return hit
    groups: dict[str, list[int]] = {"now": [], "later": [], "cuda_first": [], "cuda_last": []}
    for index, (size, (_, device, _, _)) in enumerate(zip(structure.sizes, structure.layout, strict=True)):
        if not size:
            continue
        is_cuda = device == "cuda" or device.startswith("cuda:")
        if is_cuda:
            groups["cuda_last" if index in deferred else "cuda_first"].append(index)
        else:
            groups["later" if index in deferred else "now"].append(index)
    plan = CopyPlan(
        **groups,
        destinations={name: [buffers.destinations[i] for i in blobs] for name, blobs in groups.items()},
        spans_later=any(i in structure.spans for i in groups["later"]),
        later_groups=list(_groups([buffers.sizes[i] for i in groups["later"]])),
    )
    buffers.plan = (structure, deferred, plan)
    return plan


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
    plan = copy_plan(snapshot.structure, buffers, frozenset(deferred) if copier is not None else frozenset())
    sources = snapshot.sources
    staged = StagedCopy(buffers, plan.later, groups=plan.later_groups)
    destinations = plan.destinations
    copy_all(destinations["now"], [sources[i] for i in plan.now], non_blocking=False)
    if plan.cuda_first or plan.cuda_last:
        first = (destinations["cuda_first"], [sources[i] for i in plan.cuda_first])
        last = (destinations["cuda_last"], [sources[i] for i in plan.cuda_last])
        staged.event = _stage_cuda(first, last, side_stream, staged.sources)
    if plan.later:
        assert copier is not None
        every = len(plan.later) == len(sources)  # ascending and distinct: blob i is later[i]
        later = list(sources) if every else list(map(sources.__getitem__, plan.later))
        if plan.spans_later or snapshot.watching:
            staged.watch([snapshot.watched(i) for i in plan.later])
        else:
            staged.watch_one_each(later, _versions_of(snapshot, plan.later, every=every))
        copier.submit(staged, destinations["later"], later)
    return staged


def _versions_of(snapshot: Snapshot, blobs: list[int], *, every: bool = False) -> list[int] | None:
    """The version counters the structure check read for the one-tensor ``blobs`` (``every``:
    they are all the blobs, in order), or None."""
    versions = snapshot.versions
    if versions is None:
        return None
    structure = snapshot.structure
    if structure.one_each:
        return versions if every else list(map(versions.__getitem__, blobs))
    return [versions[structure.sources[blob]] for blob in blobs]


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
    copy_all(destinations, sources, non_blocking=True)
    for source in sources:
        source.record_stream(side_stream)
    keep_alive.extend(sources)
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(side_stream)
    return event


def copy_all(destinations: list[torch.Tensor], sources: list[torch.Tensor], *, non_blocking: bool) -> None:
    """``dst.copy_(src)`` for each pair, in one call where torch has the batched kernel.

    Without autograd: a source may require grad (a parameter read without ``detach()``).
    """
    if not destinations:
        return
    with torch.no_grad():
        foreach_copy = getattr(torch, "_foreach_copy_", None)
        if foreach_copy is not None:
            foreach_copy(destinations, sources, non_blocking=non_blocking)
            return
        for destination, source in zip(destinations, sources, strict=True):
            destination.copy_(source, non_blocking=non_blocking)
