"""Storage on object stores and other fsspec filesystems: a commit that needs no rename.

Object stores have no rename, no fsync and no directories; an object becomes visible, whole,
when its PUT (or multipart completion) succeeds. :class:`FsspecStorage` makes a write durable
by uploading the bytes to a data object of their own, and commits it by writing a small
checksummed commit object last (see :mod:`.records` for the names, docs/REMOTE.md for the
guarantees). Listing is one LIST of the folder; a name is listed only when a commit object and
its data object are both there.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import fsspec

from .._version import __version__
from ..errors import CheckpointWriteError, CorruptedCheckpointError, UsageError
from .base import Body, ParallelReads, ReadHandle, Storage, StoredObject, Unfinished, Written
from .multipart import MIB, PartSink, Uploaded, UploadOptions
from .objects import Entry, ObjectStore, PendingUpload, object_store
from .records import (
    COMMIT_SUFFIX,
    CommitRecord,
    Versions,
    commit_name,
    data_name,
    group,
    new_token,
    owner_is_gone,
    parse_versioned,
)
from .remotefile import RemoteFile, parallel_reads
from .retry import RetryPolicy

UPLOAD_MARK = "?uploadId="  # in a leftover's name: an unfinished multipart upload of that key
REUSE_LISTING_S = 10.0  # open() may take a name's version from a listing of its folder this recent


class FsspecStorage(Storage):
    """Checkpoint objects under a URL of any fsspec filesystem (``s3://bucket/run``).

    ``storage_options`` go to fsspec (credentials, ``endpoint_url``, …). ``part_size`` and
    ``concurrency`` shape uploads (at most ``(concurrency + 1) * part_size`` bytes buffered
    per object); ``retry`` says how transient errors are retried; ``server_checksums=False``
    stops sending each part's CRC32C for stores that reject checksum headers.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        part_size: int = 8 * MIB,
        concurrency: int = 8,
        retry: RetryPolicy | None = None,
        server_checksums: bool = True,
    ) -> None:
        if part_size < 1 or concurrency < 1:
            raise UsageError(f"part_size and concurrency must be positive, got {part_size}, {concurrency}")
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.fs = fs
        self.root = str(root).rstrip("/")
        self.location = url.rstrip("/")
        self.options = UploadOptions(part_size, concurrency, retry or RetryPolicy(), server_checksums)
        self.store: ObjectStore = object_store(fs, self.options)
        self._listed: tuple[str, float, dict[str, Versions]] = ("", 0.0, {})  # the last ls()

    def key(self, name: str) -> str:
        """The fsspec path of the object ``name`` (relative to the root)."""
        return f"{self.root}/{name}" if name else self.root

    def write(self, name: str, body: Body) -> Written:
        _check_name(name)
        key = self.key(data_name(name, new_token()))
        started = time.perf_counter()
        try:
            sink = self.store.upload(key)
        except Exception as exc:
            raise CheckpointWriteError(f"the upload could not start ({exc})", path=self.where(name)) from exc
        guarded = _GuardedSink(sink)
        try:
            body(guarded)
            bytes_sent = time.perf_counter()
            uploaded = guarded.finish()
        except BaseException as exc:
            sink.abort()
            self._remove_quietly([key])
            if exc is guarded.failure or isinstance(exc, OSError):
                raise CheckpointWriteError(
                    f"the upload failed ({exc}); nothing was committed and the previous object is intact",
                    path=self.where(name),
                ) from exc
            raise
        durable = time.perf_counter()
        return Written(name, uploaded.nbytes, bytes_sent - started, durable - bytes_sent, uploaded)

    def open_written(self, written: Written) -> ReadHandle:
        uploaded: Uploaded = written.token
        return RemoteFile(
            self.store, uploaded.key, written.name, uploaded.nbytes, self._reads(uploaded.nbytes)
        )

    def _reads(self, size: int) -> ParallelReads:
        return parallel_reads(size, streams=self.store.streams, concurrency=self.options.concurrency)

    def commit(self, written: Written) -> float:
        uploaded: Uploaded = written.token
        parsed = parse_versioned(uploaded.key.rpartition("/")[2])
        assert parsed is not None, uploaded.key
        token = parsed[1]
        record = CommitRecord(
            name=written.name,
            token=token,
            size=uploaded.nbytes,
            parts=uploaded.parts,
            etag=uploaded.etag,
            committed_at=datetime.now(UTC).isoformat(),
            writer=__version__,
        ).encode()
        started = time.perf_counter()
        key = self.key(commit_name(written.name, token))
        try:
            self.store.put_new(key, record)
        except Exception as exc:
            if not self._holds(key, record):
                self.discard(written)
                raise CheckpointWriteError(
                    f"the commit object could not be written ({exc}); nothing was published",
                    path=self.where(written.name),
                ) from exc
        publish_s = time.perf_counter() - started
        self._listed = ("", 0.0, {})  # a listing from before is stale
        self._supersede(written.name, token)
        return publish_s

    def _holds(self, key: str, data: bytes) -> bool:
        """Whether ``key`` holds ``data`` (a PUT whose reply was lost may have landed)."""
        try:
            return self.store.get(key) == data
        except Exception:
            return False

    def _supersede(self, name: str, token: str) -> None:
        """Remove the older committed versions of ``name``, each commit object before its data."""
        try:
            versions = self._versions(name)
            older = [t for t in versions.commits if t < token]
            self.store.delete([versions.commits[t].key for t in older])
            self.store.delete([versions.data[t].key for t in older if t in versions.data])
        except Exception:  # noqa: S110 - the commit is in; the old versions are shadowed by it
            pass  # and leftovers() lists them: the next start removes them

    def discard(self, written: Written) -> None:
        uploaded: Uploaded = written.token
        self._remove_quietly([uploaded.key])

    def _remove_quietly(self, keys: list[str]) -> None:
        # After a failure the data object, if it is still there, is a leftover: never listed,
        # removed at the next start. The failure being reported is the one that matters.
        with contextlib.suppress(Exception):
            self.store.delete(keys)

    def open(self, name: str) -> RemoteFile:
        """Open the newest committed version of ``name``: a LIST of its folder, then a GET of
        the version's commit object. The last listing :meth:`ls` made, when it is of the folder
        and within ``REUSE_LISTING_S`` (a load lists, then opens), stands in for the LIST when the
        version it names is still committed: its commit object is read either way, and one that
        is gone (superseded or deleted since) makes the open list the folder again."""
        folder, _, base = name.rpartition("/")
        listed_folder, when, names = self._listed
        listed = names.get(base) if listed_folder == folder else None
        if listed is not None and listed.current() and time.monotonic() - when <= REUSE_LISTING_S:
            with contextlib.suppress(FileNotFoundError):
                return self._open_version(name, listed)
        return self._open_version(name, self._versions(name))

    def _open_version(self, name: str, versions: Versions) -> RemoteFile:
        token = versions.current()
        if token is None:
            if versions.plain is not None:
                plain = versions.plain
                return RemoteFile(self.store, plain.key, name, plain.size, self._reads(plain.size))
            raise FileNotFoundError(errno.ENOENT, "no committed object of this name", self.where(name))
        data = versions.data[token]
        where = self.where(commit_name(name, token))
        record = CommitRecord.decode(self.store.get(versions.commits[token].key), path=where)
        if record.name != name or record.token != token:
            raise CorruptedCheckpointError(
                f"commit object names {record.name!r} (token {record.token}), not this object", path=where
            )
        if record.size != data.size:
            raise CorruptedCheckpointError(
                f"the data object has {data.size} bytes, its commit object says {record.size}", path=where
            )
        return RemoteFile(self.store, data.key, name, record.size, self._reads(record.size), record)

    def _versions(self, name: str) -> Versions:
        folder, _, base = name.rpartition("/")
        names, _ = group(self.store.listdir(self.key(folder)))
        return names.get(base, Versions())

    def ls(self, under: str = "") -> list[StoredObject]:
        folder = under.strip("/")
        prefix = f"{folder}/" if folder else ""
        started = time.monotonic()
        names, folders = group(self.store.listdir(self.key(folder)))
        self._listed = (folder, started, names)  # for open(), see there
        found = [StoredObject(prefix + _base(f), "dir", 0, f.modified) for f in folders]
        for name, versions in names.items():
            token = versions.current()
            if token is not None:
                data, commit = versions.data[token], versions.commits[token]
                found.append(StoredObject(prefix + name, "file", data.size, commit.modified))
            elif versions.plain is not None:
                plain = versions.plain
                found.append(StoredObject(prefix + name, "file", plain.size, plain.modified))
        return sorted(found, key=lambda o: o.name)

    def delete(self, names: Sequence[str]) -> None:
        by_folder: dict[str, list[str]] = {}
        for name in names:
            folder, _, base = name.rpartition("/")
            by_folder.setdefault(folder, []).append(base)
        for folder, bases in sorted(by_folder.items()):
            listed, _ = group(self.store.listdir(self.key(folder)))
            chosen = [listed[b] for b in bases if b in listed]
            # Every commit object goes first: from then on no name is committed, and a crash
            # leaves data objects without commits (leftovers), never a half checkpoint.
            self.store.delete([e.key for v in chosen for e in v.commits.values()])
            self.store.delete([e.key for v in chosen for e in _data_and_plain(v)])

    def leftovers(self) -> list[str]:
        """Stale commit and data objects, and unfinished uploads, that no live writer owns, in
        the root and in its folders one level down (multi-rank step folders).

        A writer is live when it runs on this host, or ran elsewhere within ``STALE_TEMP_S``
        (as for POSIX temp files). Names of unfinished multipart uploads end in
        ``?uploadId=<id>``. One LIST per folder, one listing of the unfinished uploads.
        """
        now = time.time()
        names, folders = group(self.store.listdir(self.root))
        found = _stale(names, "", now=now)
        for folder in folders:
            found += _stale(group(self.store.listdir(folder.key))[0], f"{_base(folder)}/", now=now)
        uploads = self._pending("")
        found += [_upload_name(name, p) for name, p in uploads if name.count("/") <= 1 and _gone(p, now)]
        return sorted(found)

    def leftovers_in(self, folder: str) -> list[str]:
        """:meth:`leftovers` directly inside ``folder``: one LIST, one listing of the uploads."""
        folder = folder.strip("/")
        now = time.time()
        names, _ = group(self.store.listdir(self.key(folder)))
        found = _stale(names, f"{folder}/", now=now)
        uploads = self._pending(folder)
        found += [_upload_name(n, p) for n, p in uploads if _folder_of(n) == folder and _gone(p, now)]
        return sorted(found)

    def _pending(self, folder: str) -> list[tuple[str, PendingUpload]]:
        """Unfinished uploads under ``folder`` at any depth, each with its key relative to the root."""
        start = len(self.root) + 1
        return [(p.key[start:], p) for p in self.store.pending_uploads(self.key(folder))]

    def remove_leftovers(self, names: Sequence[str]) -> None:
        uploads = [n for n in names if UPLOAD_MARK in n]
        keys = [self.key(n) for n in names if UPLOAD_MARK not in n]
        self.store.delete([k for k in keys if k.endswith(COMMIT_SUFFIX)])  # commits before data
        self.store.delete([k for k in keys if not k.endswith(COMMIT_SUFFIX)])
        for name in uploads:
            key, _, upload_id = name.partition(UPLOAD_MARK)
            self.store.abort(PendingUpload(self.key(key), upload_id))

    def unfinished(self, under: str = "") -> list[Unfinished]:
        """Data objects newer than their name's committed version and without a commit object
        (an upload in progress, or one that crashed before its commit), and unfinished
        multipart uploads (``<key>?uploadId=<id>``), directly inside ``under``."""
        folder = under.strip("/")
        prefix = f"{folder}/" if folder else ""
        names, _ = group(self.store.listdir(self.key(folder)))
        found = []
        for name, versions in names.items():
            current = versions.current() or ""
            for token, entry in versions.data.items():
                if token > current and token not in versions.commits:
                    found.append(Unfinished(prefix + name, prefix + _base(entry), entry.size, entry.modified))
        for relative, pending in self._pending(folder):
            if _folder_of(relative) != folder:
                continue
            parsed = parse_versioned(_base_key(relative))
            name = prefix + (parsed[0] if parsed else _base_key(relative))
            found.append(Unfinished(name, _upload_name(relative, pending), 0, pending.started))
        return sorted(found, key=lambda u: u.label)

    def append_line(self, name: str, line: str) -> None:
        """Append by rewriting the whole object (object stores cannot append); not atomic
        against another process appending to the same object at the same time."""
        key = self.key(name)
        try:
            old = self.store.get(key)
        except FileNotFoundError:
            old = b""
        self.store.put(key, old + (line if line.endswith("\n") else line + "\n").encode())


class _GuardedSink:
    """Passes writes to an upload and remembers the upload's own failure (vs. the body's)."""

    def __init__(self, sink: PartSink) -> None:
        self.sink = sink
        self.failure: BaseException | None = None

    def write(self, data: memoryview | bytes) -> None:
        try:
            self.sink.write(data)
        except Exception as exc:
            self.failure = exc
            raise

    def finish(self) -> Uploaded:
        try:
            return self.sink.finish()
        except Exception as exc:
            self.failure = exc
            raise


def _check_name(name: str) -> None:
    base = name.rpartition("/")[2]
    if not base or name.startswith("/") or parse_versioned(base) is not None or UPLOAD_MARK in name:
        raise UsageError(f"{name!r} cannot name an object (reserved or empty)")


def _base(entry: Entry) -> str:
    return _base_key(entry.key)


def _base_key(key: str) -> str:
    return key.rpartition("/")[2]


def _stale(names: dict[str, Versions], prefix: str, *, now: float) -> list[str]:
    """The leftovers of one folder's grouped listing (see :meth:`Versions.leftovers`), by name."""
    return [prefix + _base(entry) for versions in names.values() for entry in versions.leftovers(now=now)]


def _gone(pending: PendingUpload, now: float) -> bool:
    """Whether no live writer can finish ``pending`` (an upload not named like ours has none)."""
    parsed = parse_versioned(_base_key(pending.key))
    return parsed is None or owner_is_gone(parsed[1], pending.started, now=now)


def _upload_name(relative: str, pending: PendingUpload) -> str:
    return f"{relative}{UPLOAD_MARK}{pending.upload_id}"


def _folder_of(relative: str) -> str:
    return relative.rpartition("/")[0]


def _data_and_plain(versions: Versions) -> list[Entry]:
    data = [versions.data[t] for t in versions.commits if t in versions.data]
    return data + ([versions.plain] if versions.plain is not None else [])
