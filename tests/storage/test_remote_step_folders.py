"""Multi-rank step folders on S3 (a moto server): what a crashed save left inside them (shard
objects without their commit object, unfinished multipart uploads) is found by the clean-up at
the next start and by ``delete_step``, and what a live writer may still be writing is kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from asyncckpt import catalog
from asyncckpt.dist.steps import delete_step, remove_uncommitted
from asyncckpt.storage.records import data_name, new_token
from asyncckpt.storage.remote import FsspecStorage
from asyncckpt.storage.temps import writer_id

from .conftest import s3_options
from .test_contract import DATA, OTHER, body_of, save

pytestmark = pytest.mark.timeout(60)

MakeS3 = Callable[..., FsspecStorage]
STEP_1, STEP_2, STEP_3 = (catalog.step_folder_name(step) for step in (1, 2, 3))


def objects(storage: FsspecStorage, folder: str) -> dict[str, bytes]:
    """Every object under ``folder`` with its bytes, by key relative to the root."""
    start = len(storage.root) + 1
    return {key[start:]: storage.fs.cat_file(key) for key in storage.fs.find(storage.key(folder))}


def uploads(storage: FsspecStorage) -> list[str]:
    """Keys (relative to the root) of every unfinished multipart upload in the bucket."""
    bucket, _, path = storage.root.partition("/")
    reply = storage.fs.call_s3("list_multipart_uploads", Bucket=bucket)
    return sorted(u["Key"][len(path) + 1 :] for u in reply.get("Uploads") or [])


def committed_step(storage: FsspecStorage, step: int) -> None:
    """Two shards and a commit record, each committed (the bytes do not matter here)."""
    save(storage, catalog.shard_name(step, 0), DATA[:5000])
    save(storage, catalog.shard_name(step, 1), OTHER)
    save(storage, catalog.commit_record_name(step), b"record")


def start_upload(storage: FsspecStorage, name: str, *, token: str | None = None) -> str:
    """A multipart upload of ``name``'s data object, started and never finished (what a writer
    killed in mid-upload leaves); its key relative to the root."""
    key = storage.key(data_name(name, token or new_token()))
    bucket, _, path = key.partition("/")
    storage.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=path)
    return key[len(storage.root) + 1 :]


def put_data(storage: FsspecStorage, name: str, token: str) -> str:
    """A data object of ``name`` written under ``token`` (by the writer the token names)."""
    relative = data_name(name, token)
    storage.fs.pipe_file(storage.key(relative), b"in flight")
    return relative


def live_tokens() -> list[str]:
    """Tokens of writers that may still be writing: another host's (just now) and another live
    process's on this host (our parent)."""
    host = writer_id().rpartition("-")[0]
    return [f"{'0' * 16}-otherhost-1-00000000", f"{'0' * 16}-{host}-{os.getppid()}-00000000"]


def test_the_clean_up_empties_crashed_step_folders_and_keeps_what_live_writers_write(
    make_s3: MakeS3,
) -> None:
    storage = make_s3()
    committed_step(storage, 1)
    committed_step(storage, 2)
    intact = objects(storage, STEP_1) | objects(storage, STEP_2)
    # A save of step 3 killed before its record: rank 0's shard committed, rank 1's uploaded
    # without its commit object, rank 2's upload unfinished. This process wrote them: by the
    # rule of temps.writer_is_gone its own writes are abandoned ones.
    save(storage, catalog.shard_name(3, 0), DATA[:1000])
    storage.write(catalog.shard_name(3, 1), body_of(DATA))
    start_upload(storage, catalog.shard_name(3, 2))
    # In committed step 2: a re-upload of rank 1's shard never committed, one never finished.
    storage.write(catalog.shard_name(2, 1), body_of(DATA))
    start_upload(storage, catalog.shard_name(2, 0))
    # Live writers' objects in step 3 are theirs.
    live = [put_data(storage, catalog.shard_name(3, 3), token) for token in live_tokens()]
    # (moto dates every upload's start in 2010: another host's would look stale, so this host's)
    live_upload = start_upload(storage, catalog.shard_name(3, 4), token=live_tokens()[1])

    removed = remove_uncommitted(storage)

    assert removed == [STEP_3]
    assert sorted(objects(storage, STEP_3)) == sorted(live)
    assert uploads(storage) == [live_upload]
    assert objects(storage, STEP_1) | objects(storage, STEP_2) == intact  # byte for byte
    assert [info.step for info in catalog.committed_steps(storage)] == [1, 2]


def test_leftovers_look_one_folder_down_and_leftovers_in_at_one_folder(make_s3: MakeS3) -> None:
    storage = make_s3()
    committed_step(storage, 2)
    data = storage.write(catalog.shard_name(2, 1), body_of(OTHER)).token.key[len(storage.root) + 1 :]
    upload = start_upload(storage, catalog.shard_name(2, 0))
    root_upload = start_upload(storage, "step-0000000009.ckpt")
    start_upload(storage, "deeper/still/x.ckpt")  # two folders down: not a run's leftover
    marked, root_marked = (f"{u}?uploadId={_upload_id(storage, u)}" for u in (upload, root_upload))

    assert storage.leftovers() == sorted([data, marked, root_marked])
    assert storage.leftovers_in(STEP_2) == sorted([data, marked])
    assert storage.leftovers_in(STEP_1) == []
    assert [u.label for u in storage.unfinished(STEP_2)] == sorted([data, marked])


def test_delete_step_removes_what_crashed_writes_left_in_the_step(make_s3: MakeS3) -> None:
    storage = make_s3()
    committed_step(storage, 1)
    committed_step(storage, 2)
    intact = objects(storage, STEP_1)
    storage.write(catalog.shard_name(2, 1), body_of(DATA))  # never committed, writer gone
    start_upload(storage, catalog.shard_name(2, 0))  # never finished, writer gone

    delete_step(storage, 2)

    assert objects(storage, STEP_2) == {} and uploads(storage) == []
    assert objects(storage, STEP_1) == intact
    assert [info.step for info in catalog.committed_steps(storage)] == [1]


def test_a_clean_up_in_another_process_keeps_a_live_writers_upload(make_s3: MakeS3) -> None:
    """The writer (this process) is alive: a clean-up run by another process on this host
    removes nothing of its, not even in an uncommitted step folder."""
    storage = make_s3()
    committed_step(storage, 1)
    storage.write(catalog.shard_name(3, 1), body_of(OTHER))
    upload = start_upload(storage, catalog.shard_name(3, 0))
    before = objects(storage, STEP_3)
    code = (
        "import sys; from asyncckpt.dist.steps import remove_uncommitted; "
        "from asyncckpt.storage.remote import FsspecStorage; import json; "
        "c = json.loads(sys.argv[1]); print(remove_uncommitted(FsspecStorage(c[0], storage_options=c[1])))"
    )
    endpoint = storage.fs.client_kwargs["endpoint_url"]
    child = subprocess.run(
        [sys.executable, "-c", code, json.dumps([storage.location, s3_options(endpoint)])],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=50,
    )

    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == f"['{STEP_3}']"  # the folder is not committed: it is cleaned
    assert objects(storage, STEP_3) == before and uploads(storage) == [upload]  # but ours is kept


def _upload_id(storage: FsspecStorage, relative: str) -> str:
    bucket, _, path = storage.key(relative).partition("/")
    reply = storage.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=path)
    [found] = reply["Uploads"]
    return str(found["UploadId"])
