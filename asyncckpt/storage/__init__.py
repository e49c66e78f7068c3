"""The Storage seam (:class:`Storage`) and its implementations.

``PosixStorage`` keeps the durable-write protocol of DESIGN.md on a local directory, with the
:class:`FileOps` fault seam. :func:`open_storage` turns what a user passed (a path or a
``Storage``) into a ``Storage``.
"""

from __future__ import annotations

import os

from .base import Body, Cursor, ReadHandle, Sink, Storage, StoredObject, Written
from .posix import OS, FdSink, FileOps, PosixFile, PosixStorage, WriteTimings, atomic_write, is_temp_name

Location = str | os.PathLike[str] | Storage

__all__ = [
    "OS",
    "Body",
    "Cursor",
    "FdSink",
    "FileOps",
    "Location",
    "PosixFile",
    "PosixStorage",
    "ReadHandle",
    "Sink",
    "Storage",
    "StoredObject",
    "WriteTimings",
    "Written",
    "atomic_write",
    "is_temp_name",
    "open_storage",
]


def open_storage(location: Location, *, ops: FileOps = OS) -> Storage:
    """The storage for ``location``: a ``Storage`` as given, a local path as :class:`PosixStorage`."""
    if isinstance(location, Storage):
        return location
    return PosixStorage(location, ops=ops)
