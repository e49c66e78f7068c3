"""Writing a v1 file in one sequential pass: prelude, blobs, header, trailer.

Three ways in, the same bytes out: :func:`write_file` takes each blob's bytes in turn (the
one-shot save), :func:`write_region` a region that already holds the blobs at their file
offsets (a staging buffer, written in large pieces as its copies finish), :func:`write_parts`
blobs in parts through memory that is reused once written (a bounded staging buffer). Small
blobs and the zero padding between them go out in batches: one ``writev`` of many buffers where
the sink has one, else one joined ``write``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future
from typing import Any

import crc32c

from .._parallel import submit_or_run
from .encode import (
    PreparedHeader,
    Sink,
    encode_prelude,
    encode_trailer,
    prepare_header,
)
from .spec import ALIGN, CHUNK, DATA_OFFSET, PARALLEL_CRC_MIN, PRELUDE_SIZE, TRAILER_SIZE, TensorEntry

Buffer = memoryview | bytes
_ZEROS = memoryview(bytes(ALIGN))  # padding between blobs is shorter than ALIGN
_BATCH_BUFFERS = 512  # buffers per writev (Linux allows 1024)
# Small blobs are checksummed in a pool in batches of about this many bytes or blobs.
_CRC_BATCH_BYTES = 4 << 20
_CRC_BATCH_BLOBS = 1024


def write_checkpoint(
    sink: Sink,
    *,
    step: int,
    metadata: Any,
    tree: Any,
    tensors: Sequence[TensorEntry],
    sizes: Sequence[int],
    blobs: Iterable[memoryview],
    checksum_pool: Executor | None = None,
) -> int:
    """Write a whole v1 file to ``sink`` in one sequential pass; return its size in bytes.

    ``blobs`` yields the bytes of each blob (``sizes`` says how many, in order). Raises what
    :func:`prepare_header` raises before writing anything; see :func:`write_file` for the rest.
    """
    header = prepare_header(step=step, metadata=metadata, tree=tree, tensors=tensors, sizes=sizes)
    return write_file(sink, header, blobs, checksum_pool=checksum_pool)


def write_file(
    sink: Sink, header: PreparedHeader, blobs: Iterable[memoryview], *, checksum_pool: Executor | None = None
) -> int:
    """Write prelude, ``blobs``, the finished ``header`` and the trailer; return the file size.

    Blobs of at least ``PARALLEL_CRC_MIN`` bytes are checksummed in ``checksum_pool`` (a thread
    of the caller's: CRC32C and the write both release the GIL, so checksumming then costs no
    time on the write path) while they are written; without a pool, before. Smaller blobs are
    gathered in runs with the padding before each: a run goes out in one ``writev`` (else one
    joined ``write``) and is checksummed in one call, in the pool. Raises ``ValueError`` when a
    blob's length differs from its size (the caller's bug) and whatever ``sink`` raises.
    """
    # The loop runs once per blob of every one-shot save, on the caller's thread, while the
    # sink's thread waits for the GIL after each of its writes: it does the least it can.
    run = _Run(sink, checksum_pool)
    buffers, views = run.buffers, run.views
    buffers.append(encode_prelude())
    position = PRELUDE_SIZE
    nbytes = 0
    for offset, size, data in zip(header.offsets, header.sizes, blobs, strict=True):
        if len(data) != size:
            raise ValueError(f"blob at {offset} has {len(data)} bytes, expected {size}")
        gap = offset - position
        position = offset + size
        if gap:
            if gap < ALIGN:
                buffers.append(_ZEROS[:gap])
            else:
                buffers += _padding(gap)
        if size < PARALLEL_CRC_MIN:
            buffers.append(data)
            views.append(data)
            nbytes += size
            if nbytes >= _CRC_BATCH_BYTES or len(views) >= _CRC_BATCH_BLOBS or len(buffers) >= _BATCH_BUFFERS:
                run.flush()
                buffers, views, nbytes = run.buffers, run.views, 0
            continue
        run.flush()
        buffers, views, nbytes = run.buffers, run.views, 0
        run.large(data)
    run.flush()
    return _finish(_Batch(sink), header, run.checksums(), position)


class _Run:
    """Consecutive small blobs (``views``) and every buffer to write up to their end
    (``buffers``: the padding too), written and checksummed together by :meth:`flush`; and the
    checksums of every blob so far, in file order."""

    def __init__(self, sink: Sink, pool: Executor | None) -> None:
        self.sink = sink
        self.writev: Callable[[list[Buffer]], None] | None = getattr(sink, "writev", None)
        self.pool = pool
        self.buffers: list[Buffer] = []
        self.views: list[memoryview] = []
        self.crcs: list[int] = []
        self.batches: list[tuple[int, Future[list[int]]]] = []  # checksums of runs, in the pool
        self.pending: list[tuple[int, Future[int]]] = []  # checksums of large blobs, in the pool

    def flush(self) -> None:
        """Checksum the run's blobs (hand them to the pool) and write its buffers; start a new run."""
        buffers, views = self.buffers, self.views
        if views:
            if self.pool is None:
                self.crcs += map(crc32c.crc32c, views)
            else:
                self.batches.append((len(self.crcs), submit_or_run(self.pool, _checksums, views)))
                self.crcs += [0] * len(views)
            self.views = []
        if buffers:
            _write_gathered(self.sink, self.writev, buffers)
            self.buffers = []

    def large(self, data: memoryview) -> None:
        """Write a large blob (after :meth:`flush`), checksummed beside the write where a pool is."""
        if self.pool is None:
            self.crcs.append(crc32c.crc32c(data))
        else:
            self.pending.append((len(self.crcs), submit_or_run(self.pool, crc32c.crc32c, data)))
            self.crcs.append(0)
        write_all(self.sink, data)

    def checksums(self) -> list[int]:
        """Every blob's checksum, once the pool computed them (call after the last :meth:`flush`)."""
        _place(self.crcs, self.batches)
        for index, future in self.pending:
            self.crcs[index] = future.result()
        return self.crcs


def _padding(count: int) -> list[Buffer]:
    """``count`` zero bytes, as views of one page of zeros."""
    return [_ZEROS[: min(count - start, ALIGN)] for start in range(0, count, ALIGN)]


def write_region(
    sink: Sink,
    header: PreparedHeader,
    region: memoryview,
    *,
    ready: Callable[[int], int] | None = None,
    checksum_pool: Executor | None = None,
) -> int:
    """Write a file whose blobs already lie in ``region`` as in the file; return the file size.

    ``region`` holds the file's bytes from ``DATA_OFFSET`` to the end of the last blob, zeros
    between the blobs (a staging buffer laid out like the file); it is written in ``CHUNK``
    pieces. ``ready(i)``, when given, blocks until blob ``i`` is in ``region`` and returns an
    index beyond ``i`` below which every blob is; the bytes before blob ``i`` are written before
    it waits. Checksums are computed as in :func:`write_file`. Raises ``ValueError`` when
    ``region`` has the wrong length and whatever ``sink`` or ``ready`` raises.
    """
    count = len(header.sizes)
    end = header.offsets[-1] + header.sizes[-1] - DATA_OFFSET if count else 0
    if len(region) != end:
        raise ValueError(f"the region has {len(region)} bytes, the blobs take {end}")
    plan = header.region_plan(pooled=checksum_pool is not None)
    sink.write(encode_prelude() + bytes(DATA_OFFSET - PRELUDE_SIZE))
    crcs: list[int] = []
    pending: list[tuple[int, Future[int]]] = []
    batches: list[tuple[int, Future[list[int]]]] = []
    written = 0
    index = 0
    while index < count:
        start = header.offsets[index] - DATA_OFFSET
        if ready is not None and start > written:  # what is there already goes out first
            write_all(sink, region[written:start])
            written = start
        upto = count if ready is None else min(ready(index), count)
        for large in plan.large[bisect.bisect_left(plan.large, index) : bisect.bisect_left(plan.large, upto)]:
            assert checksum_pool is not None
            whole = region[plan.slices_all[large]]
            pending.append((large, submit_or_run(checksum_pool, crc32c.crc32c, whole)))
        slices = plan.slices[index:upto]
        if checksum_pool is None:
            crcs += _region_checksums(region, slices)
        else:  # the small blobs' checksums too run beside the write (which may wait on the disk)
            batches.append((index, submit_or_run(checksum_pool, _region_checksums, region, slices)))
            crcs += [0] * len(slices)
        stop = header.offsets[upto - 1] + header.sizes[upto - 1] - DATA_OFFSET
        write_all(sink, region[written:stop])
        written, index = stop, upto
    _place(crcs, batches)
    for large, future in pending:
        crcs[large] = future.result()
    return _finish(_Batch(sink), header, crcs, DATA_OFFSET + end)


def _place(crcs: list[int], batches: list[tuple[int, Future[list[int]]]]) -> None:
    """Wait for each batch of checksums and put them in ``crcs`` from the index it starts at."""
    for first, batch in batches:
        found = batch.result()
        crcs[first : first + len(found)] = found


def _checksums(views: list[memoryview]) -> list[int]:
    return list(map(crc32c.crc32c, views))


def _region_checksums(region: memoryview, slices: list[slice]) -> list[int]:
    # Each view is dropped as soon as it is checksummed: 10,000 views held at once would count
    # towards a collection of the trainer's many objects, which holds the GIL for ~0.1 s.
    crc = crc32c.crc32c
    return [crc(region[s]) for s in slices]


Part = tuple[int, memoryview, Callable[[], None] | None]


def write_parts(sink: Sink, header: PreparedHeader, parts: Iterable[Part]) -> int:
    """Write a file whose blobs arrive in parts; return the file size.

    Each part is ``(blob, data, then)``: the next bytes of blob ``blob``; parts come in file
    order and each blob's parts add up to its size (empty blobs need none). ``then``, when
    given, is called once ``data`` and every part before it are written, so that its memory
    may be reused (a staging buffer smaller than the state). Small parts are written in
    batches; checksums run on each part as it comes. Raises ``ValueError`` for parts out of
    order or of the wrong total length, and whatever ``sink`` raises.
    """
    offsets, sizes = header.offsets, header.sizes
    out = _Batch(sink)
    out.add(encode_prelude())
    crcs = [0] * len(sizes)
    position = PRELUDE_SIZE
    blob = -1
    filled = 0
    for index, data, then in parts:
        if index != blob:
            if not 0 <= index < len(sizes):
                raise ValueError(f"there is no blob {index}")
            _check_blobs_between(blob, filled, index, sizes)
            out.pad(offsets[index] - position)
            position = offsets[index]
            blob, filled = index, 0
        crcs[blob] = crc32c.crc32c(data, crcs[blob])
        out.add(data)
        filled += len(data)
        position += len(data)
        if then is not None:
            out.flush()
            then()
    _check_blobs_between(blob, filled, len(sizes), sizes)
    if sizes:
        end = offsets[-1] + sizes[-1]
        out.pad(end - position)
        position = end
    return _finish(out, header, crcs, position)


def _check_blobs_between(blob: int, filled: int, following: int, sizes: Sequence[int]) -> None:
    """Blob ``blob`` got all its bytes, and the blobs before blob ``following`` are empty."""
    if blob >= 0 and filled != sizes[blob]:
        raise ValueError(f"blob {blob} got {filled} bytes, expected {sizes[blob]}")
    if following <= blob or following > len(sizes):
        raise ValueError(f"a part of blob {following} came after blob {blob}")
    skipped = next((i for i in range(blob + 1, following) if sizes[i]), None)
    if skipped is not None:
        raise ValueError(f"blob {skipped} got no bytes, expected {sizes[skipped]}")


def _finish(out: _Batch, header: PreparedHeader, crcs: list[int], position: int) -> int:
    """Write the header (after the blobs, which end at ``position``) and the trailer."""
    raw = header.finish(crcs)
    assert len(raw) <= header.max_bytes
    header_offset = max(position, DATA_OFFSET)
    out.pad(header_offset - position)
    out.add(raw)
    out.add(encode_trailer(header_offset, raw))
    out.flush()
    return header_offset + len(raw) + TRAILER_SIZE


class _Batch:
    """Small buffers gathered and written together: with one ``writev`` where the sink has it,
    else joined into one ``write`` (at most ``CHUNK`` bytes are gathered)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.writev: Callable[[list[Buffer]], None] | None = getattr(sink, "writev", None)
        self.buffers: list[Buffer] = []
        self.nbytes = 0

    def add(self, data: Buffer) -> None:
        if not len(data):
            return
        self.buffers.append(data)
        self.nbytes += len(data)
        if len(self.buffers) >= _BATCH_BUFFERS or self.nbytes >= CHUNK:
            self.flush()

    def pad(self, count: int) -> None:
        """``count`` zero bytes."""
        while count > 0:
            self.add(_ZEROS[: min(count, ALIGN)])
            count -= ALIGN

    def flush(self) -> None:
        buffers, self.buffers, self.nbytes = self.buffers, [], 0
        if buffers:
            _write_gathered(self.sink, self.writev, buffers)


def _write_gathered(sink: Sink, writev: Callable[[list[Buffer]], None] | None, buffers: list[Buffer]) -> None:
    """``buffers`` written in one call: ``writev`` where the sink has it, else one ``write``."""
    if writev is not None:
        writev(buffers)
    elif len(buffers) == 1:
        sink.write(buffers[0])
    else:
        sink.write(b"".join(buffers))


def write_all(sink: Sink, data: memoryview) -> None:
    """Write ``data`` in CHUNK-sized calls (bounded syscalls, responsive to faults)."""
    for start in range(0, len(data), CHUNK):
        sink.write(data[start : start + CHUNK])
