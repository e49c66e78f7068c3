"""Staging through a bounded host buffer: the state streams to the writer in pieces.

With ``AsyncCheckpointer(staging_budget=...)`` a state larger than the budget is not copied
whole. Its blobs (large ones cut into parts) are packed into pieces of at most half the buffer,
in file order; the copier thread fills one half while the writer writes the other, and a half
is filled again only once the writer has written it. The checkpoint stays one consistent state:
the blobs that only an optimizer step changes are guarded by the step hook until every piece is
copied, and ``save()`` returns only once every other blob is copied (the stall grows with the
part of the state that has no such guard and lies late in the file).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .. import format as fmt
from ..format import ALIGN
from .buffers import RingBuffers, destination
from .snapshot import Snapshot, Structure
from .staging import StagingRaceError, copy_all, failure

PART_ALIGN = 64  # parts start at multiples of this inside a half: every element size divides it


Cut = tuple[tuple[int, ...], int, int, bool]  # index path, start, stop, flat; stop < 0: all of it


@dataclass(frozen=True)
class Segment:
    """Bytes ``[start, start + nbytes)`` of one blob, at ``offset`` in a half of the buffer."""

    blob: int
    start: int
    nbytes: int
    offset: int
    cut: Cut  # how to take this part's tensor from the blob's source
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StreamPlan:
    """The pieces a structure streams in, and their destinations in both halves.

    ``last_eager`` is the last piece holding a blob the step hook does not guard (-1: none);
    ``watched[k]`` the deferred blobs piece ``k`` finishes, whose version counters are checked.
    """

    pieces: list[list[Segment]]
    destinations: tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]
    cuda: list[bool]  # per piece: holds a part copied from a CUDA device
    last_eager: int
    watched: list[list[int]]


def stream_plan(snapshot: Snapshot, buffers: RingBuffers, deferred: frozenset[int]) -> StreamPlan:
    """The :class:`StreamPlan` of ``snapshot`` through ``buffers`` (cached on ``buffers``)."""
    structure = snapshot.structure
    cached = buffers.plan
    if cached is not None and cached[0] is structure and cached[1] == deferred:
        hit: StreamPlan = cached[2]
        return hit
    pieces: list[list[Segment]] = [[]]
    used = 0
    for blob, size in enumerate(structure.sizes):
        if not size:
            continue
        for start, nbytes, cut, shape in _cuts(snapshot.sources[blob], buffers.half):
            offset = -(-used // PART_ALIGN) * PART_ALIGN
            if offset + nbytes > buffers.half and pieces[-1]:
                pieces.append([])
                offset = 0
            pieces[-1].append(Segment(blob, start, nbytes, offset, cut, shape))
            used = offset + nbytes
    pieces = [piece for piece in pieces if piece]
    eager = [k for k, piece in enumerate(pieces) if any(part.blob not in deferred for part in piece)]
    plan = StreamPlan(
        pieces=pieces,
        destinations=(
            _destinations(structure, buffers, pieces, 0),
            _destinations(structure, buffers, pieces, 1),
        ),
        cuda=[any(_is_cuda(structure, part.blob) for part in piece) for piece in pieces],
        last_eager=eager[-1] if eager else -1,
        watched=_finished_deferred(pieces, deferred),
    )
    buffers.plan = (structure, deferred, plan)
    return plan


def _cuts(source: torch.Tensor, limit: int) -> Iterator[tuple[int, int, Cut, tuple[int, ...]]]:
    """``(start, nbytes, cut, shape)`` of consecutive parts of ``source``'s contiguous bytes,
    each at most ``limit`` bytes where the tensor allows (a row is never cut)."""
    yield from _cuts_of(source, (), 0, limit)


def _cuts_of(
    tensor: torch.Tensor, path: tuple[int, ...], base: int, limit: int
) -> Iterator[tuple[int, int, Cut, tuple[int, ...]]]:
    size = tensor.numel() * tensor.itemsize
    if size <= limit or tensor.dim() == 0:
        yield base, size, (path, 0, -1, False), tuple(tensor.shape)
    elif tensor.is_contiguous():
        per = max(limit // ALIGN * ALIGN // tensor.itemsize, 1)
        count = tensor.numel()
        for first in range(0, count, per):
            last = min(first + per, count)
            start, nbytes = base + first * tensor.itemsize, (last - first) * tensor.itemsize
            yield start, nbytes, (path, first, last, True), (last - first,)
    else:
        rows = tensor.shape[0]
        row = size // rows
        if row > limit:
            for index in range(rows):
                yield from _cuts_of(tensor[index], (*path, index), base + index * row, limit)
            return
        per = max(limit // row, 1)
        for first in range(0, rows, per):
            last = min(first + per, rows)
            shape = (last - first, *tensor.shape[1:])
            yield base + first * row, (last - first) * row, (path, first, last, False), shape


def _cut(source: torch.Tensor, cut: Cut) -> torch.Tensor:
    path, first, last, flat = cut
    tensor = source
    for index in path:
        tensor = tensor[index]
    if last < 0:
        return tensor
    return tensor.reshape(-1)[first:last] if flat else tensor[first:last]


def _is_cuda(structure: Structure, blob: int) -> bool:
    device = structure.layout[blob][1]
    return device == "cuda" or device.startswith("cuda:")


def _destinations(
    structure: Structure, buffers: RingBuffers, pieces: list[list[Segment]], half: int
) -> list[list[torch.Tensor]]:
    base = half * buffers.half
    return [
        [destination(buffers.data, base + p.offset, structure.layout[p.blob][2], p.shape) for p in piece]
        for piece in pieces
    ]


def _finished_deferred(pieces: list[list[Segment]], deferred: frozenset[int]) -> list[list[int]]:
    """Per piece, the deferred blobs whose last part it holds."""
    last_piece = {part.blob: k for k, piece in enumerate(pieces) for part in piece}
    watched: list[list[int]] = [[] for _ in pieces]
    for blob, k in last_piece.items():
        if blob in deferred:
            watched[k].append(blob)
    return watched


class StreamedCopy:
    """A snapshot streaming through a :class:`RingBuffers`: the copier thread fills the halves
    (:meth:`run`), the writer empties them (:meth:`write`)."""

    def __init__(
        self, snapshot: Snapshot, buffers: RingBuffers, plan: StreamPlan, start_event: Any, side_stream: Any
    ) -> None:
        self.buffers = buffers
        self.plan = plan
        self.event: Any = None  # (copies are synchronized piece by piece; nothing for the step hook)
        self._sources: list[torch.Tensor] | None = snapshot.sources
        self._start_event = start_event
        self._side_stream = side_stream
        self._watched = {blob: snapshot.watched(blob) for blobs in plan.watched for blob in blobs}
        self._versions = {blob: [t._version for t in ts] for blob, ts in self._watched.items()}
        self._cond = threading.Condition()
        self._copied = 0  # pieces in the buffer
        self._written = 0  # pieces the writer is done with: their half may be filled again
        self._stopped = False
        self._error: BaseException | None = None
        self._finished = threading.Event()

    # ------------------------------------------------------------------ the copier thread

    def run(self) -> None:
        """Copy the pieces in order, each once the writer has emptied its half."""
        try:
            for index in range(len(self.plan.pieces)):
                if not self._wait_emptied(index - 2):
                    return
                self._copy(index)
                with self._cond:
                    self._copied = index + 1
                    self._cond.notify_all()
        except BaseException as exc:  # handed to the writer and to save(); the hook only waits
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:
            self._sources = None
            self._finished.set()

    def _wait_emptied(self, index: int) -> bool:
        """Wait until the writer is done with piece ``index`` (its half); False if stopped."""
        with self._cond:
            self._cond.wait_for(lambda: self._written > index or self._stopped)
            return not self._stopped

    def _copy(self, index: int) -> None:
        assert self._sources is not None
        sources = [_cut(self._sources[part.blob], part.cut) for part in self.plan.pieces[index]]
        destinations = self.plan.destinations[index % 2][index]
        if not self.plan.cuda[index]:
            copy_all(destinations, sources, non_blocking=False)
        else:
            self._copy_cuda(destinations, sources, first=index == 0)
        for blob in self.plan.watched[index]:
            if [t._version for t in self._watched[blob]] != self._versions[blob]:
                raise StagingRaceError(blob)

    def _copy_cuda(
        self, destinations: list[torch.Tensor], sources: list[torch.Tensor], *, first: bool
    ) -> None:
        stream = self._side_stream
        with torch.cuda.stream(stream):
            if first:
                stream.wait_event(self._start_event)  # what the trainer queued before save()
            copy_all(destinations, sources, non_blocking=True)
            for source in sources:
                if source.is_cuda:
                    source.record_stream(stream)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(stream)
        done.synchronize()

    # ------------------------------------------------------------------ the writer

    def write(self, sink: fmt.Sink, header: fmt.PreparedHeader, *, checksum_pool: Any = None) -> int:
        """Write the file through ``sink`` as the pieces arrive (see :func:`asyncckpt.format.write_parts`)."""
        return fmt.write_parts(sink, header, self._parts())

    def _parts(self) -> Iterator[fmt.writing.Part]:
        whole = fmt.tensor_bytes(self.buffers.data)
        for index, piece in enumerate(self.plan.pieces):
            self._wait_copied(index)
            base = (index % 2) * self.buffers.half
            last = len(piece) - 1
            for position, part in enumerate(piece):
                start = base + part.offset
                then = functools.partial(self._emptied, index) if position == last else None
                yield part.blob, whole[start : start + part.nbytes], then

    def _emptied(self, index: int) -> None:
        with self._cond:
            self._written = index + 1
            self._cond.notify_all()

    def _wait_copied(self, index: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._copied > index or self._error is not None or self._stopped)
            if self._copied <= index:
                raise failure(self._error) if self._error is not None else RuntimeError("staging stopped")

    # ------------------------------------------------------------------ the trainer

    def wait_eager(self) -> None:
        """Block until every blob the step hook does not guard is in the buffer (``save()``),
        or until the save failed (its handle reports why). Needs the writer to be emptying
        the halves."""
        last = self.plan.last_eager
        with self._cond:
            self._cond.wait_for(lambda: self._copied > last or self._error is not None or self._stopped)

    def guard(self) -> None:
        """Order the trainer after the copies: wait until every piece is copied."""
        self._finished.wait()

    def done(self) -> bool:
        return self._finished.is_set()

    background_done = done

    def wait(self) -> None:
        """Block until every piece is copied; raise if the copy failed."""
        self._finished.wait()
        if self._error is not None:
            raise failure(self._error)

    def settle(self) -> None:
        """Stop copying (the writer is done, or gave up) and wait for the copier to let go."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._finished.wait()


def stage_streamed(
    snapshot: Snapshot,
    buffers: RingBuffers,
    *,
    deferred: frozenset[int],
    start: Any,
    side_stream: Any = None,
) -> StreamedCopy:
    """A :class:`StreamedCopy` of ``snapshot``; ``start(staged.run)`` runs its copier.

    On CUDA the copies wait (on the GPU) for what the trainer queued before this call.
    """
    plan = stream_plan(snapshot, buffers, deferred)
    start_event = None
    if any(plan.cuda):
        start_event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        start_event.record(torch.cuda.current_stream())
    staged = StreamedCopy(snapshot, buffers, plan, start_event, side_stream)
    start(staged.run)
    return staged
