"""The catalog's names of multi-rank steps, and PosixStorage's step folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncckpt import catalog
from asyncckpt import dist as adist
from asyncckpt.errors import UsageError
from asyncckpt.storage import PosixStorage
from asyncckpt.testing import RecordingOps


def write(storage: PosixStorage, name: str, data: bytes = b"x") -> None:
    storage.commit(storage.write(name, lambda sink: (sink.write(data), len(data))[1]))


def test_names_of_a_multi_rank_step() -> None:
    assert catalog.step_folder_name(300) == "step-0000000300"
    assert catalog.shard_name(300, 1) == "step-0000000300/rank-00001.ckpt"
    assert catalog.shard_name(300, 123456) == "step-0000000300/rank-123456.ckpt"
    assert catalog.commit_record_name(300) == "step-0000000300/commit.record"


def test_names_parse_back() -> None:
    assert catalog.parse_step_folder("step-0000000300") == 300
    assert catalog.parse_step_folder("step-0000000300/") == 300
    assert catalog.parse_shard_name("step-0000000300/rank-00001.ckpt") == (300, 1)
    for name in ("step-0000000300.ckpt", "step-x", "rank-00001.ckpt", "step-0000000300/rank-1.ckpt"):
        assert catalog.parse_step_folder(name) is None or catalog.parse_shard_name(name) is None
    assert catalog.parse_step_folder("step-99999999999999999999") is None  # beyond MAX_STEP


@pytest.mark.parametrize("rank", [-1, True, 1.0, catalog.MAX_RANK + 1])
def test_bad_ranks_are_refused(rank: object) -> None:
    with pytest.raises(UsageError):
        catalog.shard_name(1, rank)  # type: ignore[arg-type]


def test_only_folders_with_a_commit_record_are_committed_steps(tmp_path: Path) -> None:
    storage = PosixStorage(tmp_path)
    for step in (1, 2, 3):
        write(storage, catalog.shard_name(step, 0))
    write(storage, catalog.commit_record_name(1))
    write(storage, catalog.commit_record_name(3))
    (tmp_path / "step-0000000009").mkdir()
    (tmp_path / "notes").mkdir()

    steps = catalog.committed_steps(storage)

    assert [info.step for info in steps] == [1, 3]
    assert steps[0].folder == str(tmp_path / "step-0000000001") and steps[0].record_size == 1
    assert catalog.uncommitted_step_folders(storage) == ["step-0000000002", "step-0000000009"]
    listed = catalog.list_checkpoints(tmp_path)  # committed steps are listed (by their folders)
    found = [(c.step, c.path.name, c.size) for c in listed]
    assert found == [(1, "step-0000000001", 2), (3, "step-0000000003", 2)]


def test_writing_into_a_new_step_folder_makes_the_folder_durable_first(tmp_path: Path) -> None:
    ops = RecordingOps()
    storage = PosixStorage(tmp_path, ops=ops)

    write(storage, catalog.shard_name(5, 0))
    write(storage, catalog.shard_name(5, 1))

    folder = tmp_path / "step-0000000005"
    calls = [(name, target) for name, target in ops.calls if name in ("mkdir", "fsync_dir", "open_exclusive")]
    assert calls[:2] == [("mkdir", folder), ("fsync_dir", tmp_path)]  # durable before any file in it
    assert calls[2][0] == "open_exclusive" and Path(calls[2][1]).parent == folder
    assert [name for name, _ in calls].count("mkdir") == 1
    assert sorted(p.name for p in folder.iterdir()) == ["rank-00000.ckpt", "rank-00001.ckpt"]


def test_leftovers_include_temp_files_in_step_folders(tmp_path: Path) -> None:
    storage = PosixStorage(tmp_path)
    write(storage, catalog.shard_name(5, 0))
    (tmp_path / "step-0000000005" / ".rank-00001.ckpt.tmp-1a2b3c4d").write_bytes(b"partial")
    (tmp_path / ".step-0000000006.ckpt.tmp-00000000").write_bytes(b"partial")

    leftovers = storage.leftovers()

    assert leftovers == [
        ".step-0000000006.ckpt.tmp-00000000",
        "step-0000000005/.rank-00001.ckpt.tmp-1a2b3c4d",
    ]
    storage.remove_leftovers(leftovers)
    assert storage.leftovers() == []
    assert (tmp_path / catalog.shard_name(5, 0)).exists()


def test_delete_step_removes_the_record_first_then_the_folder(tmp_path: Path) -> None:
    ops = RecordingOps()
    storage = PosixStorage(tmp_path, ops=ops)
    for step in (1, 2):
        write(storage, catalog.shard_name(step, 0))
        write(storage, catalog.shard_name(step, 1))
        write(storage, catalog.commit_record_name(step))
    (tmp_path / "step-0000000001" / ".rank-00002.ckpt.tmp-00000000").write_bytes(b"partial")
    ops.calls.clear()

    adist.delete_step(storage, 1)

    removed = [target for name, target in ops.calls if name in ("unlink", "rmdir")]
    assert removed[0] == tmp_path / catalog.commit_record_name(1)
    assert removed[-1] == tmp_path / "step-0000000001"
    assert not (tmp_path / "step-0000000001").exists()
    assert [info.step for info in adist.committed_steps(storage)] == [2]


def test_remove_uncommitted_keeps_committed_steps(tmp_path: Path) -> None:
    storage = PosixStorage(tmp_path)
    write(storage, catalog.shard_name(1, 0))
    write(storage, catalog.commit_record_name(1))
    write(storage, catalog.shard_name(2, 0))  # a save that never committed
    (tmp_path / "step-0000000001" / ".rank-00001.ckpt.tmp-00000000").write_bytes(b"partial")

    assert adist.remove_uncommitted(storage) == ["step-0000000002"]

    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000000001"]
    assert sorted(p.name for p in (tmp_path / "step-0000000001").iterdir()) == [
        "commit.record",
        "rank-00000.ckpt",
    ]
