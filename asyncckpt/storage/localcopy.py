"""A remote storage that keeps the newest committed checkpoint on local disk as well.

One encoding feeds both: the body's bytes go to the local temp file and to the upload at once
(:class:`_Tee`), so the local copy costs no second serialization and no read-back. The remote
commit is the commit; the local file is renamed into place after it, and older local copies
are removed. The local copy is a cache: when it cannot be written the save goes on remotely
and the failure is only reported (``notify``).

Opening a name prefers the local file when it matches the remote commit record: the same
size, and the CRC32C of every upload part the record lists. Anything else (a copy of an older
version, a damaged or truncated file, none at all) is ignored and the object is read remotely.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c

from ..errors import CheckpointWriteError, UsageError
from .base import Body, ReadHandle, Sink, Storage, StoredObject, Unfinished, Written
from .paths import is_url
from .posix import OS, FileOps, PosixStorage

# Event names (re-exported by asyncckpt.events; defined here so storage needs nothing above it).
LOCAL_COPY_USED = "checkpoint.local_copy.used"
LOCAL_COPY_IGNORED = "checkpoint.local_copy.ignored"
LOCAL_COPY_FAILED = "checkpoint.local_copy.failed"

LOCAL_MARK = "local-copy:"  # in front of the local copy's leftovers, among the remote's
CHECK_CHUNK = 8 << 20

Notify = Callable[..., None]  # notify(event, **fields)


def open_run_storage(
    directory: str | os.PathLike[str] | Storage,
    *,
    storage_options: dict[str, Any] | None = None,
    local_copy: str | os.PathLike[str] | None = None,
    ops: FileOps = OS,
    notify: Notify | None = None,
) -> Storage:
    """The storage of a checkpointer's run: ``directory``'s, with a local copy when asked.

    Raises :class:`asyncckpt.UsageError` for ``local_copy`` with a local ``directory``, and
    what :func:`~asyncckpt.storage.open_storage` raises.
    """
    from . import open_storage

    remote = directory.location if isinstance(directory, Storage) else directory
    if local_copy is not None and (isinstance(directory, PosixStorage) or not is_url(remote)):
        raise UsageError("local_copy= is for a remote directory (a URL), not a local one", path=remote)
    storage = open_storage(directory, storage_options=storage_options, ops=ops)
    if local_copy is None:
        return storage
    return LocalCopyStorage(storage, PosixStorage(Path(local_copy)), notify=notify)


@dataclass(frozen=True)
class _Pair:
    remote: Written
    local: Written | None


class LocalCopyStorage(Storage):
    """``remote`` (the truth) plus a copy of the newest committed object in ``local``.

    ``notify(event, **fields)`` hears when the local copy is used, ignored (and why) or could
    not be written; it never fails a save.
    """

    def __init__(self, remote: Storage, local: PosixStorage, *, notify: Notify | None = None) -> None:
        self.remote = remote
        self.local = local
        self.location = remote.location
        self.notify: Notify = notify or (lambda event, **fields: None)

    def where(self, name: str) -> str:
        if name.startswith(LOCAL_MARK):
            return self.local.where(name.removeprefix(LOCAL_MARK))
        return self.remote.where(name)

    # ------------------------------------------------------------------ writing

    def write(self, name: str, body: Body) -> Written:
        tee = _Tee()
        local: list[Written] = []

        def both(remote_sink: Sink) -> int:
            tee.remote = remote_sink

            def teed(local_sink: Sink) -> int:
                tee.local = local_sink
                try:
                    tee.nbytes = body(tee)
                except BaseException as exc:  # the body's or the upload's failure, not the local file's
                    raise _Carried(exc) from None
                return tee.nbytes

            try:
                local.append(self.local.write(name, teed))
            except _Carried as carried:
                raise carried.error from None
            except CheckpointWriteError as exc:  # the local file alone failed: the upload goes on
                tee.local_error = exc
                if tee.local is None:  # no temp file could be created: the body has not run yet
                    return body(remote_sink)
            assert tee.nbytes is not None
            return tee.nbytes

        try:
            remote = self.remote.write(name, both)
        except BaseException:
            for written in local:
                self.local.discard(written)
            raise
        copy = local[0] if local and tee.local_error is None else None
        if local and copy is None:
            self.local.discard(local[0])
        if tee.local_error is not None:
            self._copy_failed(name, tee.local_error)
        return Written(name, remote.nbytes, remote.write_s, remote.fsync_s, _Pair(remote, copy))

    def _copy_failed(self, name: str, error: BaseException | None) -> None:
        self.notify(LOCAL_COPY_FAILED, path=self.local.where(name), error=str(error))

    def open_written(self, written: Written) -> ReadHandle:
        pair: _Pair = written.token
        return self.remote.open_written(pair.remote)

    def commit(self, written: Written) -> float:
        pair: _Pair = written.token
        try:
            publish_s = self.remote.commit(pair.remote)
        except BaseException:
            if pair.local is not None:
                self.local.discard(pair.local)
            raise
        if pair.local is not None:
            self._keep_only(pair.local)
        return publish_s

    def _keep_only(self, written: Written) -> None:
        """Publish the local copy and remove every other local checkpoint file."""
        try:
            self.local.commit(written)
            older = [o.name for o in self.local.ls() if o.kind == "file" and o.name != written.name]
            self.local.delete([n for n in older if n.endswith(".ckpt")])
        except (OSError, CheckpointWriteError) as exc:
            self._copy_failed(written.name, exc)

    def drop_replaced(self) -> None:
        self.local.drop_replaced()  # a remote commit replaces nothing it keeps

    def discard(self, written: Written) -> None:
        pair: _Pair = written.token
        self.remote.discard(pair.remote)
        if pair.local is not None:
            self.local.discard(pair.local)

    # ------------------------------------------------------------------ reading

    def open(self, name: str) -> ReadHandle:
        """The local copy of ``name`` when it matches the remote commit record, else the
        remote object. Raises what the remote's ``open`` raises."""
        remote = self.remote.open(name)
        record: Any = getattr(remote, "record", None)
        if record is None:
            return remote
        try:
            local = self.local.open(name)
        except OSError:
            return remote
        reason = _mismatch(local, record)
        if reason is None:
            remote.close()
            self.notify(LOCAL_COPY_USED, path=self.local.where(name))
            return local
        local.close()
        self.notify(LOCAL_COPY_IGNORED, path=self.local.where(name), reason=reason)
        return remote

    def ls(self, under: str = "") -> list[StoredObject]:
        return self.remote.ls(under)

    def unfinished(self, under: str = "") -> list[Unfinished]:
        return self.remote.unfinished(under)

    def delete(self, names: Sequence[str]) -> None:
        self.remote.delete(names)
        with contextlib.suppress(OSError):  # a stale local copy is ignored when it is read
            self.local.delete(names)

    def leftovers(self) -> list[str]:
        return self.remote.leftovers() + [LOCAL_MARK + name for name in self.local.leftovers()]

    def leftovers_in(self, folder: str) -> list[str]:
        local = [LOCAL_MARK + name for name in self.local.leftovers_in(folder)]
        return self.remote.leftovers_in(folder) + local

    def remove_leftovers(self, names: Sequence[str]) -> None:
        self.remote.remove_leftovers([n for n in names if not n.startswith(LOCAL_MARK)])
        local = [n.removeprefix(LOCAL_MARK) for n in names if n.startswith(LOCAL_MARK)]
        self.local.remove_leftovers(local)

    def append_line(self, name: str, line: str) -> None:
        self.remote.append_line(name, line)


def _mismatch(local: ReadHandle, record: Any) -> str | None:
    """Why the local file is not the object ``record`` commits (None: it is)."""
    if local.size != record.size:
        return f"{local.size} bytes, the remote commit says {record.size}"
    buffer = memoryview(bytearray(min(CHECK_CHUNK, max(local.size, 1))))
    offset = 0
    for number, (size, expected) in enumerate(record.parts, start=1):
        crc = 0
        for start in range(0, size, len(buffer)):
            chunk = buffer[: min(len(buffer), size - start)]
            try:
                got = local.read_at(offset + start, chunk)
            except OSError as exc:
                return f"cannot be read ({exc})"
            if got != len(chunk):
                return "shorter than it was"
            crc = crc32c.crc32c(chunk, crc)
        if crc != expected:
            return f"part {number} differs from the remote commit (crc32c {crc:08x}, expected {expected:08x})"
        offset += size
    return None


class _Carried(Exception):
    """Carries the body's (or the upload's) failure through the local write, which would report
    an ``OSError`` as its own."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Tee:
    """Writes each piece to the local file, then to the upload. A local failure stops the local
    copy and nothing else; an upload failure fails the write."""

    def __init__(self) -> None:
        self.local: Sink | None = None
        self.remote: Sink | None = None
        self.local_error: BaseException | None = None
        self.nbytes: int | None = None

    def write(self, data: memoryview | bytes) -> None:
        if self.local is not None and self.local_error is None:
            try:
                self.local.write(data)
            except OSError as exc:
                self.local_error = exc
        assert self.remote is not None
        self.remote.write(data)
