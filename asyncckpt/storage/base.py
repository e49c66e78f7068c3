"""The Storage seam: every read, write, list, delete and fsync of checkpoint bytes goes through it.

A :class:`Storage` holds named objects under one root (a directory, later a bucket prefix).
Names are relative, ``/``-separated (``step-0000000300.ckpt``, ``step-0000000300/rank-1.ckpt``).
Writing is two steps so that verification and multi-file commits fit between them:

``write(name, body)`` makes the bytes durable but not visible (:class:`Written`); ``commit``
publishes them atomically under ``name``; ``discard`` drops them. Until ``commit`` no reader and
no listing sees the object. Readers get a :class:`ReadHandle` with positional reads that several
threads may share (each through its own :meth:`ReadHandle.cursor`).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol


class Sink(Protocol):
    """Where a body writes its bytes, in order; short writes are retried by the sink."""

    def write(self, data: memoryview | bytes) -> None: ...


Body = Callable[[Sink], int]  # writes the object's bytes to the sink, returns how many

ObjectKind = Literal["file", "dir"]


@dataclass(frozen=True)
class StoredObject:
    """One entry of a listing: a committed object (``kind="file"``) or a folder (``"dir"``).

    Symlinks, FIFOs, sockets and devices are never listed: a checkpoint is a regular object.
    """

    name: str
    kind: ObjectKind
    size: int
    modified: datetime


@dataclass(frozen=True)
class Unfinished:
    """A write that is not committed (yet): a temp file, a data object without its commit
    object, an unfinished upload. ``name`` is the object it would become, ``label`` what holds
    its bytes now. Listed for display only (``asyncckpt ls``); never read."""

    name: str
    label: str
    size: int
    modified: datetime


@dataclass(frozen=True)
class ParallelReads:
    """How to read a handle whose every read is a request to a remote store: ranges of about
    ``request_bytes`` (several small blobs in one, a big blob in several), ``in_flight`` at once."""

    request_bytes: int
    in_flight: int


@dataclass(frozen=True)
class Written:
    """Bytes made durable under a private name, not yet visible under ``name``."""

    name: str
    nbytes: int
    write_s: float
    fsync_s: float
    token: Any  # the implementation's handle on the hidden bytes (a temp path, an upload id)


class ReadHandle(abc.ABC):
    """An open object for positional reads; close it (or use ``with``)."""

    name: str
    size: int

    @property
    def local_path(self) -> Path | None:
        """The object's file on a local filesystem, when it has one (for ``torch.load(mmap=True)``)."""
        return None

    @property
    def parallel_reads(self) -> ParallelReads | None:
        """How a reader should batch its reads when each one is a request (object stores);
        None for a local file, which is read blob by blob."""
        return None

    @abc.abstractmethod
    def read_at(self, offset: int, buffer: memoryview) -> int:
        """Read into ``buffer`` from ``offset``; fewer bytes than asked only at the end.

        Thread-safe. Raises ``OSError`` when the storage fails.
        """

    def read_pieces(self, offset: int, length: int, pieces: Sequence[tuple[int, memoryview]]) -> int:
        """Read ``[offset, offset + length)`` and copy into each piece ``(file offset, buffer)``
        the bytes at its offset; the pieces lie inside the range, in order (gaps between them
        are read and dropped). An object store makes this one ranged request.

        Returns how many bytes of the range exist (fewer than ``length`` only at the end).
        Thread-safe. Raises ``OSError`` when the storage fails.
        """
        available = max(0, min(length, self.size - offset))
        for at, view in pieces:
            got = self.read_at(at, view)
            if got < len(view):
                return min(available, at - offset + got)
        return available

    @abc.abstractmethod
    def close(self) -> None:
        """Release the handle."""

    def cursor(self) -> Cursor:
        """A file-like view (``seek``/``tell``/``read``/``readinto``) with its own position."""
        return Cursor(self)

    def __enter__(self) -> ReadHandle:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Cursor:
    """``seek``/``tell``/``read``/``readinto`` over a :class:`ReadHandle`'s positional reads.

    One per thread: the handle is shared, the position is not.
    """

    def __init__(self, handle: ReadHandle) -> None:
        self._handle = handle
        self._position = 0

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            position += self._position
        elif whence == os.SEEK_END:
            position += self._handle.size
        self._position = max(position, 0)
        return self._position

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._handle.read_at(self._position, memoryview(buffer).cast("B"))
        self._position += count
        return count

    def read(self, size: int = -1) -> bytes:
        remaining = max(self._handle.size - self._position, 0)
        size = remaining if size < 0 else min(size, remaining)
        buffer = bytearray(size)
        count = self.readinto(buffer)
        return bytes(buffer[:count])


class Storage(abc.ABC):
    """A root of named objects with durable writes and atomic commits (see the module docstring)."""

    location: str

    def where(self, name: str) -> str:
        """``name``'s full location, for messages (a path or a URL)."""
        return f"{self.location.rstrip('/')}/{name}"

    @abc.abstractmethod
    def write(self, name: str, body: Body) -> Written:
        """Make ``body``'s bytes durable without publishing them.

        Raises :class:`asyncckpt.CheckpointWriteError` (the OS error as its cause); then nothing
        is left behind and whatever ``name`` held before is intact.
        """

    @abc.abstractmethod
    def open_written(self, written: Written) -> ReadHandle:
        """Read back bytes that are durable but not yet committed (verify before publishing)."""

    @abc.abstractmethod
    def commit(self, written: Written) -> float:
        """Publish ``written`` under its name atomically (replacing an older object); return seconds.

        Raises :class:`asyncckpt.CheckpointWriteError`; after a failure the object is either
        fully published or not at all.
        """

    def drop_replaced(self) -> None:
        """Delete the objects that commits replaced but kept aside (hidden) so that publishing
        did not pay for their deletion; call it once the commit's guarantee is given. Never
        raises. This default has none to delete."""
        return

    @abc.abstractmethod
    def discard(self, written: Written) -> None:
        """Drop durable bytes that will not be committed. Never raises for a missing object."""

    @abc.abstractmethod
    def open(self, name: str) -> ReadHandle:
        """Open a committed object. Raises ``FileNotFoundError`` when it does not exist (or is not
        a regular object), ``OSError`` when the storage fails, and
        :class:`asyncckpt.CorruptedCheckpointError` when its commit record is damaged (stores that
        commit with a record, see docs/REMOTE.md)."""

    @abc.abstractmethod
    def ls(self, under: str = "") -> list[StoredObject]:
        """Committed objects and folders directly inside ``under``, sorted by name.

        A missing root or folder lists as empty. Raises ``NotADirectoryError`` when the root is a
        file, ``OSError`` when the storage fails.
        """

    @abc.abstractmethod
    def delete(self, names: Sequence[str]) -> None:
        """Remove committed objects durably (a missing one is not an error). A folder name
        (``kind="dir"`` in :meth:`ls`) removes the folder, which must be empty by then."""

    @abc.abstractmethod
    def leftovers(self) -> list[str]:
        """Names of what crashed writers left behind (temp files, uploads without their commit
        object) that no live writer owns, in the root and in its folders one level down
        (multi-rank step folders); never readable checkpoints."""

    def leftovers_in(self, folder: str) -> list[str]:
        """:meth:`leftovers` directly inside ``folder`` (a multi-rank step folder). This default
        filters the whole listing; a storage that can look at one folder alone does."""
        prefix = f"{folder.strip('/')}/"
        return [n for n in self.leftovers() if n.startswith(prefix) and "/" not in n[len(prefix) :]]

    @abc.abstractmethod
    def remove_leftovers(self, names: Sequence[str]) -> None:
        """Remove the given leftovers durably."""

    def unfinished(self, under: str = "") -> list[Unfinished]:
        """Writes directly inside ``under`` not committed (yet), live or abandoned, by label;
        for display only (``asyncckpt ls``). A storage that cannot tell lists none."""
        return []

    @abc.abstractmethod
    def append_line(self, name: str, line: str) -> None:
        """Append one text line to a small log object (``failed_checkpoints.txt``). ``OSError``
        when the storage refuses (a read-only directory)."""
