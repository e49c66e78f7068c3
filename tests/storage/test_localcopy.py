"""LocalCopyStorage: one encoding teed to the remote and a local file; the remote commit is the
commit; the local copy is read only when it matches the remote commit record, and a failing local
disk never fails a save (in-memory fsspec as the remote)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from asyncckpt.errors import CheckpointWriteError, UsageError
from asyncckpt.events import LOCAL_COPY_FAILED, LOCAL_COPY_IGNORED, LOCAL_COPY_USED
from asyncckpt.storage import PosixFile, PosixStorage, Sink
from asyncckpt.storage.localcopy import LOCAL_MARK, LocalCopyStorage, open_run_storage
from asyncckpt.storage.remote import FsspecStorage, RemoteFile
from asyncckpt.testing import FaultyOps

from .test_contract import DATA, OTHER, body_of, failing_body, read_all, save

pytestmark = pytest.mark.timeout(60)


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.seen.append((event, fields))

    def names(self) -> list[str]:
        return [event for event, _ in self.seen]


def make(memory_url: str, copy: Path, *, ops: Any = None) -> tuple[LocalCopyStorage, Events]:
    events = Events()
    local = PosixStorage(copy, ops=ops) if ops is not None else PosixStorage(copy)
    copy.mkdir(parents=True, exist_ok=True)
    return LocalCopyStorage(FsspecStorage(memory_url), local, notify=events), events


def test_a_commit_keeps_the_same_bytes_locally_and_reads_them_back_from_there(
    memory_url: str, tmp_path: Path
) -> None:
    storage, events = make(memory_url, tmp_path / "copy")
    save(storage, "step-0000000001.ckpt", DATA)
    assert (tmp_path / "copy" / "step-0000000001.ckpt").read_bytes() == DATA
    assert read_all(storage.remote, "step-0000000001.ckpt") == DATA
    with storage.open("step-0000000001.ckpt") as handle:
        assert isinstance(handle, PosixFile)  # the local file, checked against the commit record
    assert events.names() == [LOCAL_COPY_USED]
    assert events.seen[0][1]["path"] == str(tmp_path / "copy" / "step-0000000001.ckpt")


def test_only_the_newest_commit_stays_local(memory_url: str, tmp_path: Path) -> None:
    storage, _ = make(memory_url, tmp_path / "copy")
    save(storage, "step-0000000001.ckpt", DATA)
    save(storage, "step-0000000002.ckpt", OTHER)
    assert sorted(os.listdir(tmp_path / "copy")) == ["step-0000000002.ckpt"]
    assert [o.name for o in storage.ls()] == ["step-0000000001.ckpt", "step-0000000002.ckpt"]
    with storage.open("step-0000000001.ckpt") as handle:
        assert isinstance(handle, RemoteFile)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:],
            "part 1 differs from the remote commit",
        ),
        (lambda data: data[:-1], f"{len(DATA) - 1} bytes, the remote commit says {len(DATA)}"),
        (lambda data: OTHER[: len(DATA)] + bytes(len(DATA) - len(OTHER)), "part 1 differs"),
    ],
    ids=["flipped-byte", "truncated", "another-checkpoint"],
)
def test_a_local_copy_that_does_not_match_the_commit_is_ignored(
    memory_url: str, tmp_path: Path, damage: Any, reason: str
) -> None:
    storage, events = make(memory_url, tmp_path / "copy")
    save(storage, "step-0000000001.ckpt", DATA)
    local = tmp_path / "copy" / "step-0000000001.ckpt"
    local.write_bytes(damage(local.read_bytes()))
    with storage.open("step-0000000001.ckpt") as handle:
        assert isinstance(handle, RemoteFile)
    assert read_all(storage, "step-0000000001.ckpt") == DATA
    [(event, fields), *_] = events.seen
    assert event == LOCAL_COPY_IGNORED and fields["reason"].startswith(reason)


def test_a_failing_local_disk_never_fails_the_save(memory_url: str, tmp_path: Path) -> None:
    ops = FaultyOps("write", err=errno.ENOSPC, nth=2)
    storage, events = make(memory_url, tmp_path / "copy", ops=ops)
    save(storage, "step-0000000001.ckpt", DATA)
    assert read_all(storage.remote, "step-0000000001.ckpt") == DATA
    assert os.listdir(tmp_path / "copy") == []  # the partial local file was removed
    [(event, fields)] = events.seen
    assert event == LOCAL_COPY_FAILED and "No space left" in fields["error"]


def test_no_local_temp_file_still_uploads_once(memory_url: str, tmp_path: Path) -> None:
    storage, events = make(memory_url, tmp_path / "copy", ops=FaultyOps("open_exclusive"))
    save(storage, "step-0000000001.ckpt", DATA)
    assert read_all(storage, "step-0000000001.ckpt") == DATA
    assert events.names() == [LOCAL_COPY_FAILED]


def test_a_failing_local_fsync_keeps_the_upload(memory_url: str, tmp_path: Path) -> None:
    storage, events = make(memory_url, tmp_path / "copy", ops=FaultyOps("fsync"))
    save(storage, "step-0000000001.ckpt", DATA)
    assert read_all(storage, "step-0000000001.ckpt") == DATA and os.listdir(tmp_path / "copy") == []
    assert events.names() == [LOCAL_COPY_FAILED]


def test_a_failing_body_leaves_nothing_anywhere(memory_url: str, tmp_path: Path) -> None:
    storage, events = make(memory_url, tmp_path / "copy")
    with pytest.raises(ValueError, match="encoder broke"):
        storage.write("step-0000000001.ckpt", failing_body(ValueError("encoder broke")))
    assert storage.ls() == [] and storage.remote.leftovers() == [] and os.listdir(tmp_path / "copy") == []
    assert events.seen == []


def test_a_failing_upload_is_the_remote_failure_and_removes_the_local_file(
    memory_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, _ = make(memory_url, tmp_path / "copy")
    remote = storage.remote
    assert isinstance(remote, FsspecStorage)
    upload = remote.store.upload

    class Broken:
        def __init__(self, key: str) -> None:
            self.inner = upload(key)
            self.nbytes = 0

        def write(self, data: memoryview | bytes) -> None:
            raise OSError(errno.ECONNRESET, "connection reset by the store")

        def finish(self) -> Any:
            return self.inner.finish()

        def abort(self) -> None:
            self.inner.abort()

    monkeypatch.setattr(remote.store, "upload", Broken)
    with pytest.raises(CheckpointWriteError) as caught:
        storage.write("step-0000000001.ckpt", body_of(DATA))
    assert caught.value.path == remote.where("step-0000000001.ckpt")
    assert "connection reset" in caught.value.reason
    assert os.listdir(tmp_path / "copy") == [] and storage.ls() == []


def test_discard_delete_and_leftovers_cover_both(memory_url: str, tmp_path: Path) -> None:
    storage, _ = make(memory_url, tmp_path / "copy")
    written = storage.write("step-0000000001.ckpt", body_of(DATA))
    storage.discard(written)
    assert os.listdir(tmp_path / "copy") == [] and storage.remote.leftovers() == []
    save(storage, "step-0000000001.ckpt", DATA)
    storage.delete(["step-0000000001.ckpt"])
    assert storage.ls() == [] and os.listdir(tmp_path / "copy") == []
    crashed = tmp_path / "copy" / ".step-0000000002.ckpt.tmp-1a2b3c4d"  # an old-style temp: no owner
    crashed.write_bytes(b"x")
    [leftover] = storage.leftovers()
    assert leftover == LOCAL_MARK + crashed.name and storage.where(leftover) == str(crashed)
    storage.remove_leftovers([leftover])
    assert not crashed.exists()


def test_a_body_writes_each_piece_once_to_both(memory_url: str, tmp_path: Path) -> None:
    storage, _ = make(memory_url, tmp_path / "copy")
    calls: list[int] = []

    def body(sink: Sink) -> int:
        calls.append(1)
        sink.write(DATA)
        return len(DATA)

    storage.commit(storage.write("step-0000000001.ckpt", body))
    assert calls == [1]


def test_local_copy_is_for_remote_runs_only(tmp_path: Path, memory_url: str) -> None:
    with pytest.raises(UsageError, match="local_copy= is for a remote directory"):
        open_run_storage(tmp_path / "run", local_copy=tmp_path / "copy")
    assert isinstance(open_run_storage(memory_url, local_copy=tmp_path / "copy"), LocalCopyStorage)


def test_a_checkpointer_that_only_restores_leaves_the_local_copy_alone(
    memory_url: str, tmp_path: Path
) -> None:
    from asyncckpt import AsyncCheckpointer
    from asyncckpt.testing import deterministic_state

    copy = tmp_path / "copy"
    with AsyncCheckpointer(memory_url, local_copy=copy) as trainer:
        trainer.save(1, deterministic_state(1)).result(timeout=30)
    leftover = copy / ".step-0000000002.ckpt.tmp-deadbeef"  # a dead writer's, by an older release
    leftover.write_bytes(b"torn")
    with AsyncCheckpointer(memory_url, local_copy=copy, keep_last=1) as evaluator:
        restored = evaluator.restore({})
    assert restored is not None and restored.step == 1 and leftover.exists()
    with AsyncCheckpointer(memory_url, local_copy=copy) as trainer:
        trainer.save(2, deterministic_state(2)).result(timeout=30)
    assert not leftover.exists()
