"""A run directory the reader may not list (permission denied): ``load_latest``, ``restore`` and
``check_candidates`` raise a :class:`CheckpointError` naming it, never the raw ``PermissionError``
and never "no checkpoints" (a fresh start would overwrite a run it could not see).

EACCES is injected through the ``FileOps`` seam, so the test also runs as root; the ``chmod 000``
test runs only as another user (permission bits do not apply to root).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import asyncckpt
from asyncckpt.catalog import checkpoint_name
from asyncckpt.errors import CheckpointError, NoValidCheckpointError
from asyncckpt.storage import FileOps, PosixStorage
from asyncckpt.testing import deterministic_state

pytestmark = pytest.mark.timeout(60)
AS_ROOT = os.geteuid() == 0

READERS: dict[str, Callable[[Any], object]] = {
    "load_latest": asyncckpt.load_latest,
    "restore": lambda directory: asyncckpt.restore(directory, {}),
    "check_candidates": asyncckpt.check_candidates,
}


class UnlistableOps(FileOps):
    """Listing the directory fails with EACCES, as for ``chmod 000``."""

    def scandir(self, folder: Path) -> list[os.DirEntry[str]]:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))


def a_run(directory: Path) -> Path:
    directory.mkdir()
    asyncckpt.save(directory / checkpoint_name(1), deterministic_state(1), step=1)
    return directory


def check(error: CheckpointError, run: Path) -> None:
    assert not isinstance(error, PermissionError | NoValidCheckpointError)
    assert error.path == str(run) and "EACCES" in error.reason
    assert isinstance(error.__cause__, PermissionError)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_an_unlistable_directory_is_a_checkpoint_error_naming_it(tmp_path: Path, reader: str) -> None:
    run = a_run(tmp_path / "run")

    with pytest.raises(CheckpointError) as info:
        READERS[reader](PosixStorage(run, ops=UnlistableOps()))

    check(info.value, run)


@pytest.mark.skipif(AS_ROOT, reason="permission bits do not apply to root (the FileOps test covers it)")
@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_chmod_000_directory_is_a_checkpoint_error_naming_it(tmp_path: Path, reader: str) -> None:
    run = a_run(tmp_path / "run")
    run.chmod(0o000)
    try:
        with pytest.raises(CheckpointError) as info:
            READERS[reader](run)
    finally:
        run.chmod(0o755)
    check(info.value, run)
