"""Local files opened safely for reading: regular files only, positional reads shared by threads.

:func:`open_regular` is the one opener of files in a run directory (a symlink or a FIFO planted
under a checkpoint's or log's name is refused, never followed or waited on); :class:`PosixFile`
reads a checkpoint with ``pread``, many pieces per ``preadv``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from .base import ReadHandle


def _iov_max() -> int:
    try:
        return max(16, min(os.sysconf("SC_IOV_MAX"), 1024))
    except (AttributeError, ValueError, OSError):
        return 16


IOV_MAX = _iov_max()  # buffers per writev / preadv call


def open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses symlinks and anything but a regular file (a FIFO would hang).

    Raises ``OSError`` (``ELOOP`` for a symlink, ``EISDIR`` for a folder, ``EINVAL`` for a FIFO
    or a device).
    """
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    try:
        kind = os.fstat(fd).st_mode
        if stat.S_ISDIR(kind):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(kind):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class PosixFile(ReadHandle):
    """A regular file opened for positional reads (``pread``), shared by threads."""

    def __init__(self, path: Path, name: str) -> None:
        # A symlink could point anywhere and a FIFO planted under a checkpoint's name would hang
        # the reader: both are refused as "not a regular file".
        try:
            fd = open_regular(path, os.O_RDONLY)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EINVAL, errno.EISDIR):
                raise FileNotFoundError(exc.errno, f"{path} is not a regular file") from exc
            raise
        info = os.fstat(fd)
        self._fd = fd
        self._path = path
        self.name = name
        self.size = info.st_size

    @property
    def local_path(self) -> Path:
        return self._path

    def fileno(self) -> int:
        return self._fd

    def read_at(self, offset: int, buffer: memoryview) -> int:
        done = 0
        while done < len(buffer):
            count = os.preadv(self._fd, [buffer[done:]], offset + done)
            if count == 0:
                break
            done += count
        return done

    def read_pieces(self, offset: int, length: int, pieces: Sequence[tuple[int, memoryview]]) -> int:
        """One ``preadv`` per :data:`IOV_MAX` pieces: the pieces and the gaps between them (read
        into a scratch buffer and dropped) as one vector, so many small blobs cost one call."""
        vectors: list[memoryview] = []
        at = offset
        for start, view in pieces:
            if start > at:
                vectors.append(_gap(start - at))
            vectors.append(view)
            at = start + len(view)
        done = 0
        while vectors:
            count = os.preadv(self._fd, vectors[:IOV_MAX], offset + done)
            if count == 0:  # the end of the file
                break
            done += count
            vectors = _consume(vectors, count)
        return min(done, length)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_SCRATCH = memoryview(bytearray(1 << 20))  # gaps land here; nobody reads it


def _gap(nbytes: int) -> memoryview:
    return _SCRATCH[:nbytes] if nbytes <= len(_SCRATCH) else memoryview(bytearray(nbytes))


def _consume(vectors: list[memoryview], count: int) -> list[memoryview]:
    """``vectors`` after ``count`` bytes were read into them (a partly filled one is cut)."""
    for index, view in enumerate(vectors):
        if count < len(view):
            return [view[count:], *vectors[index + 1 :]]
        count -= len(view)
    return []
