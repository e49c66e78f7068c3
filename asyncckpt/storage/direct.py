"""Writing checkpoint files around the page cache (``O_DIRECT``).

A checkpoint's bytes are written once and not read again soon: copying them into the page cache
costs the writer CPU (a copy per byte, and on some virtual machines a fault per fresh page: 2.8
ms of kernel time per MiB on our 2-core VM, ``benchmarks/page_touch.py``) and evicts the
trainer's own cached data. :class:`DirectSink` writes a new file through a second descriptor
opened with ``O_DIRECT``, in whole 4 KiB blocks from 4 KiB-aligned memory: long runs straight
from the staging buffer (laid out like the file on a 4 KiB-aligned base), everything else
gathered in a reused bounce buffer first; only the file's last partial block goes through the
ordinary descriptor. The durable-write protocol is unchanged: the ordinary descriptor's
``fsync`` makes every write of the file durable (one inode), then it is published by rename.

A filesystem that refuses ``O_DIRECT`` (tmpfs, some FUSE and network filesystems) fails the
second ``open``: every write then goes through the page cache as before. So does the rest of a
file after the kernel refuses a direct write with ``EINVAL`` (an alignment rule stricter than
4 KiB) or writes part of one. ``ASYNCCKPT_DIRECT_IO=0`` turns direct writes off.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from .._parallel import submit_or_run

if TYPE_CHECKING:
    from .fileops import FdSink, FileOps

ALIGN = 4096  # memory and file-offset alignment of a direct write (the format's blob alignment)
DIRECT_MIN = 1 << 20  # shorter runs go through the page cache (sync direct writes of less are slow)
DIRECT_PIECE = 8 << 20  # bytes per direct write call
BOUNCE = 16 << 20  # two halves of 8 MiB: one written while the other fills (4 MiB writes were ~20% slower)
_MEMMOVE_MIN = 64 << 10  # copies at least this long release the GIL (ctypes.memmove)
HAVE_DIRECT = hasattr(os, "O_DIRECT")


def direct_wanted() -> bool:
    """Whether direct writes are on for this process (``ASYNCCKPT_DIRECT_IO`` not ``0``)."""
    setting = os.environ.get("ASYNCCKPT_DIRECT_IO", "1").strip().lower()
    return HAVE_DIRECT and setting not in ("0", "false", "no", "off")


def address(view: memoryview) -> int | None:
    """The address of ``view``'s first byte, or None when it cannot be known cheaply (read-only)."""
    if view.readonly or not view.contiguous or not len(view):
        return None
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


# Bounce buffers kept for the next write, by any pool of the process: a one-shot save opens a
# storage (and a pool) per call, and a fresh buffer costs a page fault per page on first touch
# (~30 ms for 16 MiB on our VM: a fifth of a 32 MiB save). At most this many are kept.
_SPARE_MAX = 2
_spare: list[memoryview] = []
_spare_lock = threading.Lock()


class BouncePool:
    """Page-aligned bounce buffers of :data:`BOUNCE` bytes, lent one per write at a time. A
    returned buffer is kept for the next write of any pool of the process (at most
    ``_SPARE_MAX`` are kept): a fresh buffer's pages cost a fault each on first touch."""

    @contextlib.contextmanager
    def lend(self) -> Iterator[memoryview]:
        with _spare_lock:
            bounce = _spare.pop() if _spare else None
        if bounce is None:
            bounce = memoryview(mmap.mmap(-1, BOUNCE))
        try:
            yield bounce
        finally:
            with _spare_lock:
                if len(_spare) < _SPARE_MAX:
                    _spare.append(bounce)


class DirectSink:
    """A sink writing a new file around the page cache, through ``direct_fd`` (``O_DIRECT``).

    Bytes are written at their file offsets in whole 4 KiB blocks from 4 KiB-aligned memory: a
    run of at least :data:`DIRECT_MIN` bytes whose memory is aligned like its file offset (a
    staging buffer's) straight from where it lies, on the caller's thread; everything else
    (small blobs, padding, the header, unaligned memory) gathered in one half of ``bounce``,
    which a thread of the sink writes while the caller fills the other half. A filled half is
    queued at once, behind the write in flight, so the sink's thread goes from one write to the
    next without waiting for the caller (each hand-off between the two threads cost ~0.7 ms of
    an idle disk on our VM: 14% of a 1 GiB sync save). :meth:`finish`
    writes what is left; the file's last partial block goes through ``plain`` (the ordinary
    descriptor). When the kernel refuses a direct write (``EINVAL``) or writes part of one, the
    rest of the file goes through ``plain``. Any other ``OSError`` is raised: the write failed.
    Use it in a ``with`` block: leaving it waits for the write in flight (before the
    descriptors may be closed).
    """

    def __init__(self, plain: FdSink, direct_fd: int, bounce: memoryview) -> None:
        half = len(bounce) // 2 // ALIGN * ALIGN
        self.plain = plain
        self.direct_fd = direct_fd
        self.halves = (bounce[:half], bounce[half : 2 * half])
        self.bounce = self.halves[0]  # the half being filled
        self.base = 0  # file offset of bounce[0]: every byte before it is written or in flight
        self.pending = 0  # bytes gathered in the bounce buffer
        self.on = True  # False once a direct write was refused: the rest goes through plain
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-direct")
        self._flying: Future[None] | None = None  # the write of the half not being filled

    def __enter__(self) -> DirectSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        flying, self._flying = self._flying, None
        if flying is not None:
            with contextlib.suppress(BaseException):  # the write failed already: that is reported
                flying.result()
        self._pool.shutdown(wait=True)

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            if not self.on:
                self._settle_plain()
                self.plain.write(view)
                self.base += len(view)  # the next write seeks here
                return
            if not self.pending % ALIGN and (run := _aligned_run(view)):
                self._drain()
                self._wait()  # every byte before the run is written (or the fallback known)
                if self.on:
                    self._direct(view[:run], self.base)  # the caller's memory: written now
                    self.base += run
                    view = view[run:]
                continue
            room = len(self.bounce) - self.pending
            if self.pending % ALIGN:  # up to the block boundary first: a long run may follow
                room = min(room, ALIGN - self.pending % ALIGN)
            take = min(len(view), room)
            _copy(self.bounce[self.pending : self.pending + take], view[:take])
            self.pending += take
            view = view[take:]
            if self.pending == len(self.bounce):
                self._drain()

    def writev(self, buffers: Sequence[memoryview | bytes]) -> None:
        # The common case, kept cheap (a shard of 10,000 small tensors is 20,000 buffers, each
        # on the caller's thread while the sink's thread may wait for the GIL): a piece of bytes
        # that fits in the half being filled, copied there, a long one without the GIL.
        bounce, pending = self.bounce, self.pending
        room = len(bounce) if self.on else 0
        start = address(bounce) or 0  # 0: not known, copied by slice
        for data in buffers:
            end = pending + len(data)
            if end < room and (
                type(data) is bytes or (type(data) is memoryview and data.format == "B" and data.c_contiguous)
            ):
                long = start and end - pending >= _MEMMOVE_MIN
                if long and type(data) is memoryview and (source := address(data)):
                    ctypes.memmove(start + pending, source, end - pending)
                else:
                    bounce[pending:end] = data
                pending = end
                continue
            self.pending = pending
            self.write(data)
            bounce, pending = self.bounce, self.pending
            room = len(bounce) if self.on else 0
            start = address(bounce) or 0
        self.pending = pending

    def finish(self) -> None:
        """Write what the bounce buffer holds and wait for every write (call once, last)."""
        self._wait()
        if not self.on:
            self._settle_plain()
            return
        tail = self.pending % ALIGN
        whole, self.pending = self.pending - tail, 0
        if whole:  # written here: nothing is left to overlap it with (and no thread to start)
            self._direct(self.bounce[:whole], self.base)
            self.base += whole
        if tail:  # a partial block: through the page cache, at its offset
            os.lseek(self.plain.fd, self.base, os.SEEK_SET)
            self.plain.write(self.bounce[whole : whole + tail])
            self.base += tail

    def _drain(self) -> None:
        """Queue the filled half's bytes (whole blocks) for the sink's thread, behind the write in
        flight; fill the other half once its own write is done."""
        if not self.pending:
            return
        view, at = self.bounce[: self.pending], self.base
        self.base += self.pending
        self.pending = 0
        before = self._flying
        self._flying = submit_or_run(self._pool, self._after, before, view, at)
        if before is not None:
            before.result()  # the other half's bytes are written: it may be filled again
        self.bounce = self.halves[1] if self.bounce is self.halves[0] else self.halves[0]

    def _after(self, before: Future[None] | None, view: memoryview, at: int) -> None:
        """:meth:`_direct` once the write ``before`` it is done: on the sink's thread it is; run
        here (the pool refuses work at interpreter exit) it may not be, and beside it a fallback
        of either would seek the plain descriptor under the other."""
        if before is not None:
            before.result()
        self._direct(view, at)

    def _wait(self) -> None:
        """Wait for the write in flight; raise its error."""
        flying, self._flying = self._flying, None
        if flying is not None:
            flying.result()

    def _settle_plain(self) -> None:
        """After a fallback: the bounce buffer's bytes through plain, which then stands at ``base``."""
        self._wait()
        os.lseek(self.plain.fd, self.base, os.SEEK_SET)
        if self.pending:
            self.plain.write(self.bounce[: self.pending])
            self.base += self.pending
            self.pending = 0

    def _direct(self, view: memoryview, at: int) -> None:
        """Write ``view`` (aligned memory and length) at file offset ``at``; once a direct write
        is refused or short, the rest through ``plain``, at its offset (one write at a time)."""
        done = 0
        while done < len(view) and self.on:
            piece = view[done : done + DIRECT_PIECE]
            try:
                count = self.plain.ops.write_direct(self.direct_fd, piece, at + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                count = 0
            count = max(count, 0)
            done += count
            if count != len(piece):
                self.on = False
        if done < len(view):
            os.lseek(self.plain.fd, at + done, os.SEEK_SET)
            self.plain.write(view[done:])


def _aligned_run(view: memoryview) -> int:
    """How many leading bytes of ``view`` to write straight from it: its whole blocks when it
    is long and starts on a page, else 0."""
    if len(view) < DIRECT_MIN:
        return 0
    start = address(view)
    return len(view) // ALIGN * ALIGN if start is not None and not start % ALIGN else 0


def _copy(dest: memoryview, source: memoryview) -> None:
    """``dest[:] = source``; long copies without the GIL (the trainer thread runs meanwhile)."""
    if len(source) >= _MEMMOVE_MIN:
        target, start = address(dest), address(source)
        if target is not None and start is not None:
            ctypes.memmove(target, start, len(source))
            return
    dest[:] = source


def direct_capable(ops: FileOps) -> bool:
    """Whether ``ops`` may write directly: it has its own ``write_direct`` or does not override
    ``write`` (a fault-injecting ``write`` must see every byte)."""
    from .fileops import FileOps

    kind = type(ops)
    return kind.write_direct is not FileOps.write_direct or kind.write is FileOps.write
