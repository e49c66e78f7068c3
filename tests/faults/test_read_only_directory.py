"""A run directory on a read-only filesystem, or one we may not read: ``restore()`` works where it
can, and every failure is a documented error naming the directory, never a raw ``OSError``.

EROFS and EACCES are injected through the ``FileOps`` seam (and ``os.mkdir``), so these tests
need no mount and also run as root, for whom permission bits do not apply; the chmod tests run
only as another user.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from pathlib import Path

import pytest
import structlog

import asyncckpt
from asyncckpt import AsyncCheckpointer
from asyncckpt.catalog import checkpoint_name
from asyncckpt.errors import CheckpointError, CheckpointWriteError
from asyncckpt.events import EVENT_LOG_UNAVAILABLE, EVENTS_FILE
from asyncckpt.storage import FileOps
from asyncckpt.testing import deterministic_state, states_equal

pytestmark = pytest.mark.timeout(120)
AS_ROOT = os.geteuid() == 0


class ReadOnlyOps(FileOps):
    """Every call that would change the directory fails with ``err``; reads work."""

    def __init__(self, err: int = errno.EROFS) -> None:
        self.err = err

    def fail(self, path: object) -> OSError:
        return OSError(self.err, os.strerror(self.err), str(path))

    def open_exclusive(self, path: Path) -> int:
        raise self.fail(path)

    def open_append(self, path: Path) -> int:
        raise self.fail(path)

    def rename(self, src: Path, dst: Path) -> None:
        raise self.fail(src)

    def mkdir(self, path: Path) -> None:
        raise self.fail(path)

    def rmdir(self, path: Path) -> None:
        raise self.fail(path)

    def unlink(self, path: Path) -> None:
        raise self.fail(path)


class UnreadableOps(ReadOnlyOps):
    """A directory we may neither list nor write (``chmod 000``): EACCES."""

    def __init__(self) -> None:
        super().__init__(errno.EACCES)

    def scandir(self, folder: Path) -> list[os.DirEntry[str]]:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def a_run(directory: Path) -> Path:
    """Two checkpoints and a temp file left by an older release."""
    directory.mkdir(exist_ok=True)
    for step in (1, 2):
        asyncckpt.save(directory / checkpoint_name(step), deterministic_state(step), step=step)
    (directory / f".{checkpoint_name(3)}.tmp-deadbeef").write_bytes(b"torn")
    return directory


def test_a_read_only_filesystem_opens_restores_and_refuses_the_first_save(
    tmp_path: Path, faults: Counter[str]
) -> None:
    run = a_run(tmp_path / "run")
    before = snapshot(run)
    with structlog.testing.capture_logs() as logs, AsyncCheckpointer(run, ops=ReadOnlyOps()) as ckpt:
        restored = ckpt.restore({})
        with pytest.raises(CheckpointWriteError) as info:
            ckpt.save(3, deterministic_state(3))
    faults["EROFS: read-only run directory (FileOps)"] += 1
    assert restored is not None and restored.step == 2
    assert states_equal(restored.state, deterministic_state(2))
    assert info.value.path == str(run) and "EROFS" in info.value.reason
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.EROFS
    assert snapshot(run) == before
    unavailable = [e for e in logs if e["event"] == EVENT_LOG_UNAVAILABLE]
    assert unavailable and unavailable[0]["path"] == str(run / EVENTS_FILE)


def test_a_missing_directory_on_a_read_only_filesystem_is_a_fresh_run_that_cannot_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(path: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(os, "mkdir", read_only)
    run = tmp_path / "run"
    with AsyncCheckpointer(run) as ckpt:
        assert ckpt.restore({}) is None
        with pytest.raises(CheckpointWriteError, match="EROFS") as info:
            ckpt.save(1, deterministic_state(1))
    assert info.value.path == str(run) and not run.exists()


def test_an_unreadable_directory_gives_a_checkpoint_error_not_a_permission_error(
    tmp_path: Path, faults: Counter[str]
) -> None:
    run = a_run(tmp_path / "run")
    with AsyncCheckpointer(run, ops=UnreadableOps()) as ckpt:
        with pytest.raises(CheckpointError) as restoring:
            ckpt.restore({})
        with pytest.raises(CheckpointWriteError) as saving:
            ckpt.save(3, deterministic_state(3))
    faults["EACCES: unreadable run directory (FileOps)"] += 1
    assert not isinstance(restoring.value, PermissionError)
    assert restoring.value.path == str(run) and "EACCES" in restoring.value.reason
    assert isinstance(restoring.value.__cause__, PermissionError)
    assert saving.value.path == str(run) and "EACCES" in saving.value.reason


@pytest.mark.skipif(AS_ROOT, reason="permission bits do not apply to root (the FileOps test covers it)")
def test_a_chmod_000_directory_gives_a_checkpoint_error(tmp_path: Path) -> None:
    run = a_run(tmp_path / "run")
    run.chmod(0o000)
    try:
        with AsyncCheckpointer(run) as ckpt:
            with pytest.raises(CheckpointError) as restoring:
                ckpt.restore({})
            with pytest.raises(CheckpointWriteError):
                ckpt.save(3, deterministic_state(3))
    finally:
        run.chmod(0o755)
    assert not isinstance(restoring.value, PermissionError) and restoring.value.path == str(run)


@pytest.mark.skipif(AS_ROOT, reason="permission bits do not apply to root (the FileOps test covers it)")
def test_a_chmod_555_directory_restores_and_refuses_the_first_save(tmp_path: Path) -> None:
    run = a_run(tmp_path / "run")
    before = snapshot(run)
    run.chmod(0o555)
    try:
        with AsyncCheckpointer(run) as ckpt:
            restored = ckpt.restore({})
            with pytest.raises(CheckpointWriteError, match="EACCES"):
                ckpt.save(3, deterministic_state(3))
    finally:
        run.chmod(0o755)
    assert restored is not None and restored.step == 2 and snapshot(run) == before
