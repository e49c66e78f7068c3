"""What a command's path argument names: a local path or a URL, and the storage options.

A local path must exist (a usage error, exit code 1, otherwise). A URL (``s3://bucket/run``)
is opened through fsspec with the credentials of the environment (``AWS_*`` variables, the
profile, an instance role) and ``--storage-options`` (JSON) on top; an object store has no
directories, so a prefix with nothing under it is an empty run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import UsageError
from ..storage import Storage, is_url, local_path
from .exits import existing
from .inspection import target

StorageOptionsOption = Annotated[
    str | None,
    typer.Option(
        "--storage-options",
        metavar="JSON",
        help="For a URL: options for its fsspec filesystem as a JSON object, e.g. "
        '\'{"profile": "training"}\' or \'{"anon": true}\' (credentials otherwise come from the '
        "environment).",
    ),
]


def storage_options(text: str | None) -> dict[str, Any] | None:
    """``--storage-options`` as a dict; :class:`UsageError` when it is not a JSON object."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--storage-options is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise UsageError("--storage-options must be a JSON object")
    return value


def open_location(location: str, options: str | None) -> tuple[Storage, str | None]:
    """``(storage, None)`` for a directory or run, ``(storage of its folder, name)`` for one file.

    Raises :class:`UsageError` for a local path that does not exist.
    """
    if not is_url(location):
        existing(Path(local_path(location)))
    return target(location, storage_options=storage_options(options))
