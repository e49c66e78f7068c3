"""POSIX storage: the durable-write protocol of DESIGN.md on a local directory.

Every OS call the write path makes goes through a :class:`FileOps` object so that tests (and
users, via :mod:`asyncckpt.testing`) can inject faults or record the call order.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..errors import CheckpointWriteError
from .base import Body, ObjectKind, ReadHandle, Storage, StoredObject, Unfinished, Written
from .direct import HAVE_DIRECT, BouncePool, DirectSink, direct_capable, direct_wanted
from .localfile import IOV_MAX, PosixFile, open_regular
from .temps import TEMP_MARK, is_temp_name, regular_temps, temp_files, temp_name


class FileOps:
    """The OS calls of the write path, and the listing and log opening of a run directory.

    Subclass to inject faults; the defaults call ``os``.
    """

    def open_exclusive(self, path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def write(self, fd: int, data: memoryview | bytes) -> int:
        return os.write(fd, data)

    def open_direct(self, path: Path) -> int | None:
        """Open the file just created at ``path`` again, for direct writes (``O_DIRECT``); None
        when the filesystem or the platform refuses (every write then goes through the page
        cache)."""
        if not HAVE_DIRECT:
            return None
        try:
            return os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            return None

    def write_direct(self, fd: int, data: memoryview, offset: int) -> int:
        """Write ``data`` (4 KiB-aligned memory and length) at ``offset`` of a descriptor from
        :meth:`open_direct`; return the bytes written."""
        return os.pwrite(fd, data, offset)

    def writev(self, fd: int, buffers: Sequence[memoryview | bytes]) -> int:
        """Write ``buffers`` in order with one call (at most ``IOV_MAX`` of them); return the
        bytes written, which may be fewer than all. A subclass that overrides only ``write``
        gets one ``write`` per buffer instead (see :class:`FdSink`), so its faults still apply."""
        return os.writev(fd, buffers)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o755)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def fsync_dir(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def scandir(self, folder: Path) -> list[os.DirEntry[str]]:
        """The entries of ``folder`` (``FileNotFoundError`` when it is missing)."""
        with os.scandir(folder) as entries:
            return list(entries)

    def open_append(self, path: Path) -> int:
        """Open (create) a log file for appending: a regular file only (see :func:`open_regular`)."""
        return open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)


OS = FileOps()


@dataclass(frozen=True)
class WriteTimings:
    """What one atomic write took, in seconds, and how many bytes it wrote."""

    nbytes: int
    write_s: float
    fsync_s: float
    publish_s: float  # rename + directory fsync


class FdSink:
    """A sink writing to a file descriptor; retries short writes.

    ``writev`` writes several buffers with one system call where ``ops`` can (its ``writev``
    is the default or its own), else with one ``write`` each.
    """

    def __init__(self, fd: int, ops: FileOps) -> None:
        self.fd = fd
        self.ops = ops
        kind = type(ops)
        self._vectored = kind.writev is not FileOps.writev or kind.write is FileOps.write

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = self.ops.write(self.fd, view)
            if written <= 0:
                raise OSError(f"write returned {written}")
            view = view[written:]

    def writev(self, buffers: Sequence[memoryview | bytes]) -> None:
        if not self._vectored:
            for data in buffers:
                self.write(data)
            return
        pending = list(buffers)
        while pending:
            batch = pending[:IOV_MAX]
            written = self.ops.writev(self.fd, batch)
            if written <= 0:
                raise OSError(f"writev returned {written}")
            done = 0
            for data in batch:  # drop what was written; a buffer written in part goes on
                if written < len(data):
                    break
                written -= len(data)
                done += 1
            pending = pending[done:]
            if written:
                pending[0] = memoryview(pending[0]).cast("B")[written:]


def make_directory_durably(directory: Path) -> None:
    """Create ``directory`` (and missing parents), fsyncing each parent whose entry was added, so
    a fresh run's folder survives a power cut along with its first checkpoint."""
    missing = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    directory.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        with contextlib.suppress(OSError):  # a parent we cannot open for fsync (rare): best effort
            OS.fsync_dir(created.parent)


class PosixStorage(Storage):
    """Checkpoint objects as files of one local directory (folders for multi-file steps).

    ``write`` creates ``.<name>.tmp-<random>`` with ``O_EXCL`` in the target's directory and
    fsyncs it; ``commit`` renames it over ``name`` and fsyncs the directory. A failed fsync is
    never retried: the kernel may have dropped the dirty pages, so the data is treated as lost.

    ``direct`` (default: on unless ``ASYNCCKPT_DIRECT_IO=0``) writes long aligned runs around
    the page cache where the filesystem allows (:mod:`asyncckpt.storage.direct`).
    """

    def __init__(
        self, root: str | os.PathLike[str], *, ops: FileOps = OS, direct: bool | None = None
    ) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self.ops = ops
        self.direct = (direct_wanted() if direct is None else direct) and direct_capable(ops)
        self._bounces = BouncePool()

    def path(self, name: str) -> Path:
        """The file that holds ``name``."""
        return self.root / name

    def where(self, name: str) -> str:
        return str(self.path(name))

    def write(self, name: str, body: Body) -> Written:
        final = self.path(name)
        tmp = temp_name(final)
        started = time.perf_counter()
        try:
            self._make_folders(final.parent)
            fd = self.ops.open_exclusive(tmp)
        except OSError as exc:
            raise CheckpointWriteError(
                f"cannot create a temp file in {final.parent}: {exc}", path=final
            ) from exc
        direct_fd = self.ops.open_direct(tmp) if self.direct else None
        try:
            if direct_fd is None:
                nbytes = body(FdSink(fd, self.ops))
            else:
                with (
                    self._bounces.lend() as bounce,
                    DirectSink(FdSink(fd, self.ops), direct_fd, bounce) as sink,
                ):
                    nbytes = body(sink)
                    sink.finish()
            written = time.perf_counter()
            self.ops.fsync(fd)
            synced = time.perf_counter()
        except BaseException as exc:
            _close_quietly(fd, self.ops)
            raise self._failed(exc, tmp, final) from exc
        finally:
            if direct_fd is not None:
                with contextlib.suppress(OSError):  # not part of the protocol: the fsync was
                    os.close(direct_fd)
        try:
            self.ops.close(fd)
        except OSError as exc:
            raise self._failed(exc, tmp, final) from exc
        return Written(name, nbytes, written - started, synced - written, tmp)

    def _make_folders(self, folder: Path) -> None:
        """Create ``folder`` and its missing parents below the root (``step-0000000300/``).

        Each new folder's entry is made durable in its parent (directory fsync) before a file is
        written into it. Several processes may create the same folder at once.
        """
        missing = []
        while folder != self.root and not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                self.ops.mkdir(path)
            self.ops.fsync_dir(path.parent)

    def _failed(self, exc: BaseException, tmp: Path, final: Path) -> BaseException:
        left = _discard_temp(tmp, self.ops)
        if not isinstance(exc, OSError):
            return exc
        return CheckpointWriteError(
            f"writing the checkpoint failed ({exc}); {left} and the previous checkpoint is intact",
            path=final,
        )

    def open_written(self, written: Written) -> ReadHandle:
        return PosixFile(written.token, written.name)

    def commit(self, written: Written) -> float:
        final = self.path(written.name)
        started = time.perf_counter()
        try:
            self.ops.rename(written.token, final)
        except OSError as exc:
            left = _discard_temp(written.token, self.ops)
            raise CheckpointWriteError(
                f"publishing the checkpoint failed ({exc}); {left}", path=final
            ) from exc
        try:
            self.ops.fsync_dir(final.parent)
        except OSError as exc:
            raise CheckpointWriteError(
                f"fsync of directory {final.parent} failed ({exc}); the file is complete but its "
                "rename may not survive a power loss",
                path=final,
            ) from exc
        return time.perf_counter() - started

    def discard(self, written: Written) -> None:
        _unlink_quietly(written.token, self.ops)

    def open(self, name: str) -> PosixFile:
        return PosixFile(self.path(name), name)

    def ls(self, under: str = "") -> list[StoredObject]:
        folder = self.path(under) if under else self.root
        try:
            entries = self.ops.scandir(folder)
        except FileNotFoundError:
            return []
        found = []
        prefix = f"{under.rstrip('/')}/" if under else ""
        for entry in entries:
            if is_temp_name(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed while we listed
                continue
            kind: ObjectKind
            if stat.S_ISREG(info.st_mode):
                kind = "file"
            elif stat.S_ISDIR(info.st_mode):
                kind = "dir"
            else:
                continue
            modified = datetime.fromtimestamp(info.st_mtime, UTC)
            size = info.st_size if kind == "file" else 0
            found.append(StoredObject(prefix + entry.name, kind, size, modified))
        return sorted(found, key=lambda o: o.name)

    def delete(self, names: Sequence[str]) -> None:
        """Unlink files, remove (empty) folders, then fsync the directories that held them."""
        folders = set()
        for name in names:
            path = self.path(name)
            if path.is_dir() and not path.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    self.ops.rmdir(path)
            else:
                _unlink_quietly(path, self.ops)
            folders.add(path.parent)
        for folder in sorted(folders):
            self.ops.fsync_dir(folder)

    def create(self) -> None:
        """Create the root directory durably (its parent's entry fsynced) if it is missing."""
        make_directory_durably(self.root)

    def leftovers(self) -> list[str]:
        """Temp files no live writer owns (see :func:`temp_is_abandoned`), in the root and in its
        folders one level down (multi-rank step folders)."""
        found = temp_files(self.root, "", scandir=self.ops.scandir)
        try:
            folders = [e.name for e in self.ops.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        for folder in folders:
            found += temp_files(self.root / folder, f"{folder}/", scandir=self.ops.scandir)
        return sorted(found)

    def leftovers_in(self, folder: str) -> list[str]:
        """:meth:`leftovers` directly inside ``folder`` (one directory scanned)."""
        folder = folder.strip("/")
        return sorted(temp_files(self.path(folder), f"{folder}/", scandir=self.ops.scandir))

    def remove_leftovers(self, names: Sequence[str]) -> None:
        self.delete(names)

    def unfinished(self, under: str = "") -> list[Unfinished]:
        """Every temp file directly inside ``under`` (a live writer's too), regular files only."""
        folder = self.path(under) if under else self.root
        prefix = f"{under.rstrip('/')}/" if under else ""
        found = []
        for entry, info in regular_temps(folder, self.ops.scandir):
            name = prefix + entry.name[1:].partition(TEMP_MARK)[0]
            modified = datetime.fromtimestamp(info.st_mtime, UTC)
            found.append(Unfinished(name, prefix + entry.name, info.st_size, modified))
        return sorted(found, key=lambda u: u.label)

    def append_line(self, name: str, line: str) -> None:
        text = line if line.endswith("\n") else line + "\n"
        fd = self.ops.open_append(self.path(name))  # never through a symlink, never a FIFO
        try:
            os.write(fd, text.encode("utf-8", "backslashreplace"))
        finally:
            os.close(fd)


def atomic_write(final: Path, body: Body, *, ops: FileOps = OS) -> WriteTimings:
    """Write a file durably and publish it atomically under ``final`` (write, then commit).

    After a crash at any instant ``final`` holds its previous content or the new complete file.
    Raises :class:`CheckpointWriteError` with the OS error as its cause.
    """
    storage = PosixStorage(final.parent, ops=ops)
    written = storage.write(final.name, body)
    publish_s = storage.commit(written)
    return WriteTimings(written.nbytes, written.write_s, written.fsync_s, publish_s)


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
