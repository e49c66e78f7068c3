"""Blobs of a local file read in runs: one ``preadv`` for many small blobs, their CRC32Cs in one
C-level loop.

A local read costs little per call; what costs per blob is Python. The blobs of a checked layout
are cut into *runs*: consecutive blobs spanning at most ``RUN_BYTES`` of the file, read with one
:meth:`ReadHandle.read_pieces` (the padding between them lands in a scratch buffer and is
dropped) and checksummed with ``map(crc32c, ...)``, whose loop runs in C, as the writer's
:func:`asyncckpt.format.write_region` does. A blob larger than that is read in *parts* of
``RUN_BYTES``, each checksummed while it is still in the cache; the parts' checksums are
combined (:func:`asyncckpt.format.crc32c_combine`) once all have landed, so parts of one big
blob may be read by different threads. A warm read takes each run or part in slices of
``CHECK_BYTES``, each checksummed as soon as it lands, while it is still in the CPU's cache.
Runs and parts are read by ``threads`` threads (``preadv`` and ``crc32c`` release the GIL);
whatever their timing, the lowest broken blob of the file is the one reported.

A file that is not in the page cache (less than :data:`CACHED_SHARE` of its pages there, asked
with ``cachestat(2)``, which reads nothing: :mod:`asyncckpt._pagecache`) is read differently: in
file order by one thread, each run checksummed on a second thread while the next is read.
Readers at several offsets at once defeat the kernel's readahead, which then reads the disk in
small requests; one reader in file order gets whole readahead windows, and the checksums cost
no time on the read path.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import crc32c

from . import format as fmt
from ._pagecache import cached_share
from ._parallel import Failures, run_each
from .errors import CheckpointError
from .storage import ReadHandle

RUN_BYTES = 8 << 20  # one read covers at most this much of the file
# A warm read checksums each slice of at most this much as soon as it lands, while it is still in
# the CPU's cache: checksumming a run after the whole of it landed reads it back from memory
# (1 GiB on the 2-core VM: read + CRC32C in 8 MiB runs 185-205 ms of CPU, in 1 MiB slices 144-161).
CHECK_BYTES = 1 << 20
# A file is read as cached (on threads) when at least this share of its data region's pages is in
# the page cache: a reader in file order loses little on cached pages, threads lose much on a disk.
CACHED_SHARE = 0.9
_PROBES = 4  # places of a file probed with RWF_NOWAIT where cachestat(2) cannot be asked

# Blobs [first, stop) of the file; ``part >= 0``: only bytes [part, part + RUN_BYTES) of the big
# blob ``first`` (then ``stop == first + 1``); ``part == -1``: the whole blobs.
Run = tuple[int, int, int]


def plan_runs(blobs: Sequence[fmt.BlobEntry], run_bytes: int) -> list[Run]:
    """``blobs`` (in file order) cut into runs that span at most ``run_bytes`` of the file each,
    and a blob larger than ``run_bytes`` into parts of ``run_bytes`` (the last one shorter)."""
    runs: list[Run] = []
    first = 0
    begin = -1  # the file offset where the open run starts; -1: none is open
    for index, blob in enumerate(blobs):
        if begin >= 0 and blob.offset + blob.nbytes - begin > run_bytes:
            runs.append((first, index, -1))
            begin = -1
        if blob.nbytes > run_bytes:
            runs += [(index, index + 1, start) for start in range(0, blob.nbytes, run_bytes)]
        elif begin < 0:
            first, begin = index, blob.offset
    if begin >= 0:
        runs.append((first, len(blobs), -1))
    return runs


class RunReads:
    """Read (or only check) every blob of a checked layout in runs, through ``handle``."""

    def __init__(self, handle: ReadHandle, layout: fmt.Layout, where: str) -> None:
        self.handle = handle
        self.layout = layout
        self.where = where
        self.run_bytes = RUN_BYTES
        blobs = layout.blobs
        self.offsets = [blob.offset for blob in blobs]
        self.crcs = [blob.crc for blob in blobs]
        self.runs = plan_runs(blobs, self.run_bytes)
        self._lock = threading.Lock()
        self._parts: dict[int, dict[int, int]] = {}  # big blob → part start → its CRC32C
        self._failures = Failures(len(blobs))
        self._sliced = False  # checksum each slice as it lands (a warm read on threads)

    def read(self, views: Sequence[memoryview], *, checksums: bool, threads: int) -> None:
        """Read blob ``i`` into ``views[i]`` (its exact size) for every ``i``.

        Raises :class:`CorruptedCheckpointError` (``path``, ``blob``, ``offset``, ``key``) for
        the lowest truncated blob or, with ``checksums``, CRC32C mismatch; ``OSError`` when the
        storage fails.
        """

        def work(run: Run, scratch: _Scratch) -> _Finish:
            first, stop, part = run
            if part >= 0:
                view = views[first][part : part + self.run_bytes]
                return self._part(first, part, view, checksums=checksums)
            return self._read(first, stop, views[first:stop], checksums=checksums)

        self._run(work, threads, checksums=checksums)

    def check(self, *, threads: int) -> None:
        """Read every blob through a scratch buffer per thread and check its CRC32C; keep nothing.

        Raises like :meth:`read`.
        """

        def work(run: Run, scratch: _Scratch) -> _Finish:
            first, stop, part = run
            if part >= 0:
                size = min(self.run_bytes, self.layout.blobs[first].nbytes - part)
                return self._part(first, part, scratch.get(size), checksums=True)
            return self._check(first, stop, scratch)

        self._run(work, threads, checksums=True)

    def _run(self, work: _Work, threads: int, *, checksums: bool) -> None:
        if threads > 1 and checksums and len(self.runs) > 1 and not self.cached():
            self._in_order(work)  # each run checksummed on a second thread, behind the reads
        else:
            self._sliced = checksums
            self._on_threads(work, threads)
        if checksums:
            self._check_parts()
        self._failures.raise_lowest()

    def _on_threads(self, work: _Work, threads: int) -> None:
        """Runs on ``threads`` threads, each read and checksummed by one of them."""
        local = threading.local()

        def one(run: Run) -> None:
            if run[0] > self._failures.lowest:  # a lower blob is broken already: nothing to learn
                return
            scratch = getattr(local, "scratch", None)
            if scratch is None:
                scratch = local.scratch = _Scratch()
            try:
                finish = work(run, scratch)
                if finish is not None:
                    finish()
            except CheckpointError as exc:
                self._failures.add(run[0], exc)

        run_each(one, self.runs, threads, "asyncckpt-read")

    def _in_order(self, work: _Work) -> None:
        """Runs read in file order by this thread, each checksummed on a second thread while the
        next is read (two scratch buffers take turns: one is read into, one is checksummed)."""
        scratches = (_Scratch(), _Scratch())
        checking: tuple[Run, Future[None]] | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-crc") as pool:
            for index, run in enumerate(self.runs):
                if run[0] > self._failures.lowest:
                    break
                try:
                    finish = work(run, scratches[index % 2])
                except CheckpointError as exc:
                    self._failures.add(run[0], exc)
                    finish = None
                if checking is not None:  # its scratch buffer is the next run's
                    self._settle(*checking)
                checking = None if finish is None else (run, pool.submit(finish))
            if checking is not None:
                self._settle(*checking)

    def _settle(self, run: Run, checked: Future[None]) -> None:
        try:
            checked.result()
        except CheckpointError as exc:
            self._failures.add(run[0], exc)

    def cached(self) -> bool:
        """Whether the file's blobs look to be in the page cache: at least :data:`CACHED_SHARE`
        of the data region's pages by ``cachestat(2)``, which reads nothing
        (:mod:`asyncckpt._pagecache`); where that cannot be asked, a one-byte read with
        ``RWF_NOWAIT`` at a few places does not block (it starts readahead where it would);
        True where neither can be asked: then threads read as before."""
        fileno = getattr(self.handle, "fileno", None)
        if fileno is None or not self.offsets:
            return True
        begin, end = self.offsets[0], self.offsets[-1] + self.layout.blobs[-1].nbytes
        try:
            fd = fileno()
        except (OSError, ValueError):
            return True
        share = cached_share(fd, begin, end)
        if share is not None:
            return share >= CACHED_SHARE
        return _nowait_probe(fd, begin, end)

    def _read(self, first: int, stop: int, views: Sequence[memoryview], *, checksums: bool) -> _Finish:
        if checksums and self._sliced:
            self._read_sliced(first, stop, views)
            return None
        return self._read_whole(first, stop, views, checksums=checksums)

    def _read_whole(self, first: int, stop: int, views: Sequence[memoryview], *, checksums: bool) -> _Finish:
        begin = self.offsets[first]
        length = self.offsets[stop - 1] + self.layout.blobs[stop - 1].nbytes - begin
        got = self.handle.read_pieces(begin, length, list(zip(self.offsets[first:stop], views, strict=True)))
        if got < length:
            raise self._short(first, stop, begin + got)
        if not checksums:
            return None
        return lambda: self._check_crcs(first, list(map(crc32c.crc32c, views)))

    def _read_sliced(self, first: int, stop: int, views: Sequence[memoryview]) -> None:
        """Blobs ``[first, stop)`` read in slices (:meth:`_slices`), each checked as soon as it
        lands; a blob bigger than a slice is read in slices, its CRC32C carried from one to the
        next."""
        for index, end in self._slices(first, stop):
            if end < 0:
                self._check_crcs(index, [self._sliced_crc(index, 0, views[index - first])])
                continue
            finish = self._read_whole(index, end, views[index - first : end - first], checksums=True)
            if finish is not None:
                finish()

    def _slices(self, first: int, stop: int) -> Iterator[tuple[int, int]]:
        """Blobs ``[first, stop)`` cut into slices of about :data:`CHECK_BYTES` of the file:
        ``(index, end)`` for consecutive blobs ``[index, end)`` that fit one slice, ``(index, -1)``
        for one blob bigger than a slice."""
        blobs, offsets = self.layout.blobs, self.offsets
        index = first
        while index < stop:
            if blobs[index].nbytes > CHECK_BYTES:
                yield index, -1
                index += 1
                continue
            end = index + 1
            limit = offsets[index] + CHECK_BYTES
            while end < stop and offsets[end] + blobs[end].nbytes <= limit:
                end += 1
            yield index, end
            index = end

    def _sliced_crc(self, index: int, start: int, view: memoryview) -> int:
        """Bytes ``[start, start + len(view))`` of blob ``index`` into ``view`` in slices of
        :data:`CHECK_BYTES`, each checksummed as it lands; their CRC32C."""
        crc = 0
        at = self.offsets[index] + start
        for begin in range(0, len(view), CHECK_BYTES):
            piece = view[begin : begin + CHECK_BYTES]
            got = self.handle.read_at(at + begin, piece)
            if got < len(piece):
                raise fmt.truncated(self.layout, index, start + begin + got, path=self.where)
            crc = crc32c.crc32c(piece, crc)
        return crc

    def _check(self, first: int, stop: int, scratch: _Scratch) -> _Finish:
        if not self._sliced:
            return self._check_whole(first, stop, scratch)
        for index, end in self._slices(first, stop):
            if end < 0:
                view = scratch.get(self.layout.blobs[index].nbytes)
                self._check_crcs(index, [self._sliced_crc(index, 0, view)])
            else:
                self._check_whole(index, end, scratch)()
        return None

    def _check_whole(self, first: int, stop: int, scratch: _Scratch) -> Callable[[], None]:
        blobs = self.layout.blobs
        begin = self.offsets[first]
        length = self.offsets[stop - 1] + blobs[stop - 1].nbytes - begin
        buffer = scratch.get(length)
        got = self.handle.read_at(begin, buffer)
        if got < length:
            raise self._short(first, stop, begin + got)
        starts = [offset - begin for offset in self.offsets[first:stop]]
        views = [buffer[s : s + blobs[i].nbytes] for i, s in enumerate(starts, first)]
        return lambda: self._check_crcs(first, list(map(crc32c.crc32c, views)))

    def _part(self, index: int, start: int, view: memoryview, *, checksums: bool) -> _Finish:
        """Bytes ``[start, start + len(view))`` of big blob ``index`` into ``view``; then (the
        returned step) its CRC32C kept (at once when reading in checked slices)."""
        if checksums and self._sliced:
            crc = self._sliced_crc(index, start, view)
            with self._lock:
                self._parts.setdefault(index, {})[start] = crc
            return None
        got = self.handle.read_at(self.offsets[index] + start, view)
        if got < len(view):
            raise fmt.truncated(self.layout, index, start + got, path=self.where)
        if not checksums:
            return None

        def keep() -> None:
            crc = crc32c.crc32c(view)
            with self._lock:
                self._parts.setdefault(index, {})[start] = crc

        return keep

    def _check_parts(self) -> None:
        """Each big blob's CRC32C from its parts' (a blob with a part missing failed already)."""
        for index, parts in sorted(self._parts.items()):
            nbytes = self.layout.blobs[index].nbytes
            starts = sorted(parts)
            if len(starts) * self.run_bytes < nbytes:
                continue
            crc = 0
            for start in starts:
                crc = fmt.crc32c_combine(crc, parts[start], min(self.run_bytes, nbytes - start))
            try:
                fmt.check_crc(self.layout, index, crc, path=self.where)
            except CheckpointError as exc:
                self._failures.add(index, exc)

    def _check_crcs(self, first: int, found: list[int]) -> None:
        """Raise the checksum mismatch of the first blob from ``first`` whose CRC32C is not in ``found``."""
        expected = self.crcs[first : first + len(found)]
        if found == expected:  # one C-level comparison for the whole run
            return
        bad = next(i for i, (a, b) in enumerate(zip(found, expected, strict=True)) if a != b)
        fmt.check_crc(self.layout, first + bad, found[bad], path=self.where)

    def _short(self, first: int, stop: int, end: int) -> CheckpointError:
        """The error for a run of blobs ``[first, stop)`` whose bytes ended at file offset ``end``."""
        blobs = self.layout.blobs
        index = next(i for i in range(first, stop) if blobs[i].offset + blobs[i].nbytes > end)
        return fmt.truncated(self.layout, index, max(end - blobs[index].offset, 0), path=self.where)


def _nowait_probe(fd: int, begin: int, end: int) -> bool:
    """Whether one-byte reads with ``RWF_NOWAIT`` at :data:`_PROBES` places of ``[begin, end)``
    do not block (True where the kernel cannot be asked)."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None:
        return True
    probe = bytearray(1)
    try:
        for i in range(_PROBES):
            os.preadv(fd, [probe], begin + (end - begin - 1) * i // max(_PROBES - 1, 1), nowait)
    except BlockingIOError:
        return False
    except (OSError, ValueError):  # not a plain file, or a kernel without RWF_NOWAIT
        return True
    return True


class _Scratch:
    """One thread's scratch buffer for :meth:`RunReads.check`, grown as needed."""

    def __init__(self) -> None:
        self.buffer = memoryview(bytearray(0))

    def get(self, nbytes: int) -> memoryview:
        if len(self.buffer) < nbytes:
            self.buffer = memoryview(bytearray(nbytes))
        return self.buffer[:nbytes]


_Finish = Callable[[], None] | None  # what is left of a run once its bytes are read: its checksums
_Work = Callable[[Run, _Scratch], _Finish]  # read one run (into a scratch buffer when checking)
