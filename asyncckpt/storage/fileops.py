"""The OS calls of the write path (:class:`FileOps`, the fault seam) and the sink that writes a
file's bytes through them (:class:`FdSink`).

Every OS call :class:`~asyncckpt.storage.PosixStorage` makes to write, publish or delete goes
through a :class:`FileOps`, so that tests (and users, via :mod:`asyncckpt.testing`) can inject
faults or record the call order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .direct import HAVE_DIRECT
from .localfile import IOV_MAX, open_regular


class FileOps:
    """The OS calls of the write path, and the listing and log opening of a run directory.

    Subclass to inject faults; the defaults call ``os``.
    """

    def open_exclusive(self, path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def write(self, fd: int, data: memoryview | bytes) -> int:
        return os.write(fd, data)

    def open_direct(self, path: Path) -> int | None:
        """Open the file just created at ``path`` again, for direct writes (``O_DIRECT``); None
        when the filesystem or the platform refuses (every write then goes through the page
        cache)."""
        if not HAVE_DIRECT:
            return None
        try:
            return os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            return None

    def write_direct(self, fd: int, data: memoryview, offset: int) -> int:
        """Write ``data`` (4 KiB-aligned memory and length) at ``offset`` of a descriptor from
        :meth:`open_direct`; return the bytes written."""
        return os.pwrite(fd, data, offset)

    def writev(self, fd: int, buffers: Sequence[memoryview | bytes]) -> int:
        """Write ``buffers`` in order with one call (at most ``IOV_MAX`` of them); return the
        bytes written, which may be fewer than all. A subclass that overrides only ``write``
        gets one ``write`` per buffer instead (see :class:`FdSink`), so its faults still apply."""
        return os.writev(fd, buffers)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def link(self, src: Path, dst: Path) -> None:
        """Give the file ``src`` a second name ``dst`` (a hard link; a symlink is not followed)."""
        os.link(src, dst, follow_symlinks=False)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o755)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def fsync_dir(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def scandir(self, folder: Path) -> list[os.DirEntry[str]]:
        """The entries of ``folder`` (``FileNotFoundError`` when it is missing)."""
        with os.scandir(folder) as entries:
            return list(entries)

    def open_append(self, path: Path) -> int:
        """Open (create) a log file for appending: a regular file only (see :func:`open_regular`)."""
        return open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)


OS = FileOps()


class FdSink:
    """A sink writing to a file descriptor; retries short writes.

    ``writev`` writes several buffers with one system call where ``ops`` can (its ``writev``
    is the default or its own), else with one ``write`` each.
    """

    def __init__(self, fd: int, ops: FileOps) -> None:
        self.fd = fd
        self.ops = ops
        kind = type(ops)
        self._vectored = kind.writev is not FileOps.writev or kind.write is FileOps.write

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = self.ops.write(self.fd, view)
            if written <= 0:
                raise OSError(f"write returned {written}")
            view = view[written:]

    def writev(self, buffers: Sequence[memoryview | bytes]) -> None:
        if not self._vectored:
            for data in buffers:
                self.write(data)
            return
        pending = list(buffers)
        while pending:
            batch = pending[:IOV_MAX]
            written = self.ops.writev(self.fd, batch)
            if written <= 0:
                raise OSError(f"writev returned {written}")
            done = 0
            for data in batch:  # drop what was written; a buffer written in part goes on
                if written < len(data):
                    break
                written -= len(data)
                done += 1
            pending = pending[done:]
            if written:
                pending[0] = memoryview(pending[0]).cast("B")[written:]
