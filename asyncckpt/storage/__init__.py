"""The Storage seam (:class:`Storage`) and its implementations.

``PosixStorage`` keeps the durable-write protocol of DESIGN.md on a local directory, with the
:class:`FileOps` fault seam; ``FsspecStorage`` (in :mod:`.remote`, imported only when a URL
needs it) serves object stores and other fsspec filesystems. :func:`open_storage` turns what a
user passed (a path, a URL or a ``Storage``) into a ``Storage``.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import UsageError
from .base import Body, Cursor, ParallelReads, ReadHandle, Sink, Storage, StoredObject, Unfinished, Written
from .fileops import OS, FdSink, FileOps
from .localfile import PosixFile
from .paths import CheckpointPath, RemotePath, is_url, local_path, path_of
from .posix import PosixStorage
from .temps import is_temp_name

Location = str | os.PathLike[str] | Storage

__all__ = [
    "OS",
    "Body",
    "CheckpointPath",
    "Cursor",
    "FdSink",
    "FileOps",
    "Location",
    "ParallelReads",
    "PosixFile",
    "PosixStorage",
    "ReadHandle",
    "RemotePath",
    "Sink",
    "Storage",
    "StoredObject",
    "Unfinished",
    "Written",
    "is_temp_name",
    "is_url",
    "local_path",
    "open_storage",
    "path_of",
]

# pip extras that bring each scheme's fsspec filesystem (for the message when it is missing)
_EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
}


def open_storage(
    location: Location, *, storage_options: dict[str, Any] | None = None, ops: FileOps = OS
) -> Storage:
    """The storage for ``location``.

    A ``Storage`` is returned as given; a URL with a scheme other than ``file://``
    (``s3://bucket/run``) opens an :class:`~asyncckpt.storage.remote.FsspecStorage` with
    ``storage_options`` passed to fsspec; a local path or ``file://`` URL opens a
    :class:`PosixStorage` (``storage_options`` do not apply to it and are ignored).

    Raises :class:`asyncckpt.UsageError` when the URL's filesystem is not installed (the message
    names the pip extra) or when ``ops`` (a POSIX fault seam) is given with a URL.
    """
    if isinstance(location, Storage):
        return location
    text = os.fspath(location)
    if not is_url(text):
        return PosixStorage(local_path(text), ops=ops)
    if ops is not OS:
        raise UsageError("ops= (the POSIX fault seam) does not apply to remote storage", path=text)
    return _open_remote(text, storage_options)


def _open_remote(url: str, storage_options: dict[str, Any] | None) -> Storage:
    scheme = url.partition("://")[0].lower()
    extra = _EXTRAS.get(scheme)
    hint = f"pip install 'asyncckpt[{extra}]'" if extra else f"install the fsspec filesystem for {scheme}://"
    try:
        from .remote import FsspecStorage
    except ImportError as exc:
        raise UsageError(f"remote storage needs fsspec ({exc}); {hint}", path=url) from exc
    try:
        return FsspecStorage(url, storage_options=storage_options)
    except ImportError as exc:
        raise UsageError(f"no filesystem for {scheme}:// ({exc}); {hint}", path=url) from exc
    except ValueError as exc:  # fsspec: "Protocol not known"
        raise UsageError(f"cannot open {scheme}:// storage ({exc})", path=url) from exc
