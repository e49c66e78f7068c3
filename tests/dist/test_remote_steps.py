"""Multi-rank steps on an object store (S3 through s3fs, a moto server): AsyncCheckpointer in
distributed mode writes each rank's shard and the commit record through the Storage seam, and
a restore agrees on the newest step that verifies on every rank."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import remote_workers as rw
from dist_harness import RankResult, run_world

from asyncckpt import catalog
from asyncckpt import format as fmt
from asyncckpt.testing import states_equal

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from storage.conftest import moto_url  # the storage tests' moto server, one for this module

    yield from moto_url.__wrapped__()  # type: ignore[attr-defined]


@pytest.fixture
def s3_url(moto_endpoint: str) -> str:
    """``s3://<fresh bucket>/run`` on the moto server."""
    import s3fs

    name = f"dist-{uuid.uuid4().hex[:16]}"
    s3fs.S3FileSystem(**rw.s3_options(moto_endpoint)).call_s3("create_bucket", Bucket=name)
    return f"s3://{name}/run"


def values(results: list[RankResult]) -> list[Any]:
    for result in results:
        assert result.ok, f"rank {result.rank} (exit {result.exitcode}): {result.error}: {result.message}"
    return [result.value for result in results]


def flip_last_blob_of_shard(endpoint: str, url: str, step: int, rank: int) -> str:
    """One flipped bit in the last blob of ``rank``'s shard object of ``step`` (the data object
    behind the committed name, rewritten in place with the same size)."""
    import s3fs

    fs = s3fs.S3FileSystem(**rw.s3_options(endpoint))
    shard = catalog.shard_name(step, rank)
    prefix = url.removeprefix("s3://") + "/" + shard
    [key] = [
        k for k in fs.find(prefix.rpartition("/")[0]) if k.startswith(prefix + ".") and k.endswith(".data")
    ]
    data = bytearray(fs.cat_file(key))
    layout = fmt.read_layout(io.BytesIO(bytes(data)), key)
    data[layout.blobs[-1].offset] ^= 0x01
    fs.pipe_file(key, bytes(data))
    return f"{url}/{shard}"


def test_two_steps_on_s3_and_a_corrupted_shard_falls_back_on_every_rank(
    moto_endpoint: str, s3_url: str
) -> None:
    saved = values(run_world(rw.save_two_steps, 2, s3_url, moto_endpoint, deadline=180))
    listed = saved[0]["listed"]
    assert [step for step, _ in listed] == [1, 2]
    assert listed[1][1] == f"{s3_url}/{catalog.step_folder_name(2)}"
    assert saved[0]["path"] == listed[1][1]  # the handle names the step's URL

    intact = values(run_world(rw.restore_from, 2, s3_url, moto_endpoint, deadline=180))
    assert [r["step"] for r in intact] == [2, 2] and intact[0]["diagnostics"] == []

    broken = flip_last_blob_of_shard(moto_endpoint, s3_url, 2, 1)
    results = values(run_world(rw.restore_from, 2, s3_url, moto_endpoint, deadline=180))

    assert [r["step"] for r in results] == [1, 1]  # by agreement: both fall back
    assert results[0]["diagnostics"] == results[1]["diagnostics"]
    [(path, kind, _)] = results[0]["diagnostics"]
    assert path == broken and kind == "corrupted"
    assert results[0]["path"] == f"{s3_url}/{catalog.step_folder_name(1)}"
    assert states_equal(results[0]["full"], saved[0]["full"])  # step 1, exactly
    assert not Path("s3:").exists()  # nothing went to a local folder named after the URL


def test_the_first_save_removes_what_a_crashed_save_left_in_step_folders(
    moto_endpoint: str, s3_url: str
) -> None:
    import s3fs
    from storage.conftest import PART

    values(run_world(rw.save_two_steps, 2, s3_url, moto_endpoint, deadline=180))
    fs = s3fs.S3FileSystem(**rw.s3_options(moto_endpoint))
    bucket, _, run = s3_url.removeprefix("s3://").partition("/")
    folders = [f"{bucket}/{run}/{catalog.step_folder_name(step)}" for step in (1, 2, 3)]

    def step_objects() -> dict[str, bytes]:
        return {key: fs.cat_file(key) for folder in folders for key in fs.find(folder)}

    def uploads() -> list[str]:
        return [u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads") or []]

    committed = step_objects()
    values(run_world(rw.leave_half_step, 2, s3_url, moto_endpoint, PART, deadline=120))
    assert len(step_objects()) == len(committed) + 3  # rank 0's data and commit, rank 1's data
    assert len(uploads()) == 1

    listed = values(run_world(rw.save_one_step, 2, s3_url, moto_endpoint, 4, deadline=180))

    assert listed == [[1, 2, 4], [1, 2, 4]]
    assert step_objects() == committed  # step 3 is gone; steps 1 and 2 byte for byte as they were
    assert uploads() == []


def test_restore_before_the_checkpointer_is_open_on_an_object_store_is_refused() -> None:
    """Not open, the distributed side knows the directory only as a ``Path`` (which loses the
    URL and its storage options): it refuses instead of reading a local folder named ``s3:``."""
    from asyncckpt.dist.mode import MultiRank
    from asyncckpt.errors import UsageError

    multirank = MultiRank(None, timeout=5)
    with pytest.raises(UsageError, match="needs the checkpointer open"):
        multirank.restore(Path("s3://bucket/run"), {}, on_corrupt="fallback", expect=None)


def test_a_local_copy_is_refused_in_distributed_mode(tmp_path: Path) -> None:
    from asyncckpt.dist.mode import MultiRank
    from asyncckpt.errors import UsageError
    from asyncckpt.storage import PosixStorage
    from asyncckpt.storage.localcopy import LocalCopyStorage

    remote = PosixStorage(tmp_path / "remote")  # (any storage: the wrapper is what is refused)
    storage = LocalCopyStorage(remote, PosixStorage(tmp_path / "copy"))
    with pytest.raises(UsageError, match="local_copy= is not supported in distributed mode"):
        MultiRank(None, timeout=5).writer(storage)
