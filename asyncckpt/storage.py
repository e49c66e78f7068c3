"""Durable file primitives: atomic write, directory fsync, listing, temp-file clean-up.

Every OS call the write path makes goes through a :class:`FileOps` object so that tests (and
users, via :mod:`asyncckpt.testing`) can inject faults or record the call order.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .errors import CheckpointWriteError

CHECKPOINT_SUFFIX = ".ckpt"
_CHECKPOINT_NAME = re.compile(r"^step-(\d{1,19})\.ckpt$")
_TEMP_MARK = ".tmp-"


class FileOps:
    """The OS calls of the write path. Subclass to inject faults; the defaults call ``os``."""

    def open_exclusive(self, path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def write(self, fd: int, data: memoryview | bytes) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def fsync_dir(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


OS = FileOps()


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint file found in a directory."""

    step: int
    path: Path
    size: int
    created: datetime


@dataclass(frozen=True)
class WriteTimings:
    """What one atomic write took, in seconds, and how many bytes it wrote."""

    nbytes: int
    write_s: float
    fsync_s: float
    publish_s: float  # rename + directory fsync


class FdSink:
    """A :class:`asyncckpt.format.Sink` writing to a file descriptor; retries short writes."""

    def __init__(self, fd: int, ops: FileOps) -> None:
        self.fd = fd
        self.ops = ops

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = self.ops.write(self.fd, view)
            if written <= 0:
                raise OSError(f"write returned {written}")
            view = view[written:]


def checkpoint_name(step: int) -> str:
    """The file name of ``step``'s checkpoint: ``step-0000000300.ckpt``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:010d}{CHECKPOINT_SUFFIX}"


def parse_checkpoint_name(name: str) -> int | None:
    """The step of a checkpoint file name, or None when ``name`` is not one."""
    match = _CHECKPOINT_NAME.match(name)
    return int(match[1]) if match else None


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{_TEMP_MARK}{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a writer's temporary file (never a checkpoint)."""
    return name.startswith(".") and _TEMP_MARK in name


def atomic_write(final: Path, write_body: Callable[[FdSink], int], *, ops: FileOps = OS) -> WriteTimings:
    """Write a file durably and publish it atomically under ``final``.

    The protocol (DESIGN.md): write a temp file in the same directory opened ``O_EXCL``, fsync it,
    rename it over ``final``, fsync the directory. On any failure before the rename the temp file is
    unlinked and ``final`` keeps its previous content. A failed fsync is never retried: the kernel
    may have dropped the dirty pages, so the data is treated as lost.

    Raises :class:`CheckpointWriteError` with the OS error as its cause.
    """
    directory = final.parent
    tmp = temp_name(final)
    started = time.perf_counter()
    try:
        fd = ops.open_exclusive(tmp)
    except OSError as exc:
        raise CheckpointWriteError(f"{final}: cannot create a temp file in {directory}: {exc}") from exc
    try:
        nbytes = write_body(FdSink(fd, ops))
        written = time.perf_counter()
        ops.fsync(fd)
        synced = time.perf_counter()
    except BaseException as exc:
        _close_quietly(fd, ops)
        left = _discard_temp(tmp, ops)
        if isinstance(exc, OSError):
            raise CheckpointWriteError(
                f"{final}: writing the checkpoint failed ({exc}); {left} and the previous "
                "checkpoint is intact"
            ) from exc
        raise
    try:
        ops.close(fd)
        ops.rename(tmp, final)
    except OSError as exc:
        left = _discard_temp(tmp, ops)
        raise CheckpointWriteError(f"{final}: publishing the checkpoint failed ({exc}); {left}") from exc
    try:
        ops.fsync_dir(directory)
    except OSError as exc:
        raise CheckpointWriteError(
            f"{final}: fsync of directory {directory} failed ({exc}); the file is complete but its "
            "rename may not survive a power loss"
        ) from exc
    published = time.perf_counter()
    return WriteTimings(nbytes, written - started, synced - written, published - synced)


def _close_quietly(fd: int, ops: FileOps) -> None:
    with contextlib.suppress(OSError):  # the write already failed: that is the error to report
        ops.close(fd)


def _discard_temp(tmp: Path, ops: FileOps) -> str:
    """Unlink a failed write's temp file; say what became of it (for the error message).

    A failure here must not hide the write's own error, which is the one to report.
    """
    try:
        _unlink_quietly(tmp, ops)
    except OSError as exc:
        return f"the temp file {tmp.name} could not be removed ({exc}; the next start removes it)"
    return "the temp file was removed"


def _unlink_quietly(path: Path, ops: FileOps) -> None:
    with contextlib.suppress(FileNotFoundError):
        ops.unlink(path)


def list_checkpoints(directory: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Committed checkpoint files in ``directory``, oldest step first (newest last).

    Temp files and symlinks are never listed (a symlink could point outside the directory).
    A missing directory has no checkpoints.
    """
    root = Path(directory)
    found = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    for entry in entries:
        step = parse_checkpoint_name(entry.name)
        if step is None:
            continue
        info = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(info.st_mode):
            continue
        created = datetime.fromtimestamp(info.st_mtime, UTC)
        found.append(CheckpointInfo(step, root / entry.name, info.st_size, created))
    return sorted(found, key=lambda c: c.step)


def temp_files(directory: Path) -> list[Path]:
    """Temp files a writer left in ``directory`` (regular files only)."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    return sorted(
        directory / e.name for e in entries if is_temp_name(e.name) and e.is_file(follow_symlinks=False)
    )


def remove_durably(paths: list[Path], directory: Path, *, ops: FileOps = OS) -> None:
    """Unlink ``paths`` and fsync ``directory`` so the removals survive a power loss."""
    for path in paths:
        _unlink_quietly(path, ops)
    if paths:
        ops.fsync_dir(directory)
