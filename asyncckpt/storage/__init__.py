"""The Storage seam (:class:`Storage`) and its implementations.

``PosixStorage`` keeps the durable-write protocol of DESIGN.md on a local directory, with the
:class:`FileOps` fault seam; ``FsspecStorage`` (in :mod:`.remote`, imported only when a URL
needs it) serves object stores and other fsspec filesystems. :func:`open_storage` turns what a
user passed (a path, a URL or a ``Storage``) into a ``Storage``.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import UsageError
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
    "is_url",
    "open_storage",
]

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")
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


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URL for remote storage (a scheme other than ``file://``)."""
    match = _SCHEME.match(os.fspath(location))
    return match is not None and match[1].lower() != "file"


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
        if text.startswith("file://"):
            text = unquote(urlsplit(text).path)
        return PosixStorage(text, ops=ops)
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
