"""Uploads from a body's sink: parallel S3 multipart parts with bounded memory, or one stream.

The body (the format's encoder) writes its bytes in order; :class:`MultipartUpload` copies them
into part buffers and uploads full parts from a small thread pool while the body goes on. At
most ``concurrency`` parts are in flight and one more is filling, so an upload holds at most
``(concurrency + 1) * part_size`` bytes whatever the object's size; the body's own buffers (the
staging buffers) are the only full copy of the checkpoint. Each part is checksummed (CRC32C) in
its upload thread and sent with that checksum, so the store verifies every part it receives.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import crc32c

from .retry import RetryPolicy, call_with_retry

if TYPE_CHECKING:
    from .objects import S3ObjectStore

MIB = 1 << 20
MAX_PARTS = 10_000  # S3's limit per multipart upload
PART_GROWTH_EVERY = 2_000  # part size doubles every this many parts (up to 16x), so that the
MAX_PART_GROWTH = 4  # 10,000-part limit is ~31 TiB-equivalent of 8 MiB parts, not 78 GiB


@dataclass(frozen=True)
class UploadOptions:
    """How objects are uploaded.

    ``part_size``: bytes per part (S3 needs at least 5 MiB for every part but the last);
    ``concurrency``: parts in flight at once; ``server_checksums``: send each part's CRC32C for
    the store to verify (turn off for an S3-compatible store that rejects checksum headers).
    """

    part_size: int = 8 * MIB
    concurrency: int = 8
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    server_checksums: bool = True

    def part_size_for(self, number: int) -> int:
        """The size of part ``number`` (1-based)."""
        return self.part_size << min((number - 1) // PART_GROWTH_EVERY, MAX_PART_GROWTH)


@dataclass(frozen=True)
class Uploaded:
    """An object made durable: its key, size, each part's (size, CRC32C), the store's ETag."""

    key: str
    nbytes: int
    parts: tuple[tuple[int, int], ...]
    etag: str | None
    buffers: int = 0  # part buffers allocated (the memory bound, for tests and diagnostics)


class PartSink(Protocol):
    """A sink that becomes one object when finished, or nothing when aborted."""

    nbytes: int

    def write(self, data: memoryview | bytes) -> None: ...

    def finish(self) -> Uploaded: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class _Part:
    number: int
    size: int
    crc: int
    etag: str


class MultipartUpload:
    """An S3 multipart upload fed by a sink; one PUT when the object is smaller than a part."""

    def __init__(self, store: S3ObjectStore, key: str, options: UploadOptions) -> None:
        self.store = store
        self.key = key
        self.options = options
        self.bucket, self.path = store.split(key)
        self.nbytes = 0
        self.buffers = 0
        self._free: list[bytearray] = []
        self._lock = threading.Lock()
        self._buffer = self._take(options.part_size_for(1))
        self._filled = 0
        self._slots = threading.BoundedSemaphore(options.concurrency)
        self._pool = ThreadPoolExecutor(options.concurrency, thread_name_prefix="asyncckpt-upload")
        self._parts: list[Future[_Part]] = []
        self._upload_id: str | None = None
        self._failure: BaseException | None = None

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            count = min(len(self._buffer) - self._filled, len(view))
            self._buffer[self._filled : self._filled + count] = view[:count]
            self._filled += count
            self.nbytes += count
            view = view[count:]
            if self._filled == len(self._buffer):
                self._send()

    def _send(self) -> None:
        self._raise_failure()
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise OSError(errno.EFBIG, f"more than {MAX_PARTS} parts: raise part_size")
        if self._upload_id is None:
            self._upload_id = self._start()
        self._slots.acquire()  # blocks while `concurrency` parts are in flight
        buffer, filled = self._buffer, self._filled
        try:
            self._raise_failure()  # a part failed while this one waited for a slot
            self._parts.append(self._pool.submit(self._upload_part, number, buffer, filled))
        except BaseException:
            self._slots.release()
            raise
        self._buffer = self._take(self.options.part_size_for(number + 1))
        self._filled = 0

    def _start(self) -> str:
        extra = {"ChecksumAlgorithm": "CRC32C"} if self.options.server_checksums else {}
        reply = call_with_retry(
            self.options.retry,
            lambda: self.store.call("create_multipart_upload", Bucket=self.bucket, Key=self.path, **extra),
        )
        return str(reply["UploadId"])

    def _upload_part(self, number: int, buffer: bytearray, filled: int) -> _Part:
        try:
            self._raise_failure()
            body = buffer if filled == len(buffer) else bytes(memoryview(buffer)[:filled])
            crc = crc32c.crc32c(body)

            def upload() -> Any:
                return self.store.call(
                    "upload_part",
                    Bucket=self.bucket,
                    Key=self.path,
                    UploadId=self._upload_id,
                    PartNumber=number,
                    Body=body,
                    **self._checksum(crc),
                )

            reply = call_with_retry(self.options.retry, upload)
            return _Part(number, filled, crc, str(reply["ETag"]))
        except BaseException as exc:
            if self._failure is None:
                self._failure = exc
            raise
        finally:
            self._give_back(buffer)
            self._slots.release()

    def _checksum(self, crc: int) -> dict[str, str]:
        if not self.options.server_checksums:
            return {}
        return {"ChecksumCRC32C": base64.b64encode(crc.to_bytes(4, "big")).decode()}

    def finish(self) -> Uploaded:
        if self._upload_id is None:
            return self._put_whole()
        if self._filled:
            self._send()
        parts = [future.result() for future in self._parts]  # the first failure, if any
        etag = self._complete(parts)
        self._pool.shutdown()
        return Uploaded(self.key, self.nbytes, tuple((p.size, p.crc) for p in parts), etag, self.buffers)

    def _put_whole(self) -> Uploaded:
        data = bytes(memoryview(self._buffer)[: self._filled])
        crc = crc32c.crc32c(data)
        reply = call_with_retry(
            self.options.retry,
            lambda: self.store.call(
                "put_object", Bucket=self.bucket, Key=self.path, Body=data, **self._checksum(crc)
            ),
        )
        self._pool.shutdown()
        return Uploaded(self.key, self.nbytes, ((self.nbytes, crc),), reply.get("ETag"), self.buffers)

    def _complete(self, parts: list[_Part]) -> str | None:
        listing = [{"PartNumber": p.number, "ETag": p.etag, **self._checksum(p.crc)} for p in parts]
        tries = 0

        def complete() -> Any:
            nonlocal tries
            tries += 1
            try:
                return self.store.call(
                    "complete_multipart_upload",
                    Bucket=self.bucket,
                    Key=self.path,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": listing},
                )
            except FileNotFoundError:
                # NoSuchUpload after a lost reply: the earlier attempt completed the upload.
                if tries > 1 and self.store.size(self.key) == self.nbytes:
                    return {}
                raise

        reply = call_with_retry(self.options.retry, complete)
        etag = reply.get("ETag")
        return None if etag is None else str(etag)

    def abort(self) -> None:
        if self._failure is None:
            self._failure = OSError(errno.ECANCELED, "the upload was aborted")
        for future in self._parts:
            future.cancel()
        self._pool.shutdown(wait=True)
        if self._upload_id is None:
            return
        bucket, path, upload_id = self.bucket, self.path, self._upload_id
        # A failure here leaves the upload pending: leftovers() lists it, the next start aborts it.
        with contextlib.suppress(Exception):
            call_with_retry(
                self.options.retry,
                lambda: self.store.call(
                    "abort_multipart_upload", Bucket=bucket, Key=path, UploadId=upload_id
                ),
            )

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _take(self, size: int) -> bytearray:
        with self._lock:
            while self._free:
                buffer = self._free.pop()
                if len(buffer) == size:
                    return buffer
        self.buffers += 1
        return bytearray(size)

    def _give_back(self, buffer: bytearray) -> None:
        with self._lock:
            self._free.append(buffer)


class StreamUpload:
    """An upload through the filesystem's own writable file (any fsspec store); not retried."""

    def __init__(self, fs: Any, key: str, options: UploadOptions) -> None:
        self.key = key
        self.nbytes = 0
        self._part_size = options.part_size
        self._parts: list[tuple[int, int]] = []
        self._crc = 0
        self._in_part = 0
        self._file = fs.open(key, "wb", block_size=options.part_size)

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        self._checksum(view)
        self._file.write(view)
        self.nbytes += len(view)

    def _checksum(self, view: memoryview) -> None:
        while len(view):
            count = min(self._part_size - self._in_part, len(view))
            self._crc = crc32c.crc32c(view[:count], self._crc)
            self._in_part += count
            view = view[count:]
            if self._in_part == self._part_size:
                self._parts.append((self._in_part, self._crc))
                self._crc = self._in_part = 0

    def finish(self) -> Uploaded:
        self._file.close()
        if self._in_part or not self._parts:
            self._parts.append((self._in_part, self._crc))
        return Uploaded(self.key, self.nbytes, tuple(self._parts), None)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._file.discard()
        # An fsspec file finalizes (uploads what it has) when closed or collected: mark it closed.
        with contextlib.suppress(Exception):
            self._file.closed = True
