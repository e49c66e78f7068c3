"""POSIX storage: the durable-write protocol of DESIGN.md on a local directory.

Every OS call the write path makes goes through a :class:`FileOps` object (:mod:`.fileops`) so
that tests (and users, via :mod:`asyncckpt.testing`) can inject faults or record the call order.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from ..errors import CheckpointWriteError
from .base import Body, ObjectKind, ReadHandle, Storage, StoredObject, Unfinished, Written
from .direct import BouncePool, DirectSink, direct_capable, direct_wanted
from .fileops import OS, FdSink, FileOps
from .localfile import PosixFile
from .temps import (
    TEMP_MARK,
    is_replaced_name,
    is_temp_name,
    regular_temps,
    replaced_name,
    temp_files,
    temp_name,
)

__all__ = ["OS", "FdSink", "FileOps", "PosixStorage", "make_directory_durably"]  # re-exported


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
    A file that ``commit`` replaces keeps a hidden name until :meth:`drop_replaced` deletes it,
    so the commit does not pay for freeing its blocks.

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
        self._replaced: list[Path] = []  # old files commits kept aside, for drop_replaced
        self._replaced_lock = threading.Lock()

    def path(self, name: str) -> Path:
        """The file that holds ``name``."""
        return self.root / name

    def where(self, name: str) -> str:
        return str(self.path(name))

    def write(self, name: str, body: Body) -> Written:
        final = self.path(name)
        tmp = temp_name(final)
        if self._replaced:  # a caller that never dropped them: not past this write
            self.drop_replaced()
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
        """Rename the temp file over ``written.name``, then fsync the directory.

        A file already there first gets a hidden second name (:func:`replaced_name`), so the
        rename does not drop its last link: on a filesystem that discards freed blocks, freeing
        a file takes a fraction of a second per GiB, which :meth:`drop_replaced` pays after the
        commit. Where hard links are refused, the rename replaces the file as before.
        """
        final = self.path(written.name)
        started = time.perf_counter()
        kept = self._keep_replaced(final)
        try:
            self.ops.rename(written.token, final)
        except OSError as exc:
            if kept is not None:
                _unlink_if_possible(kept, self.ops)
            left = _discard_temp(written.token, self.ops)
            raise CheckpointWriteError(
                f"publishing the checkpoint failed ({exc}); {left}", path=final
            ) from exc
        try:
            self.ops.fsync_dir(final.parent)
        except OSError as exc:
            if kept is not None:  # a failed commit: no guarantee to defer its deletion past
                _unlink_if_possible(kept, self.ops)
            raise CheckpointWriteError(
                f"fsync of directory {final.parent} failed ({exc}); the file is complete but its "
                "rename may not survive a power loss",
                path=final,
            ) from exc
        if kept is not None:
            with self._replaced_lock:
                self._replaced.append(kept)
        return time.perf_counter() - started

    def _keep_replaced(self, final: Path) -> Path | None:
        """Link the regular file at ``final`` (if any) to a hidden name; return that name. None
        when there is none, or the filesystem refuses hard links (EPERM, EXDEV, ENOTSUP, EMLINK):
        the link only saves time, so any failure falls back to the plain rename."""
        try:
            if not stat.S_ISREG(os.lstat(final).st_mode):
                return None
            kept = replaced_name(final)
            self.ops.link(final, kept)
        except (OSError, NotImplementedError):  # NotImplementedError: no linkat (Windows)
            return None
        return kept

    @property
    def has_replaced(self) -> bool:
        """Whether a commit kept an old file that :meth:`drop_replaced` has not deleted yet."""
        with self._replaced_lock:
            return bool(self._replaced)

    def drop_replaced(self) -> None:
        """Delete the old files that commits kept under hidden names (see :meth:`commit`).

        Never raises: one that cannot be deleted now is a temp file the next start removes (as
        it does after a crash before this ran). No directory fsync: a name back after a power
        loss is such a leftover too.
        """
        with self._replaced_lock:
            doomed, self._replaced = self._replaced, []
        for path in doomed:
            _unlink_if_possible(path, self.ops)

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
        folders one level down (multi-rank step folders). Old files this storage's commits kept
        for :meth:`drop_replaced` are not leftovers."""
        found = temp_files(self.root, "", scandir=self.ops.scandir)
        try:
            folders = [e.name for e in self.ops.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        for folder in folders:
            found += temp_files(self.root / folder, f"{folder}/", scandir=self.ops.scandir)
        return self._not_kept(found)

    def _not_kept(self, names: list[str]) -> list[str]:
        """``names`` (sorted) without the hidden names of old files waiting for drop_replaced."""
        with self._replaced_lock:
            kept = {self.root / name for name in names} & set(self._replaced)
        return sorted(name for name in names if self.root / name not in kept)

    def leftovers_in(self, folder: str) -> list[str]:
        """:meth:`leftovers` directly inside ``folder`` (one directory scanned)."""
        folder = folder.strip("/")
        return self._not_kept(temp_files(self.path(folder), f"{folder}/", scandir=self.ops.scandir))

    def remove_leftovers(self, names: Sequence[str]) -> None:
        self.delete(names)

    def unfinished(self, under: str = "") -> list[Unfinished]:
        """Every temp file directly inside ``under`` (a live writer's too), regular files only."""
        folder = self.path(under) if under else self.root
        prefix = f"{under.rstrip('/')}/" if under else ""
        found = []
        for entry, info in regular_temps(folder, self.ops.scandir):
            if is_replaced_name(entry.name):  # a committed file's old content, not a write
                continue
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


def _unlink_if_possible(path: Path, ops: FileOps) -> None:
    """Unlink a replaced file's hidden name; one that stays is a leftover clean-up removes."""
    with contextlib.suppress(OSError):
        ops.unlink(path)
