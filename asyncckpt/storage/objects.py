"""Keys in an fsspec filesystem: list one folder, get ranges, put, delete, upload in parts.

:class:`ObjectStore` works with any fsspec filesystem through its public synchronous API.
:class:`S3ObjectStore` speaks S3 (through s3fs's client) where the generic API falls short:
parallel multipart uploads from memory, create-only PUTs, bulk deletes that report failures,
and the listing of multipart uploads a killed writer left behind. Keys are full fsspec paths
(``bucket/run/step-….data``); nothing here knows about checkpoints or commits.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from fsspec.asyn import sync

from .base import ObjectKind
from .multipart import MultipartUpload, PartSink, StreamUpload, UploadOptions
from .retry import call_with_retry, is_transient

T = TypeVar("T")
EPOCH = datetime.fromtimestamp(0, UTC)
MAX_DELETE_BATCH = 1000  # S3's limit per DeleteObjects request
STREAM_CHUNK = 1 << 20  # a streamed GET hands its bytes over this many at a time
Pieces = Sequence[tuple[int, memoryview]]  # (object offset, buffer), in order


@dataclass(frozen=True)
class Entry:
    """One entry of a folder listing: a key (``kind="file"``) or a common prefix (``"dir"``)."""

    key: str
    kind: ObjectKind
    size: int
    modified: datetime


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload that was started and never completed nor aborted."""

    key: str
    upload_id: str
    started: datetime = EPOCH


class Scatter:
    """Copies bytes that arrive in order, from object offset ``position``, into ``pieces``."""

    def __init__(self, position: int, pieces: Pieces) -> None:
        self.position = position
        self.pieces = pieces
        self.index = 0  # the first piece not yet filled

    def write(self, chunk: bytes | memoryview) -> None:
        data = memoryview(chunk).cast("B")
        begin, self.position = self.position, self.position + len(data)
        while self.index < len(self.pieces):
            at, view = self.pieces[self.index]
            low, high = max(at, begin), min(at + len(view), self.position)
            if low < high:
                view[low - at : high - at] = data[low - begin : high - begin]
            if at + len(view) > self.position:
                return  # the rest of this piece comes with the next chunk
            self.index += 1


class ObjectStore:
    """Objects of any fsspec filesystem through its generic API (uploads stream, one at a time).

    Every call but an upload's stream is retried after transient failures (``options.retry``).
    ``streams`` says whether a ranged read goes straight into its buffers (else it is one
    ``bytes`` in between: keep ranges small).
    """

    streams = False

    def __init__(self, fs: Any, options: UploadOptions) -> None:
        self.fs = fs
        self.options = options

    def retry(self, call: Callable[[], T]) -> T:
        """``call()`` with this store's retry policy."""
        return call_with_retry(self.options.retry, call)

    def listdir(self, folder: str) -> list[Entry]:
        """Keys and sub-folders directly inside ``folder`` (one listing; a missing folder is empty).

        Raises ``NotADirectoryError`` when ``folder`` is itself an object.
        """

        def listing() -> Any:
            self.fs.invalidate_cache(folder)
            return self.fs.ls(folder, detail=True)

        try:
            infos = self.retry(listing)
        except FileNotFoundError:
            return []
        entries = [_entry(info) for info in infos]
        if len(entries) == 1 and entries[0].kind == "file" and entries[0].key.rstrip("/") == folder:
            raise NotADirectoryError(f"{folder} is an object, not a folder")
        return entries

    def get(self, key: str) -> bytes:
        """The whole object (small objects only: commit records, logs), in one GET."""
        data: bytes = self.retry(lambda: self.fs.cat_file(key, start=0))
        return data

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object (one ranged GET)."""
        data: bytes = self.retry(lambda: self.fs.cat_file(key, start=start, end=end))
        return data

    def read_into(self, key: str, start: int, end: int, pieces: Pieces) -> int:
        """Bytes ``[start, end)`` of the object (one ranged GET), copied into ``pieces``
        (``(offset, buffer)`` inside the range, in order). Returns how many bytes came (fewer
        only past the object's end)."""
        data = self.get_range(key, start, end)
        Scatter(start, pieces).write(data)
        return len(data)

    def size(self, key: str) -> int:
        """The object's size; ``FileNotFoundError`` when it is missing."""

        def info() -> Any:
            self.fs.invalidate_cache(key)
            return self.fs.info(key)

        return int(self.retry(info)["size"])

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what was there."""
        self.retry(lambda: self._put(key, data))

    def put_new(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` unless the key exists (``FileExistsError``).

        Atomic where the store has a conditional PUT; elsewhere a check, then a PUT. A retry
        that finds the key holding ``data`` (an earlier attempt landed, its reply was lost) is
        a success.
        """
        failed_before = False
        for retry in range(self.options.retry.attempts):
            try:
                self._put_new(key, data)
                return
            except FileExistsError:
                if failed_before and self.get(key) == data:
                    return
                raise
            except Exception as exc:
                if not is_transient(exc) or retry == self.options.retry.attempts - 1:
                    raise
                failed_before = True
                time.sleep(self.options.retry.delay(retry))

    def _put(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(key, data)

    def _put_new(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(key, data, mode="create")

    def delete(self, keys: Sequence[str]) -> None:
        """Remove ``keys`` in order, each after the one before it; a missing key is not an error."""
        for key in keys:
            self.retry(functools.partial(self._remove, key))
        for folder in {key.rpartition("/")[0] for key in keys}:
            self.fs.invalidate_cache(folder)

    def _remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(key)

    def upload(self, key: str) -> PartSink:
        """A sink whose bytes become the object ``key`` when it is finished."""
        return StreamUpload(self.fs, key, self.options)

    def pending_uploads(self, folder: str) -> list[PendingUpload]:
        """Unfinished multipart uploads under ``folder``, at any depth (none for a generic store)."""
        return []

    def abort(self, pending: PendingUpload) -> None:
        """Throw away an unfinished upload (nothing to do for a generic store)."""


class S3ObjectStore(ObjectStore):
    """S3 through s3fs: parallel part uploads, conditional PUTs, checked bulk deletes, ranged
    GETs streamed straight into their buffers."""

    streams = True

    def call(self, method: str, **kwargs: Any) -> Any:
        """One S3 API call on s3fs's event loop (from any thread)."""
        return sync(self.fs.loop, self.fs._call_s3, method, **kwargs)

    def split(self, key: str) -> tuple[str, str]:
        """``bucket/a/b`` → (``bucket``, ``a/b``)."""
        bucket, _, path = key.partition("/")
        return bucket, path

    def read_into(self, key: str, start: int, end: int, pieces: Pieces) -> int:
        """One ranged GET whose body is copied into ``pieces`` as it arrives, a MiB at a time:
        no ``bytes`` of the whole range, whatever its size. A retry starts the range over."""
        bucket, path = self.split(key)

        async def stream() -> int:
            reply = await self.fs._call_s3(
                "get_object", Bucket=bucket, Key=path, Range=f"bytes={start}-{end - 1}"
            )
            body = reply["Body"]
            scatter = Scatter(start, pieces)
            try:
                while chunk := await body.read(STREAM_CHUNK):
                    scatter.write(chunk)
            finally:
                body.close()
            return scatter.position - start

        if end <= start:
            return 0
        count: int = self.retry(lambda: sync(self.fs.loop, stream))
        return count

    def _put(self, key: str, data: bytes) -> None:
        bucket, path = self.split(key)
        self.call("put_object", Bucket=bucket, Key=path, Body=data)
        self.fs.invalidate_cache(key)

    def _put_new(self, key: str, data: bytes) -> None:
        bucket, path = self.split(key)
        # If-None-Match: * makes S3 refuse the PUT (412, FileExistsError) when the key exists.
        self.call("put_object", Bucket=bucket, Key=path, Body=data, IfNoneMatch="*")
        self.fs.invalidate_cache(key)

    def delete(self, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), MAX_DELETE_BATCH):
            self._delete_batch(keys[start : start + MAX_DELETE_BATCH])

    def _delete_batch(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        bucket = self.split(keys[0])[0]
        objects = [{"Key": self.split(key)[1]} for key in keys]
        reply = self.retry(
            lambda: self.call("delete_objects", Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
        )
        for key in keys:
            self.fs.invalidate_cache(key.rpartition("/")[0])
        failed = reply.get("Errors") or []
        if failed:
            first = failed[0]
            raise OSError(
                f"{len(failed)} of {len(keys)} deletes failed, first {first.get('Key')}: "
                f"{first.get('Code')} {first.get('Message')}"
            )

    def upload(self, key: str) -> PartSink:
        return MultipartUpload(self, key, self.options)

    def pending_uploads(self, folder: str) -> list[PendingUpload]:
        bucket, path = self.split(folder)
        prefix = f"{path}/" if path else ""
        found: list[PendingUpload] = []
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        while True:
            reply = self.retry(lambda: self.call("list_multipart_uploads", **kwargs))
            for upload in reply.get("Uploads") or []:
                started = _modified({"LastModified": upload.get("Initiated")})
                found.append(PendingUpload(f"{bucket}/{upload['Key']}", upload["UploadId"], started))
            if not reply.get("IsTruncated"):
                return found
            kwargs["KeyMarker"] = reply.get("NextKeyMarker")
            kwargs["UploadIdMarker"] = reply.get("NextUploadIdMarker")

    def abort(self, pending: PendingUpload) -> None:
        bucket, path = self.split(pending.key)
        with contextlib.suppress(FileNotFoundError):  # NoSuchUpload: already gone
            self.retry(
                lambda: self.call(
                    "abort_multipart_upload", Bucket=bucket, Key=path, UploadId=pending.upload_id
                )
            )


def object_store(fs: Any, options: UploadOptions) -> ObjectStore:
    """The store for ``fs``: S3-specific when it is s3fs, generic otherwise."""
    if hasattr(fs, "_call_s3") and hasattr(fs, "loop"):
        return S3ObjectStore(fs, options)
    return ObjectStore(fs, options)


def _entry(info: dict[str, Any]) -> Entry:
    kind: ObjectKind = "dir" if info.get("type") == "directory" else "file"
    size = int(info.get("size") or 0) if kind == "file" else 0
    return Entry(str(info["name"]).rstrip("/"), kind, size, _modified(info))


def _modified(info: dict[str, Any]) -> datetime:
    for field in ("LastModified", "mtime", "created", "last_modified", "updated"):
        value = info.get(field)
        if isinstance(value, datetime):
            return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, UTC)
    return EPOCH
