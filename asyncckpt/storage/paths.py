"""How results name a checkpoint: a ``Path`` for a local file, a :class:`RemotePath` for a URL.

``pathlib.Path("s3://bucket/run")`` folds the ``//`` into ``s3:/bucket/run``, so a URL stays
text. :class:`RemotePath` is that text (a ``str``: it prints, compares and serializes as the
URL) with the few ``Path`` attributes results are read for (``name``, ``suffix``, ``stem``,
``parent``, ``/``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")


class RemotePath(str):
    """A checkpoint's URL (``s3://bucket/run/step-0000000300.ckpt``): the text itself, plus
    ``name``, ``suffix``, ``stem``, ``parent`` and ``/`` as on a ``Path``."""

    __slots__ = ()

    @property
    def name(self) -> str:
        """The last segment: ``step-0000000300.ckpt``."""
        return self.rstrip("/").rpartition("/")[2]

    @property
    def suffix(self) -> str:
        """The name's extension: ``.ckpt``."""
        return PurePosixPath(self.name).suffix

    @property
    def stem(self) -> str:
        """The name without its extension."""
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> RemotePath:
        """The URL one segment up (the bucket's URL is its own parent)."""
        text = self.rstrip("/")
        head = text.rpartition("/")[0]
        return RemotePath(text if head.endswith(":/") else head)

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self.rstrip('/')}/{name}")

    def __repr__(self) -> str:
        return f"RemotePath({str.__repr__(self)})"


CheckpointPath = Path | RemotePath


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URL for remote storage (a scheme other than ``file://``)."""
    match = _SCHEME.match(os.fspath(location))
    return match is not None and match[1].lower() != "file"


def local_path(location: str | os.PathLike[str]) -> str:
    """``location`` as a local path: a ``file://`` URL's path, anything else as it is."""
    text = os.fspath(location)
    if text.lower().startswith("file://"):
        return unquote(urlsplit(text).path)
    return text


def path_of(location: str | os.PathLike[str]) -> CheckpointPath:
    """``location`` as results carry it: a :class:`RemotePath` for a URL, else a ``Path``."""
    text = os.fspath(location)
    return RemotePath(text) if is_url(text) else Path(local_path(text))
