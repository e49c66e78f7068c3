"""Reading an object of a remote store: ranged GETs, the ends of a checkpoint cached, and how
big and how many the requests of a parallel read are."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from .base import ParallelReads, ReadHandle
from .multipart import MIB
from .objects import ObjectStore
from .records import CommitRecord

READ_CHUNK = 16 * MIB  # the largest ranged GET of a store that cannot stream (one bytes in between)
MAX_RANGE = 128 * MIB  # the largest ranged GET of a store that streams (S3)
HEAD_BYTES = 4 << 10  # small reads in the first 4 KiB (a checkpoint's prelude) share one GET
TAIL_BYTES = 256 << 10  # and so do small reads in the last 256 KiB (its trailer and header)


def parallel_reads(size: int, *, streams: bool, concurrency: int) -> ParallelReads:
    """Ranged reads for an object of ``size`` bytes: ``concurrency`` in flight; where reads
    stream (S3) about two requests per reader, from 16 MiB to 128 MiB each, since every request
    costs a round trip; elsewhere 16 MiB, which is also the memory each one holds."""
    request = READ_CHUNK
    if streams:
        request = min(max(READ_CHUNK, size // (2 * concurrency)), MAX_RANGE)
    return ParallelReads(request, concurrency)


class RemoteFile(ReadHandle):
    """An object read with ranged GETs; any number of threads may read it at once.

    ``record`` is the commit record it was opened through (None for a plain object or bytes
    not yet committed): its size and part checksums, e.g. to check a local copy against.

    Small reads in the first ``HEAD_BYTES`` or the last ``TAIL_BYTES`` (a checkpoint's prelude,
    trailer and header) are served from one GET of that end, made at the first such read:
    decoding a header costs two requests, not five. Keys are never rewritten: the cached bytes
    cannot go stale.
    """

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        name: str,
        size: int,
        reads: ParallelReads,
        record: CommitRecord | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.name = name
        self.size = size
        self.record = record
        self._reads = reads
        self._edges: dict[tuple[int, int], bytes] = {}  # (first, last + 1) → the cached bytes of one end
        self._lock = threading.Lock()

    @property
    def parallel_reads(self) -> ParallelReads:
        return self._reads

    def read_pieces(self, offset: int, length: int, pieces: Sequence[tuple[int, memoryview]]) -> int:
        """One ranged GET for the whole range, its bytes copied into the pieces."""
        end = min(offset + length, self.size)
        if end <= offset:
            return 0
        if end - offset > READ_CHUNK and not self.store.streams:
            return super().read_pieces(offset, length, pieces)
        return min(self.store.read_into(self.key, offset, end, pieces), end - offset)

    def read_at(self, offset: int, buffer: memoryview) -> int:
        end = min(offset + len(buffer), self.size)
        edge = self._edge(offset, end)
        if edge is not None:
            start, data = edge
            chunk = data[offset - start : end - start]
            buffer[: len(chunk)] = chunk
            return len(chunk)
        done = 0
        step = self._reads.request_bytes
        while offset + done < end:
            start = offset + done
            stop = min(end, start + step)
            view = buffer[done : stop - offset]
            got = min(self.store.read_into(self.key, start, stop, [(start, view)]), stop - start)
            done += got
            if got < stop - start:
                break
        return done

    def _edge(self, offset: int, end: int) -> tuple[int, bytes] | None:
        """``(first byte, bytes)`` of the cached end ``[offset, end)`` lies in; None for a read
        that reaches the middle."""
        if end <= offset:
            return None
        if end <= HEAD_BYTES:
            start, stop = 0, min(HEAD_BYTES, self.size)
        elif offset >= self.size - TAIL_BYTES:
            start, stop = max(self.size - TAIL_BYTES, 0), self.size
        else:
            return None
        with self._lock:
            data = self._edges.get((start, stop))
            if data is None:
                data = self._edges[start, stop] = self.store.get_range(self.key, start, stop)
        return start, data

    def close(self) -> None:
        """Drop the cached ends; every other read was its own request."""
        self._edges.clear()
