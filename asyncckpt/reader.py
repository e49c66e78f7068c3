"""The one reader of checkpoint bytes: v1 blobs (threads, CRC32C, pinned bounce buffers, reads
straight into target tensors) and legacy ``torch.save`` files, all through a :class:`ReadHandle`.

``load_latest``, ``restore``, ``check_candidates`` and the one-shot ``asyncckpt.load`` read a file
the same way, on the CPU as on CUDA. Every read goes through the Storage seam: the blob readers
share one handle (its positional reads are thread-safe) and each thread has its own cursor.
"""

from __future__ import annotations

import io
import os
import re
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

from . import format as fmt
from ._gc import gc_paused
from ._memory import prefault
from .errors import CheckpointError, CorruptedCheckpointError
from .format import FileKind
from .runs import RunReads
from .spans import Piece, SpanReads
from .storage import ParallelReads, ReadHandle

_TERMINAL_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_READ_THREADS = 8
PARALLEL_READ_MIN_BYTES = 32 << 20  # smaller files are read by one thread

Failure = tuple[int, CheckpointError]  # (blob index, what went wrong there)


def file_kind(handle: ReadHandle, where: str) -> FileKind:
    """What the file behind ``handle`` is, from its first bytes (:func:`asyncckpt.format.sniff`).

    Raises :class:`CorruptedCheckpointError` (``path``, ``offset``) for a file too short to say
    or that is no checkpoint at all.
    """
    buffer = bytearray(fmt.SNIFF_BYTES)
    return fmt.sniff(bytes(buffer[: handle.read_at(0, memoryview(buffer))]), path=where)


def read_layout(handle: ReadHandle, where: str) -> fmt.Layout:
    """Read and check the prelude, trailer and header of a v1 file; no blob is read.

    Raises :class:`CorruptedCheckpointError` or :class:`UnsupportedVersionError`.
    """
    with gc_paused():  # a TensorEntry and a few lists per tensor
        return fmt.read_layout(_file(handle), where)


def read_tensors(
    handle: ReadHandle,
    layout: fmt.Layout,
    *,
    where: str,
    checksums: bool,
    device: torch.device,
    targets: Mapping[int, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Every tensor of ``layout``'s table, read from ``handle``, in table order.

    Blob ``i`` is read straight into ``targets[i]`` when given (a contiguous tensor holding
    exactly the blob's bytes, which is then the tensor itself), else into a new buffer on
    ``device`` of which the tensors are views. Bytes for a non-CPU destination pass through one
    host bounce buffer per thread (pinned for CUDA). Big files are read by several threads; the
    lowest broken blob of the file is the one reported, whatever the threads' timing.

    Raises :class:`CorruptedCheckpointError` (``path``, ``blob``, ``offset``) for a truncated
    blob or, with ``checksums``, a CRC32C mismatch; ``OSError`` when the storage fails.
    """
    with gc_paused():  # a buffer, a view and a tensor per blob: collections would cost 40% more
        return _read_tensors(handle, layout, where, checksums, device, targets or {})


def _read_tensors(
    handle: ReadHandle,
    layout: fmt.Layout,
    where: str,
    checksums: bool,
    device: torch.device,
    direct: Mapping[int, torch.Tensor],
) -> list[torch.Tensor]:
    if device.type == "cpu" and not direct and handle.parallel_reads is None:
        return _read_new_tensors(handle, layout, where, checksums)
    buffers: dict[int, torch.Tensor] = {}
    destinations = []
    for i, blob in enumerate(layout.blobs):
        target = direct.get(i)
        if target is None:
            buffer = buffers[i] = torch.empty(blob.nbytes, dtype=torch.uint8, device=device)
            destinations.append(buffer)
        else:  # a CPU target's own bytes are viewed as they are; another device's as uint8
            destinations.append(target if target.is_cpu else _bytes_of(target))
    prefault(buffers.values())
    _BlobReads(handle, layout, where).read(destinations, checksums=checksums)
    view = fmt.view_tensor
    return [
        view(entry, buffers[entry.blob]) if entry.blob in buffers else direct[entry.blob]
        for entry in layout.tensors
    ]


def _read_new_tensors(
    handle: ReadHandle, layout: fmt.Layout, where: str, checksums: bool
) -> list[torch.Tensor]:
    """The common load: every blob of a local file into a new CPU buffer of its own, read in
    runs (:mod:`asyncckpt.runs`); the tensors are views of their blob's buffer, so no two
    tensors share memory unless they shared it when saved."""
    empty, uint8 = torch.empty, torch.uint8
    buffers = [empty(blob.nbytes, dtype=uint8) for blob in layout.blobs]
    prefault(buffers)
    views = fmt.buffers_bytes(buffers)
    RunReads(handle, layout, where).read(views, checksums=checksums, threads=_threads(layout))
    return fmt.view_tensors(layout.tensors, buffers)


def check_blobs(handle: ReadHandle, layout: fmt.Layout, *, where: str) -> None:
    """Read every blob through a small scratch buffer per thread and check its CRC32C; keep nothing.

    Raises :class:`CorruptedCheckpointError` for the lowest broken blob, like :func:`read_tensors`.
    """
    _BlobReads(handle, layout, where).check()


@dataclass(frozen=True)
class LegacyState:
    """A legacy ``torch.save`` file's content, and whether its own checksums were checked."""

    state: Any
    verified: bool


def read_legacy(
    handle: ReadHandle,
    kind: FileKind,
    *,
    where: str,
    map_location: str | torch.device = "cpu",
    mmap: bool = False,
    checksums: bool = False,
) -> LegacyState:
    """Unpickle a legacy ``torch.save`` file with ``weights_only=True``; refuse anything else.

    ``mmap=True`` maps a zip file's tensor data instead of reading it (a cheap way to read the
    pickled structure); ``checksums=True`` checks the file's own checksums first where it has
    them. Raises :class:`CorruptedCheckpointError` (nothing in a refused pickle runs) and
    ``FileNotFoundError`` when the file was removed since ``handle`` was opened.
    """
    verified = checksums and _verify_legacy(handle, kind, where)
    local = handle.local_path
    if local is not None and not _utf8(str(local)):
        local = None  # torch cannot open a path that is not UTF-8 (Linux names are bytes): read it here
    source: Path | BinaryIO = local if local is not None else _buffered(handle)
    try:
        state = torch.load(
            source,
            map_location=map_location,
            weights_only=True,
            mmap=mmap and local is not None and kind is FileKind.ZIP_TORCH_SAVE,
        )
    except FileNotFoundError:  # removed since it was listed (retention): not a broken file
        raise
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        text = _TERMINAL_ESCAPES.sub("", str(exc)).strip()  # torch styles its messages for terminals
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise CorruptedCheckpointError(
            f"legacy torch.save file refused (weights_only=True): {reason}", path=where
        ) from None
    return LegacyState(state, verified)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _verify_legacy(handle: ReadHandle, kind: FileKind, where: str) -> bool:
    """Check a legacy file's own checksums; True when they were checked (and matched).

    The hook every full verification of a legacy file goes through: a zip ``torch.save`` file
    has its members' CRC32s checked (:class:`CorruptedCheckpointError` naming the member on a
    mismatch); a raw-pickle file carries none, so it stays unverified.
    """
    if not kind.verifiable:
        return False
    fmt.legacy.verify_zip_members(_buffered(handle), path=where)
    return True


# --------------------------------------------------------------------------- blob reads


class _BlobReads:
    """Blobs of one checked v1 file, read (or checked) by one thread or several sharing a handle."""

    def __init__(self, handle: ReadHandle, layout: fmt.Layout, where: str) -> None:
        self.handle = handle
        self.layout = layout
        self.where = where
        self._lock = threading.Lock()
        self._failed_at = len(layout.blobs)  # the lowest blob index known to be broken

    def read(self, destinations: list[torch.Tensor], *, checksums: bool) -> None:
        reads = self.handle.parallel_reads
        if reads is None and all(d.is_cpu for d in destinations):
            views = list(map(fmt.tensor_bytes, destinations))  # CPU destinations: in runs
            RunReads(self.handle, self.layout, self.where).read(
                views, checksums=checksums, threads=_threads(self.layout)
            )
            return
        if reads is not None:
            _read_spans(self.handle, self.layout, self.where, reads, destinations, checksums=checksums)
            return

        def group(indices: list[int]) -> Failure | None:
            reader = _file(self.handle)
            bounce: list[torch.Tensor] = []  # this thread's host buffer for non-CPU destinations
            return self._each(
                indices, lambda i: self._read_one(reader, i, destinations[i], bounce, checksums=checksums)
            )

        self._run(group)

    def check(self) -> None:
        reads = self.handle.parallel_reads
        if reads is None:
            RunReads(self.handle, self.layout, self.where).check(threads=_threads(self.layout))
        else:
            SpanReads(self.handle, self.layout, self.where, reads).run(None, lambda _: None, checksums=True)

    def _run(self, group: Callable[[list[int]], Failure | None]) -> None:
        groups = _groups([blob.nbytes for blob in self.layout.blobs])
        if len(groups) == 1:
            failures = [group(groups[0])]
        else:
            # preadv and crc32c release the GIL: blobs are read and checked in parallel
            with ThreadPoolExecutor(len(groups), thread_name_prefix="asyncckpt-read") as pool:
                failures = list(pool.map(group, groups))
        found = [failure for failure in failures if failure is not None]
        if found:
            raise min(found, key=lambda failure: failure[0])[1]

    def _each(self, indices: list[int], work: Callable[[int], None]) -> Failure | None:
        """Run ``work`` on ``indices`` in file order; return the first failure instead of raising
        it, so that the caller can report the lowest broken blob of the whole file."""
        for index in indices:
            if index > self._failed_at:  # a lower blob is broken already: nothing to learn here
                return None
            try:
                work(index)
            except CheckpointError as exc:
                with self._lock:
                    self._failed_at = min(self._failed_at, index)
                return index, exc
        return None

    def _read_one(
        self,
        reader: BinaryIO,
        index: int,
        destination: torch.Tensor,
        bounce: list[torch.Tensor],
        *,
        checksums: bool,
    ) -> None:
        if destination.is_cpu:
            self._read_into(reader, index, destination, checksums=checksums)
            return
        nbytes = self.layout.blobs[index].nbytes
        if not bounce or bounce[0].numel() < nbytes:
            bounce[:] = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=destination.device.type == "cuda")]
        host = bounce[0][:nbytes]
        self._read_into(reader, index, host, checksums=checksums)
        destination.copy_(host)

    def _read_into(self, reader: BinaryIO, index: int, host: torch.Tensor, *, checksums: bool) -> None:
        view = fmt.tensor_bytes(host)
        fmt.read_blob_into(reader, self.layout, index, view, verify=checksums, path=self.where)


def _read_spans(
    handle: ReadHandle,
    layout: fmt.Layout,
    where: str,
    reads: ParallelReads,
    destinations: list[torch.Tensor],
    *,
    checksums: bool,
) -> None:
    """Every blob into its destination with parallel ranged requests (:mod:`asyncckpt.spans`).

    CPU destinations get the bytes straight from the reply; a blob for another device lands in
    a host buffer of its own (pinned for CUDA), copied over once the blob is whole and checked.
    """
    if all(d.is_cpu for d in destinations):  # the bytes land in place: no bookkeeping
        whole = [fmt.tensor_bytes(d) for d in destinations]

        def in_place(piece: Piece) -> memoryview:
            view = whole[piece.blob]
            return view if piece.nbytes == len(view) else view[piece.start : piece.start + piece.nbytes]

        SpanReads(handle, layout, where, reads).run(in_place, lambda _: None, checksums=checksums)
        return
    lock = threading.Lock()
    views: dict[int, memoryview] = {}
    host: dict[int, torch.Tensor] = {}

    def landing(index: int) -> memoryview:
        with lock:
            view = views.get(index)
            if view is None:
                target = destinations[index]
                if target.device.type != "cpu":
                    pinned = target.device.type == "cuda"
                    target = host[index] = torch.empty(target.numel(), dtype=torch.uint8, pin_memory=pinned)
                view = views[index] = fmt.tensor_bytes(target)
            return view

    def destination(piece: Piece) -> memoryview:
        return landing(piece.blob)[piece.start : piece.start + piece.nbytes]

    def finish(index: int) -> None:
        with lock:
            views.pop(index, None)
            bounce = host.pop(index, None)
        if bounce is not None:
            destinations[index].copy_(bounce)

    SpanReads(handle, layout, where, reads).run(destination, finish, checksums=checksums)


def _threads(layout: fmt.Layout) -> int:
    """Reading threads for a local file: one per group of :func:`_groups` (counted without
    making the groups: each of the ``count`` groups gets a blob)."""
    return _thread_count([blob.nbytes for blob in layout.blobs])


def _thread_count(sizes: list[int]) -> int:
    count = min(MAX_READ_THREADS, os.cpu_count() or 1, len(sizes))
    return 1 if sum(sizes) < PARALLEL_READ_MIN_BYTES or count < 2 else count


def _groups(sizes: list[int]) -> list[list[int]]:
    """Blob indices split into groups of about equal bytes, one per reading thread, each in file order."""
    count = _thread_count(sizes)
    if count == 1:
        return [list(range(len(sizes)))]
    groups: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        lightest = loads.index(min(loads))
        groups[lightest].append(index)
        loads[lightest] += sizes[index]
    return [sorted(group) for group in groups if group]


def _bytes_of(target: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a 1-D uint8 tensor (a view: writes go into ``target``)."""
    return target.detach().reshape(-1).view(torch.uint8)


def _file(handle: ReadHandle) -> BinaryIO:
    """A cursor of its own over ``handle`` (``seek``/``readinto``), as the format's readers take it."""
    return cast(BinaryIO, handle.cursor())


class _RawHandle(io.RawIOBase):
    """A :class:`ReadHandle` as a raw stream, so that ``io.BufferedReader`` (and pickle) can use it."""

    def __init__(self, handle: ReadHandle) -> None:
        super().__init__()
        self._cursor = handle.cursor()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._cursor.readinto(buffer)

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        return self._cursor.seek(position, whence)

    def tell(self) -> int:
        return self._cursor.tell()


def _buffered(handle: ReadHandle) -> BinaryIO:
    return io.BufferedReader(_RawHandle(handle))
