"""Large aligned writes around the page cache (``O_DIRECT``), the rest through it.

A checkpoint's big blobs are written once and not read again soon: copying them into the page
cache costs CPU on the writer's side (a copy per byte, and on some virtual machines a fault per
fresh page: 2.8 ms of kernel time per MiB measured on our 2-core VM, see
``benchmarks/page_touch.py``) and evicts the trainer's own cached data. :class:`DirectSink`
writes every run of at least :data:`DIRECT_MIN` bytes whose memory and file offset are both
4 KiB-aligned through a second descriptor opened with ``O_DIRECT`` (the staging buffers are
laid out like the file on a 4 KiB-aligned base, so their runs are); the unaligned head and tail
of a run, the prelude, padding and header go through the ordinary descriptor. The durable-write
protocol is unchanged: the ordinary descriptor's ``fsync`` makes both kinds of write durable
(one inode), and the file is published by rename as before.

A filesystem that refuses ``O_DIRECT`` (tmpfs, some FUSE and network filesystems) fails the
second ``open``; every write then goes through the page cache as before. So does a write the
kernel refuses with ``EINVAL`` (an alignment rule stricter than 4 KiB). Set
``ASYNCCKPT_DIRECT_IO=0`` to write everything through the page cache.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .posix import FdSink, FileOps

ALIGN = 4096  # memory and file-offset alignment of a direct write (the format's blob alignment)
DIRECT_MIN = 1 << 20  # shorter runs go through the page cache (sync direct writes of less are slow)
DIRECT_PIECE = 8 << 20  # bytes per direct write call
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


class DirectWrites:
    """The direct half of a :class:`~asyncckpt.storage.posix.FdSink`: writes a run's aligned
    middle through ``direct_fd`` at its file offset, then moves the ordinary descriptor past it.

    Turns itself off (every later byte through the page cache) when the kernel refuses a direct
    write with ``EINVAL`` or writes part of one.
    """

    def __init__(self, sink: FdSink, direct_fd: int) -> None:
        self.sink = sink
        self.direct_fd = direct_fd
        self.on = True
        self.nbytes = 0  # written directly

    def write(self, view: memoryview) -> memoryview:
        """Write the aligned middle of ``view`` directly when it is long enough; return what is
        left for the ordinary descriptor after the head (written here first) and the middle."""
        if not self.on or len(view) < DIRECT_MIN + ALIGN:
            return view
        start = address(view)
        if start is None:
            return view
        ops, fd = self.sink.ops, self.sink.fd
        position = os.lseek(fd, 0, os.SEEK_CUR)
        head = -position % ALIGN
        if (start + head) % ALIGN:  # memory and file disagree: the whole run goes buffered
            return view
        body = (len(view) - head) // ALIGN * ALIGN
        if body < DIRECT_MIN:
            return view
        self.sink.write_buffered(view[:head])
        at = position + head
        done = 0
        while done < body:
            piece = view[head + done : head + min(body, done + DIRECT_PIECE)]
            try:
                count = ops.write_direct(self.direct_fd, piece, at + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                count = 0
            if count != len(piece):  # refused or short: the rest through the page cache
                self.on = False
                done += max(count, 0)
                break
            done += count
        self.nbytes += done
        os.lseek(fd, at + done, os.SEEK_SET)
        return view[head + done :]


def direct_capable(ops: FileOps) -> bool:
    """Whether ``ops`` may write directly: it has its own ``write_direct`` or does not override
    ``write`` (a fault-injecting ``write`` must see every byte)."""
    from .posix import FileOps

    kind = type(ops)
    return kind.write_direct is not FileOps.write_direct or kind.write is FileOps.write
