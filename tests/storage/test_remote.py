"""FsspecStorage on S3 (a moto server on 127.0.0.1): the commit protocol, multipart uploads,
ranged reads, one LIST per listing, retries of injected faults, and kill -9 in mid-upload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import crc32c
import pytest
import torch

from asyncckpt import format as fmt
from asyncckpt.errors import CheckpointWriteError, CorruptedCheckpointError, UnsupportedVersionError
from asyncckpt.format import TensorRef
from asyncckpt.storage import Sink, remote
from asyncckpt.storage.records import CommitRecord, parse_versioned
from asyncckpt.storage.remote import FsspecStorage

from .conftest import PART, raw_s3, s3_options
from .faultproxy import Fault, FaultProxy
from .test_contract import DATA, OTHER, body_of, read_all, save

pytestmark = pytest.mark.timeout(60)

MakeS3 = Callable[..., FsspecStorage]
NAME = "step-0000000007.ckpt"


def raw_keys(storage: FsspecStorage) -> list[str]:
    """Every key under the storage's root, relative to it (behind the storage's back)."""
    return sorted(k[len(storage.root) + 1 :] for k in storage.fs.find(storage.root))


def data_and_commit(storage: FsspecStorage) -> tuple[str, str]:
    """The keys of the one committed version under the root: (data, commit)."""
    commit_key, data_key = raw_keys(storage)  # ".commit" sorts before ".data"
    assert commit_key.endswith(".commit") and data_key.endswith(".data")
    return data_key, commit_key


# --------------------------------------------------------------------------- an encoded checkpoint


def checkpoint_body(step: int) -> tuple[Callable[[Sink], int], list[torch.Tensor]]:
    """A v1 checkpoint of four uint8 tensors (one empty), large enough for several parts."""
    generator = torch.Generator().manual_seed(step)
    tensors = [
        torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator) for n in (150_000, 0, 9, 200_000)
    ]
    entries = [fmt.TensorEntry(f"t{i}", torch.uint8, (len(t),), (1,), i, 0) for i, t in enumerate(tensors)]

    def body(sink: Sink) -> int:
        return fmt.write_checkpoint(
            sink,
            step=step,
            metadata={"lr": 0.1},
            tree={f"t{i}": TensorRef(i) for i in range(len(tensors))},
            tensors=entries,
            sizes=[len(t) for t in tensors],
            blobs=[memoryview(t.numpy()) for t in tensors],
        )

    return body, tensors


@pytest.mark.parametrize("where", ["s3", "memory"])
def test_an_encoded_checkpoint_round_trips_through_the_storage_api(
    where: str, request: pytest.FixtureRequest
) -> None:
    if where == "s3":
        storage = cast(MakeS3, request.getfixturevalue("make_s3"))()
    else:
        storage = FsspecStorage(request.getfixturevalue("memory_url"), part_size=PART)
    body, tensors = checkpoint_body(7)

    storage.commit(storage.write(NAME, body))

    with storage.open(NAME) as handle:
        file = cast(Any, handle.cursor())
        layout = fmt.read_layout(file, storage.where(NAME))
        fmt.verify_blobs(file, layout, path=storage.where(NAME))
        for index, tensor in enumerate(tensors):
            out = torch.empty(len(tensor), dtype=torch.uint8)
            fmt.read_blob_into(file, layout, index, memoryview(out.numpy()), verify=True, path="x")
            assert torch.equal(out, tensor)
    assert layout.step == 7 and layout.metadata == {"lr": 0.1} and layout.file_size == handle.size


# --------------------------------------------------------------------------- the commit protocol


def test_data_and_commit_objects_share_a_token_and_the_record_describes_the_data(make_s3: MakeS3) -> None:
    storage = make_s3()
    written = storage.write(NAME, body_of(DATA))

    [data_key] = raw_keys(storage)  # the bytes are there, durable, and invisible
    assert storage.ls() == [] and parse_versioned(data_key)[:1] == (NAME,)  # type: ignore[index]
    storage.commit(written)

    data_key, commit_key = data_and_commit(storage)
    assert commit_key == data_key.removesuffix(".data") + ".commit"
    record = CommitRecord.decode(storage.fs.cat_file(storage.key(commit_key)), path=commit_key)
    assert (record.name, record.size) == (NAME, len(DATA))
    offset = 0
    for size, crc in record.parts:  # each part's checksum covers exactly its bytes
        assert crc == crc32c.crc32c(DATA[offset : offset + size])
        offset += size
    assert offset == len(DATA) and len(record.parts) == -(-len(DATA) // PART)


def test_a_data_object_without_its_commit_object_is_never_read(make_s3: MakeS3) -> None:
    storage = make_s3()
    save(storage, NAME, DATA)
    data_key, commit_key = data_and_commit(storage)
    storage.fs.rm_file(storage.key(commit_key))

    assert storage.ls() == []
    with pytest.raises(FileNotFoundError):
        storage.open(NAME)
    assert storage.leftovers() == [data_key]


def test_an_open_right_after_a_listing_reuses_it_and_never_opens_a_superseded_version(
    make_s3: MakeS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "REUSE_LISTING_S", 600.0)  # however slow this machine is today
    storage = make_s3()
    save(storage, NAME, OTHER)
    listings: list[str] = []
    real_listdir = storage.store.listdir

    def counted(folder: str) -> Any:
        listings.append(folder)
        return real_listdir(folder)

    storage.store.listdir = counted  # type: ignore[method-assign]
    assert [o.name for o in storage.ls()] == [NAME]
    assert read_all(storage, NAME) == OTHER
    assert len(listings) == 1  # the open took the version from the listing, then its commit object

    other = make_s3()  # another writer re-saves the name: the listed version's commit object goes
    save(other, NAME, DATA)
    assert read_all(storage, NAME) == DATA  # so the open lists the folder again
    other.delete([NAME])
    with pytest.raises(FileNotFoundError):
        storage.open(NAME)
    assert len(listings) == 3


def test_a_damaged_commit_object_is_refused(make_s3: MakeS3) -> None:
    storage = make_s3()
    save(storage, NAME, DATA)
    _, commit_key = data_and_commit(storage)
    storage.fs.pipe_file(storage.key(commit_key), b'{"asyncckpt_commit": {"format": "asyncckpt-commit"}}')

    with pytest.raises(CorruptedCheckpointError, match="checksum mismatch") as caught:
        storage.open(NAME)
    assert caught.value.path == storage.where(commit_key)


def test_a_commit_record_for_other_bytes_is_refused(make_s3: MakeS3) -> None:
    storage = make_s3()
    save(storage, NAME, DATA)
    _, commit_key = data_and_commit(storage)
    record = CommitRecord.decode(storage.fs.cat_file(storage.key(commit_key)), path="x")
    lying = CommitRecord(NAME, record.token, 10, ((10, 0),), None, "", "")
    storage.fs.pipe_file(storage.key(commit_key), lying.encode())

    with pytest.raises(CorruptedCheckpointError, match=f"has {len(DATA)} bytes, its commit object says 10"):
        storage.open(NAME)


def test_a_newer_commit_record_version_is_refused_by_name() -> None:
    record = CommitRecord(NAME, "t", 0, ((0, 0),), None, "", "")
    fields = record.fields() | {"version": 2}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    data = json.dumps({"asyncckpt_commit": fields, "crc32c": f"{crc32c.crc32c(canonical):08x}"}).encode()

    with pytest.raises(UnsupportedVersionError, match="commit record version 2"):
        CommitRecord.decode(data, path="x")
    assert CommitRecord.decode(record.encode(), path="x") == record


def test_a_recommit_removes_the_older_version_commit_first(make_s3: MakeS3) -> None:
    storage = make_s3()
    save(storage, NAME, OTHER)
    old = raw_keys(storage)
    save(storage, NAME, DATA)

    new = raw_keys(storage)
    assert len(new) == 2 and not set(new) & set(old)
    assert read_all(storage, NAME) == DATA


def test_delete_removes_every_commit_object_before_any_data(make_s3: MakeS3) -> None:
    storage = make_s3()
    save(storage, "a.ckpt", DATA)
    save(storage, "b.ckpt", OTHER)
    calls: list[list[str]] = []
    real_delete = storage.store.delete

    def spy(keys: Any) -> None:
        calls.append([k.rpartition(".")[2] for k in keys])
        real_delete(keys)

    storage.store.delete = spy  # type: ignore[method-assign]

    storage.delete(["a.ckpt", "b.ckpt"])

    assert calls == [["commit", "commit"], ["data", "data"]]
    assert raw_keys(storage) == []


def test_a_crash_in_mid_delete_leaves_no_checkpoint_that_looks_whole(make_s3: MakeS3) -> None:
    storage = make_s3()
    save(storage, "a.ckpt", DATA)
    real_delete = storage.store.delete
    calls = 0

    def dies_after_the_commits(keys: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("killed before the data objects went")
        real_delete(keys)

    storage.store.delete = dies_after_the_commits  # type: ignore[method-assign]
    with pytest.raises(OSError, match="killed"):
        storage.delete(["a.ckpt"])
    storage.store.delete = real_delete  # type: ignore[method-assign]

    assert storage.ls() == []
    [leftover] = storage.leftovers()
    assert leftover.endswith(".data")
    storage.remove_leftovers([leftover])
    assert raw_keys(storage) == []


def test_an_uncommitted_data_object_of_a_live_writer_elsewhere_is_not_a_leftover(make_s3: MakeS3) -> None:
    storage = make_s3()
    live = f"{NAME}.{'0' * 16}-otherhost-1-00000000.data"  # written just now by another host
    storage.fs.pipe_file(storage.key(live), b"in flight")
    dead = f"{NAME}.{'0' * 16}-{_this_host()}-{_dead_pid()}-00000000.data"
    storage.fs.pipe_file(storage.key(dead), b"abandoned")

    assert storage.leftovers() == [dead]


def _this_host() -> str:
    from asyncckpt.storage.temps import writer_id

    return writer_id().rpartition("-")[0]


def _dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(child.stdout)


# --------------------------------------------------------------------------- uploads and reads


def test_a_large_object_goes_up_in_parallel_parts_with_bounded_buffers(
    make_s3: MakeS3, proxy: FaultProxy
) -> None:
    storage = make_s3(endpoint=proxy.url, concurrency=2)
    data = os.urandom(PART * 12 + 5)
    together = proxy.gather(2, method="PUT", query="partNumber")

    written = storage.write(NAME, body_of(data, chunk=100_000))

    assert not together.broken  # two parts were in flight at the same time
    parts = proxy.seen("PUT", query="partNumber")
    assert len(parts) == 13 and all(p.headers.get("x-amz-checksum-crc32c") for p in parts)  # verified there
    assert len(proxy.seen("POST", query="uploads")) == 1  # one multipart upload
    assert written.token.buffers <= 3  # concurrency + 1 part buffers, whatever the size
    storage.commit(written)
    assert read_all(storage, NAME) == data


def test_an_object_smaller_than_a_part_is_one_put(make_s3: MakeS3, proxy: FaultProxy) -> None:
    storage = make_s3(endpoint=proxy.url)

    storage.commit(storage.write(NAME, body_of(b"small")))

    assert [r.method for r in proxy.requests if "list-type" not in r.query] == ["PUT", "PUT"]  # data, commit


def test_listing_a_run_is_one_list_request(make_s3: MakeS3, proxy: FaultProxy) -> None:
    storage = make_s3(endpoint=proxy.url)
    for step in range(5):
        save(storage, f"step-{step:010d}.ckpt", b"x" * step)
    proxy.reset()

    listed = storage.ls()

    assert [o.size for o in listed] == [0, 1, 2, 3, 4]
    assert [(r.method, "list-type=2" in r.query) for r in proxy.requests] == [("GET", True)]


def test_reads_are_ranged_gets(make_s3: MakeS3, proxy: FaultProxy) -> None:
    storage = make_s3(endpoint=proxy.url)
    save(storage, NAME, DATA)
    proxy.reset()

    with storage.open(NAME) as handle:
        buffer = bytearray(1000)
        handle.read_at(5000, memoryview(buffer))

    ranged = [r.headers.get("range") for r in proxy.seen("GET") if "list-type" not in r.query]
    assert ranged[-1] == "bytes=5000-5999" and bytes(buffer) == DATA[5000:6000]


def test_small_reads_at_either_end_share_one_get_per_end(make_s3: MakeS3, proxy: FaultProxy) -> None:
    storage = make_s3(endpoint=proxy.url)
    for data in (DATA, DATA[:10_000]):  # larger than both ends together; smaller than the tail alone
        save(storage, NAME, data)
        proxy.reset()
        with storage.open(NAME) as handle:
            pieces = [
                (0, 8),
                (0, 64),
                (len(data) - 64, 64),
                (len(data) - 9000, 5000),
                (4000, 200),
                (len(data) - 3, 9),
            ]
            for offset, size in pieces:
                buffer = bytearray(size)
                got = handle.read_at(offset, memoryview(buffer))
                assert bytes(buffer[:got]) == data[offset : offset + size]
        ranged = [r.headers.get("range") for r in proxy.seen("GET", path=".data")]
        tail = max(len(data) - (256 << 10), 0)
        middle = [] if len(data) < (256 << 10) else ["bytes=4000-4199"]
        assert ranged == ["bytes=0-4095", f"bytes={tail}-{len(data) - 1}", *middle]


# --------------------------------------------------------------------------- injected faults


@pytest.mark.parametrize(
    "fault",
    [
        Fault("500", method="PUT", query="partNumber", times=2),
        Fault("drop", method="PUT", query="partNumber", times=2),
        Fault("503", method="POST", query="uploads"),
        Fault("500", method="POST", query="uploadId"),  # complete
        Fault("lost", method="POST", query="uploadId"),  # completed, the reply lost
        Fault("503", method="PUT", path=".commit", times=2),
        Fault("lost", method="PUT", path=".commit"),  # committed, the reply lost: create-only says 412
        Fault("drop", method="GET", query="list-type"),
    ],
    ids=lambda f: f"{f.action}-{f.method}-{f.query or f.path}",
)
def test_transient_upload_faults_are_retried_and_the_object_committed(
    make_s3: MakeS3, proxy: FaultProxy, fault: Fault
) -> None:
    storage = make_s3(endpoint=proxy.url)
    proxy.add(fault)

    save(storage, NAME, DATA)

    assert fault.times == 0  # every injected fault was hit
    assert [o.name for o in storage.ls()] == [NAME] and read_all(storage, NAME) == DATA
    assert storage.leftovers() == []


@pytest.mark.parametrize("action", ["drop", "truncate", "500"])
def test_transient_read_faults_are_retried(make_s3: MakeS3, proxy: FaultProxy, action: Any) -> None:
    storage = make_s3(endpoint=proxy.url)
    save(storage, NAME, DATA)
    fault = proxy.add(Fault(action, method="GET", query="", path=NAME, times=2))

    with storage.open(NAME) as handle:
        fault.times = 2  # opening read the commit object: fault the ranged GETs of the data
        buffer = bytearray(len(DATA))
        assert handle.read_at(0, memoryview(buffer)) == len(DATA)

    assert bytes(buffer) == DATA and fault.times == 0


def test_a_part_that_keeps_failing_fails_the_write_cleanly(make_s3: MakeS3, proxy: FaultProxy) -> None:
    storage = make_s3(endpoint=proxy.url)
    save(storage, NAME, OTHER)
    proxy.add(Fault("500", method="PUT", query="partNumber", times=-1))

    with pytest.raises(CheckpointWriteError) as caught:
        storage.write(NAME, body_of(DATA))

    assert caught.value.path == storage.where(NAME) == f"{storage.location}/{NAME}"
    assert read_all(storage, NAME) == OTHER and storage.leftovers() == []
    bucket, _, prefix = storage.root.partition("/")
    pending = raw_s3(_endpoint(storage)).call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")
    assert not pending  # the upload was aborted


def test_a_commit_that_keeps_failing_publishes_nothing(make_s3: MakeS3, proxy: FaultProxy) -> None:
    storage = make_s3(endpoint=proxy.url)
    save(storage, NAME, OTHER)
    before = raw_keys(storage)
    written = storage.write(NAME, body_of(DATA))
    proxy.add(Fault("503", method="PUT", path=".commit", times=-1))

    with pytest.raises(CheckpointWriteError, match="nothing was published") as caught:
        storage.commit(written)

    assert caught.value.path == storage.where(NAME)
    assert read_all(storage, NAME) == OTHER and raw_keys(storage) == before  # the new data is gone


def _endpoint(storage: FsspecStorage) -> str:
    return cast(str, storage.fs.client_kwargs["endpoint_url"])


# --------------------------------------------------------------------------- kill -9


@pytest.mark.parametrize("stage", ["upload", "durable"])
def test_a_writer_killed_in_mid_upload_commits_nothing(
    make_s3: MakeS3, moto_url: str, stage: str, tmp_path: Path
) -> None:
    storage = make_s3()
    save(storage, "step-0000000001.ckpt", OTHER)
    config = {"url": storage.location, "options": s3_options(moto_url), "part_size": PART}
    config |= {"name": "step-0000000002.ckpt", "stage": stage}
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("upload_child.py")), json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == ("uploading" if stage == "upload" else "durable")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)

    assert [o.name for o in storage.ls()] == ["step-0000000001.ckpt"]
    assert read_all(storage, "step-0000000001.ckpt") == OTHER
    with pytest.raises(FileNotFoundError):
        storage.open("step-0000000002.ckpt")
    [leftover] = storage.leftovers()  # its process is gone: the upload or data object is abandoned
    assert leftover.startswith("step-0000000002.ckpt.") and ("?uploadId=" in leftover) == (stage == "upload")
    storage.remove_leftovers([leftover])
    assert storage.leftovers() == [] and [o.name for o in storage.ls()] == ["step-0000000001.ckpt"]
