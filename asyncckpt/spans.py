"""Blob reads for handles whose every read is a request (object stores): ranged, in parallel.

A local file is read blob by blob (:mod:`asyncckpt.reader`). On an object store each read is a
round trip, so the blobs of a checked layout are planned as *spans*: ranges of about
``request_bytes`` that hold several small blobs, or one part of a big blob. ``in_flight`` spans
are requested at once (:meth:`ReadHandle.read_pieces`: one ranged GET each) and land straight
in their destinations; each piece's CRC32C is taken as it lands and the pieces of a blob are
combined (:func:`asyncckpt.format.crc32c_combine`), so every checksum is verified without a
second pass. As in the local reader, the lowest broken blob of the file is the one reported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import crc32c

from . import format as fmt
from ._parallel import Failures, run_each
from .errors import CheckpointError
from .storage import ParallelReads, ReadHandle

MAX_GAP = 64 << 10  # blobs this close share a request (the padding between them is read and dropped)


@dataclass(frozen=True)
class Piece:
    """``nbytes`` of blob ``blob`` from ``start`` bytes into it."""

    blob: int
    start: int
    nbytes: int


@dataclass(frozen=True)
class Span:
    """One request: ``length`` bytes from file offset ``offset``, holding ``pieces`` in order."""

    offset: int
    length: int
    pieces: tuple[Piece, ...]


def plan_spans(layout: fmt.Layout, request_bytes: int) -> list[Span]:
    """The blobs of ``layout`` as requests of at most ``request_bytes``, in file order."""
    spans: list[Span] = []
    pieces: list[Piece] = []
    first = end = 0
    for index, blob in enumerate(layout.blobs):
        for start in range(0, blob.nbytes, request_bytes):
            nbytes = min(request_bytes, blob.nbytes - start)
            at = blob.offset + start
            if pieces and 0 <= at - end <= MAX_GAP and at + nbytes - first <= request_bytes:
                pieces.append(Piece(index, start, nbytes))
                end = at + nbytes
                continue
            if pieces:
                spans.append(Span(first, end - first, tuple(pieces)))
            pieces, first, end = [Piece(index, start, nbytes)], at, at + nbytes
    if pieces:
        spans.append(Span(first, end - first, tuple(pieces)))
    return spans


Destination = Callable[[Piece], memoryview]  # where a piece lands
Finish = Callable[[int], None]  # called once per blob, after its bytes landed and checked


class SpanReads:
    """Read (or check) every blob of a checked layout through ``handle.read_pieces``.

    ``destination(piece)`` says where a piece's bytes go (a view of the blob's target); without
    one, pieces land in a scratch buffer per request and only their checksums are kept.
    ``finish(blob)`` runs once a blob is whole and, with ``checksums``, checked.
    """

    def __init__(self, handle: ReadHandle, layout: fmt.Layout, where: str, reads: ParallelReads) -> None:
        self.handle = handle
        self.layout = layout
        self.where = where
        self.reads = reads
        self.spans = plan_spans(layout, reads.request_bytes)
        self._lock = threading.Lock()
        self._left = [0] * len(layout.blobs)  # pieces not yet landed, per blob
        self._crcs: dict[int, dict[int, tuple[int, int]]] = {}  # blob → start → (crc, nbytes)
        for span in self.spans:
            for piece in span.pieces:
                self._left[piece.blob] += 1
        self._failures = Failures(len(layout.blobs))
        self._stop = threading.Event()

    def run(self, destination: Destination | None, finish: Finish, *, checksums: bool) -> None:
        """Read every span, ``in_flight`` at once. Raises :class:`CorruptedCheckpointError` for
        the lowest broken blob, ``OSError`` when the storage fails."""
        for index, left in enumerate(self._left):  # empty blobs: nothing to read
            if left == 0:
                try:
                    self._complete(index, finish, checksums=checksums)
                except CheckpointError as exc:
                    self._failures.add(index, exc)

        def work(span: Span) -> None:
            if self._stop.is_set() or span.pieces[0].blob > self._failures.lowest:
                return
            try:
                self._read(span, destination, finish, checksums=checksums)
            except CheckpointError as exc:
                self._failures.add(span.pieces[0].blob, exc)
            except BaseException:
                self._stop.set()
                raise

        run_each(work, self.spans, self.reads.in_flight, "asyncckpt-get")
        self._failures.raise_lowest()

    def _read(self, span: Span, destination: Destination | None, finish: Finish, *, checksums: bool) -> None:
        offsets = [self.layout.blobs[p.blob].offset + p.start for p in span.pieces]
        if destination is None:
            scratch = memoryview(bytearray(span.length))
            starts = [at - span.offset for at in offsets]
            views = [scratch[s : s + p.nbytes] for p, s in zip(span.pieces, starts, strict=True)]
        else:
            views = [destination(piece) for piece in span.pieces]
        got = self.handle.read_pieces(span.offset, span.length, list(zip(offsets, views, strict=True)))
        blobs = self.layout.blobs
        for piece, view, at in zip(span.pieces, views, offsets, strict=True):
            landed = span.offset + got - at
            if landed < piece.nbytes:
                raise fmt.truncated(self.layout, piece.blob, piece.start + max(landed, 0), path=self.where)
            if piece.nbytes == blobs[piece.blob].nbytes:  # a whole blob (most): no pieces to combine
                if checksums:
                    fmt.check_crc(self.layout, piece.blob, crc32c.crc32c(view), path=self.where)
                finish(piece.blob)
                continue
            crc = crc32c.crc32c(view) if checksums else 0
            with self._lock:
                self._crcs.setdefault(piece.blob, {})[piece.start] = (crc, piece.nbytes)
                self._left[piece.blob] -= 1
                whole = self._left[piece.blob] == 0
            if whole:
                self._complete(piece.blob, finish, checksums=checksums)

    def _complete(self, index: int, finish: Finish, *, checksums: bool) -> None:
        if checksums:
            with self._lock:
                pieces = self._crcs.pop(index, {})
            crc = 0
            for _, (piece_crc, nbytes) in sorted(pieces.items()):
                crc = fmt.crc32c_combine(crc, piece_crc, nbytes)
            fmt.check_crc(self.layout, index, crc, path=self.where)
        finish(index)
