"""The Storage contract, run against every implementation: POSIX, fsspec (generic, in memory)
and fsspec on S3 (a moto server). What one promises, all keep."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from asyncckpt.errors import CheckpointWriteError
from asyncckpt.storage import Body, PosixStorage, Sink, Storage

pytestmark = pytest.mark.timeout(60)

DATA = os.urandom(300_000)  # several 64 KiB parts on S3
OTHER = os.urandom(70_000)


def body_of(data: bytes, *, chunk: int = 7_001) -> Body:
    """A body that writes ``data`` in odd-sized pieces, as the encoder does."""

    def body(sink: Sink) -> int:
        view = memoryview(data)
        for start in range(0, len(view), chunk):
            sink.write(view[start : start + chunk])
        return len(data)

    return body


def failing_body(error: BaseException, *, after: bytes = DATA) -> Body:
    def body(sink: Sink) -> int:
        sink.write(after)
        raise error

    return body


def read_all(storage: Storage, name: str) -> bytes:
    with storage.open(name) as handle:
        buffer = bytearray(handle.size)
        assert handle.read_at(0, memoryview(buffer)) == handle.size
        return bytes(buffer)


def save(storage: Storage, name: str, data: bytes) -> None:
    storage.commit(storage.write(name, body_of(data)))


@dataclass
class Backend:
    kind: str
    make: Callable[[str], Storage]  # a storage whose root is the given folder name
    put_plain: Callable[[Storage, str, bytes], None]  # an object written by something else
    folder: Callable[[Storage, str], None] = lambda storage, name: None  # POSIX needs folders made


@pytest.fixture(params=["posix", "memory", "s3", "local-copy"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "posix":

        def put_file(storage: Storage, name: str, data: bytes) -> None:
            assert isinstance(storage, PosixStorage)
            storage.path(name).parent.mkdir(parents=True, exist_ok=True)
            storage.path(name).write_bytes(data)

        def folder(storage: Storage, name: str) -> None:
            assert isinstance(storage, PosixStorage)
            storage.path(name).mkdir(parents=True, exist_ok=True)

        return Backend("posix", lambda name: PosixStorage(tmp_path / name), put_file, folder)
    if request.param == "memory":
        from asyncckpt.storage.remote import FsspecStorage

        base = request.getfixturevalue("memory_url").rpartition("/")[0]
        return Backend("memory", lambda folder: FsspecStorage(f"{base}/{folder}"), _put_object)
    if request.param == "local-copy":  # in-memory fsspec with a local copy of the newest object
        from asyncckpt.storage.localcopy import LocalCopyStorage
        from asyncckpt.storage.remote import FsspecStorage

        base = request.getfixturevalue("memory_url").rpartition("/")[0]

        def make(folder: str) -> Storage:
            return LocalCopyStorage(
                FsspecStorage(f"{base}/{folder}"), PosixStorage(tmp_path / "copy" / folder)
            )

        return Backend("local-copy", make, _put_object)
    make_s3 = request.getfixturevalue("make_s3")
    return Backend("s3", make_s3, _put_object)


def _put_object(storage: Any, name: str, data: bytes) -> None:
    storage = getattr(storage, "remote", storage)  # a local copy's remote
    storage.fs.pipe_file(storage.key(name), data)


@pytest.fixture
def storage(backend: Backend) -> Storage:
    made = backend.make("run")
    backend.folder(made, "")
    return made


def test_a_written_object_is_invisible_until_committed(storage: Storage) -> None:
    written = storage.write("step-0000000001.ckpt", body_of(DATA))

    assert written.nbytes == len(DATA)
    assert storage.ls() == []
    with pytest.raises(FileNotFoundError):
        storage.open("step-0000000001.ckpt")
    with storage.open_written(written) as handle:  # the writer verifies these bytes before committing
        buffer = bytearray(len(DATA))
        assert handle.read_at(0, memoryview(buffer)) == len(DATA) and bytes(buffer) == DATA

    storage.commit(written)

    [listed] = storage.ls()
    assert (listed.name, listed.kind, listed.size) == ("step-0000000001.ckpt", "file", len(DATA))
    assert read_all(storage, "step-0000000001.ckpt") == DATA


def test_read_at_reads_any_range_and_stops_at_the_end(storage: Storage) -> None:
    save(storage, "a.ckpt", DATA)

    with storage.open("a.ckpt") as handle:
        middle = bytearray(1000)
        assert handle.read_at(123_456, memoryview(middle)) == 1000 and middle == DATA[123_456:124_456]
        tail = bytearray(5000)
        assert handle.read_at(len(DATA) - 10, memoryview(tail)) == 10 and tail[:10] == DATA[-10:]
        assert handle.read_at(len(DATA), memoryview(tail)) == 0


def test_a_cursor_reads_like_a_file(storage: Storage) -> None:
    save(storage, "a.ckpt", DATA)

    with storage.open("a.ckpt") as handle:
        cursor = handle.cursor()
        cursor.seek(-100, os.SEEK_END)
        assert cursor.read() == DATA[-100:] and cursor.tell() == len(DATA)
        cursor.seek(10)
        assert cursor.read(20) == DATA[10:30]


def test_threads_read_one_handle_in_parallel(storage: Storage) -> None:
    save(storage, "a.ckpt", DATA)
    ranges = [(start, min(start + 17_000, len(DATA))) for start in range(0, len(DATA), 17_000)]

    with storage.open("a.ckpt") as handle:

        def read(bounds: tuple[int, int]) -> bytes:
            buffer = bytearray(bounds[1] - bounds[0])
            assert handle.read_at(bounds[0], memoryview(buffer)) == len(buffer)
            return bytes(buffer)

        with ThreadPoolExecutor(8) as pool:
            pieces = list(pool.map(read, ranges))

    assert b"".join(pieces) == DATA


def test_a_commit_replaces_the_older_object_and_not_before(storage: Storage) -> None:
    save(storage, "a.ckpt", OTHER)
    written = storage.write("a.ckpt", body_of(DATA))

    assert read_all(storage, "a.ckpt") == OTHER  # still the committed one
    storage.commit(written)

    assert read_all(storage, "a.ckpt") == DATA
    assert [o.name for o in storage.ls()] == ["a.ckpt"]
    assert storage.leftovers() == []


def test_discard_leaves_nothing(storage: Storage) -> None:
    storage.discard(storage.write("a.ckpt", body_of(DATA)))

    assert storage.ls() == [] and storage.leftovers() == []


def test_a_failed_write_raises_a_write_error_leaves_nothing_and_keeps_the_old(storage: Storage) -> None:
    save(storage, "a.ckpt", OTHER)

    with pytest.raises(CheckpointWriteError) as caught:
        storage.write("a.ckpt", failing_body(OSError(28, "No space left on device")))

    assert caught.value.path == storage.where("a.ckpt")
    assert read_all(storage, "a.ckpt") == OTHER
    assert storage.leftovers() == []


def test_a_bug_in_the_body_is_raised_as_it_is(storage: Storage) -> None:
    with pytest.raises(ValueError, match="encoder bug"):
        storage.write("a.ckpt", failing_body(ValueError("encoder bug")))

    assert storage.ls() == [] and storage.leftovers() == []


def test_folders_are_listed_as_dirs_and_their_objects_with_the_folder_prefix(
    backend: Backend, storage: Storage
) -> None:
    backend.folder(storage, "step-0000000001")
    save(storage, "step-0000000001/rank-0.ckpt", DATA[:5000])
    save(storage, "step-0000000001/rank-1.ckpt", OTHER)

    assert [(o.name, o.kind) for o in storage.ls()] == [("step-0000000001", "dir")]
    inside = storage.ls("step-0000000001")
    assert [(o.name, o.kind, o.size) for o in inside] == [
        ("step-0000000001/rank-0.ckpt", "file", 5000),
        ("step-0000000001/rank-1.ckpt", "file", len(OTHER)),
    ]
    assert read_all(storage, "step-0000000001/rank-1.ckpt") == OTHER


def test_a_missing_root_lists_as_empty(backend: Backend) -> None:
    storage = backend.make("never-written")

    assert storage.ls() == [] and storage.ls("nor/this") == [] and storage.leftovers() == []


def test_a_root_that_is_an_object_is_not_a_directory(backend: Backend) -> None:
    parent = backend.make("parent")
    backend.put_plain(parent, "rootfile", b"not a folder")

    with pytest.raises(NotADirectoryError):
        backend.make("parent/rootfile").ls()


def test_delete_removes_objects_and_ignores_missing_ones(storage: Storage) -> None:
    save(storage, "a.ckpt", DATA[:1000])
    save(storage, "b.ckpt", OTHER)

    storage.delete(["a.ckpt", "never.ckpt"])

    assert [o.name for o in storage.ls()] == ["b.ckpt"]
    with pytest.raises(FileNotFoundError):
        storage.open("a.ckpt")
    assert storage.leftovers() == []


def test_what_an_interrupted_write_left_is_a_leftover_and_nothing_else(storage: Storage) -> None:
    save(storage, "a.ckpt", OTHER)
    storage.write("b.ckpt", body_of(DATA))  # durable, never committed: this process "crashed"

    leftovers = storage.leftovers()

    assert len(leftovers) == 1 and storage.ls()[0].name == "a.ckpt" and len(storage.ls()) == 1
    storage.remove_leftovers(leftovers)
    assert storage.leftovers() == []
    assert read_all(storage, "a.ckpt") == OTHER


def test_what_an_interrupted_write_left_in_a_folder_is_a_leftover_of_that_folder(
    backend: Backend, storage: Storage
) -> None:
    backend.folder(storage, "step-0000000001")
    save(storage, "step-0000000001/rank-0.ckpt", OTHER)
    storage.write("step-0000000001/rank-1.ckpt", body_of(DATA))  # never committed: "crashed"

    leftovers = storage.leftovers()

    assert len(leftovers) == 1 and leftovers[0].startswith("step-0000000001/")
    assert storage.leftovers_in("step-0000000001") == leftovers
    assert storage.leftovers_in("step-0000000002") == []
    storage.remove_leftovers(leftovers)
    assert storage.leftovers() == [] and storage.leftovers_in("step-0000000001") == []
    assert [o.name for o in storage.ls("step-0000000001")] == ["step-0000000001/rank-0.ckpt"]
    assert read_all(storage, "step-0000000001/rank-0.ckpt") == OTHER


def test_append_line_appends_lines(storage: Storage) -> None:
    storage.append_line("failed_checkpoints.txt", "first")
    storage.append_line("failed_checkpoints.txt", "second\n")

    assert read_all(storage, "failed_checkpoints.txt") == b"first\nsecond\n"


def test_objects_put_there_by_others_are_listed_and_read(backend: Backend, storage: Storage) -> None:
    backend.put_plain(storage, "model.pt", b"legacy bytes")

    assert [(o.name, o.size) for o in storage.ls()] == [("model.pt", 12)]
    assert read_all(storage, "model.pt") == b"legacy bytes"


def test_many_threads_write_and_commit_at_once(storage: Storage) -> None:
    names = [f"step-{i:010d}.ckpt" for i in range(6)]
    barrier = threading.Barrier(len(names))

    def write(name: str) -> None:
        barrier.wait(10)
        save(storage, name, name.encode() * 1000)

    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(write, names))

    assert [o.name for o in storage.ls()] == names
    assert all(read_all(storage, n) == n.encode() * 1000 for n in names)
