"""fsync fails with EIO: the save is reported failed and never committed, fsync is never retried
on the same descriptor, and no file whose content is unknown keeps a final name."""

from __future__ import annotations

import errno
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import asyncckpt
from asyncckpt import AsyncCheckpointer, CheckpointWriteError
from asyncckpt.catalog import checkpoint_name
from asyncckpt.storage import is_temp_name
from asyncckpt.testing import FaultyOps, RecordingOps, deterministic_state, states_equal, temp_files


def state(step: int, version: int = 0) -> dict[str, Any]:
    return deterministic_state(step * 100 + version, tensors=2, numel=512)


def committed_steps(directory: Path) -> list[int]:
    return [c.step for c in asyncckpt.list_checkpoints(directory)]


def fsyncs_per_descriptor(ops: RecordingOps) -> list[int]:
    """How many times each opened file was fsynced (one entry per ``open_exclusive``)."""
    counts: list[int] = []
    for name, _ in ops.calls:
        if name == "open_exclusive":
            counts.append(0)
        elif name == "fsync":
            counts[-1] += 1
    return counts


def test_fsync_eio_is_reported_failed_and_never_committed(tmp_path: Path, faults: Counter[str]) -> None:
    ops = FaultyOps("fsync", err=errno.EIO)
    with AsyncCheckpointer(tmp_path, ops=ops) as ckpt:
        handle = ckpt.save(1, state(1))
        with pytest.raises(CheckpointWriteError, match="Input/output error") as info:
            handle.result(timeout=30)
        stats = ckpt.stats()
    faults["fsync EIO: injected in the file fsync"] += ops.failures
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.EIO
    assert (stats.committed, stats.failed) == (0, 1)
    assert fsyncs_per_descriptor(ops) == [1]  # not retried on the same descriptor
    assert "rename" not in ops.names()  # never published
    unlinked = [target for name, target in ops.calls if name == "unlink"]
    assert len(unlinked) == 1 and is_temp_name(unlinked[0].name)
    assert committed_steps(tmp_path) == [] and temp_files(tmp_path) == []
    lines = (tmp_path / "events.jsonl").read_text()
    assert "checkpoint.save.failed" in lines and "checkpoint.save.committed" not in lines


def test_fsync_eio_on_an_existing_step_keeps_its_previous_content(
    tmp_path: Path, faults: Counter[str]
) -> None:
    ops = FaultyOps("fsync", err=errno.EIO, nth=2)
    with AsyncCheckpointer(tmp_path, ops=ops) as ckpt:
        ckpt.save(5, state(5, 0)).result(timeout=30)
        before = (tmp_path / checkpoint_name(5)).read_bytes()
        with pytest.raises(CheckpointWriteError):
            ckpt.save(5, state(5, 1)).result(timeout=30)
    faults["fsync EIO: injected in the file fsync"] += ops.failures
    assert (tmp_path / checkpoint_name(5)).read_bytes() == before
    assert states_equal(asyncckpt.load(tmp_path / checkpoint_name(5)).state, state(5, 0))
    assert fsyncs_per_descriptor(ops) == [1, 1]


class FlakyFsync(RecordingOps):
    """Each file fsync fails with EIO with probability ``p`` (seeded)."""

    def __init__(self, p: float, seed: int) -> None:
        super().__init__()
        self.p = p
        self.rng = random.Random(seed)
        self.failures = 0

    def fsync(self, fd: int) -> None:
        self.record("fsync", fd)
        if self.rng.random() < self.p:
            self.failures += 1
            raise OSError(errno.EIO, "injected Input/output error in fsync")
        super(RecordingOps, self).fsync(fd)


@pytest.mark.parametrize("seed", range(3))
def test_random_fsync_failures_never_commit_and_never_retry(
    tmp_path: Path, seed: int, faults: Counter[str]
) -> None:
    ops = FlakyFsync(0.4, seed)
    outcomes: dict[int, bool] = {}
    with AsyncCheckpointer(tmp_path, keep_last=100, ops=ops) as ckpt:
        for step in range(20):
            try:  # a failure not seen through its handle would be raised by the next save()
                ckpt.save(step, state(step)).result(timeout=30)
                outcomes[step] = True
            except CheckpointWriteError as exc:
                assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EIO
                outcomes[step] = False
        stats = ckpt.stats()
    faults["fsync EIO: injected at random"] += ops.failures
    assert ops.failures == list(outcomes.values()).count(False)
    assert 0 < ops.failures < 20
    assert committed_steps(tmp_path) == [step for step, ok in outcomes.items() if ok]
    assert (stats.committed, stats.failed) == (20 - ops.failures, ops.failures)
    assert set(fsyncs_per_descriptor(ops)) == {1}
    assert temp_files(tmp_path) == []
    for info in asyncckpt.list_checkpoints(tmp_path):
        assert states_equal(asyncckpt.load(info.path).state, state(info.step))


def test_directory_fsync_eio_reports_failure_and_the_published_file_is_complete(
    tmp_path: Path, faults: Counter[str]
) -> None:
    ops = FaultyOps("fsync_dir", err=errno.EIO)
    with AsyncCheckpointer(tmp_path, ops=ops) as ckpt:
        with pytest.raises(CheckpointWriteError, match="may not survive a power loss"):
            ckpt.save(1, state(1)).result(timeout=30)
        stats = ckpt.stats()
    faults["fsync EIO: injected in the directory fsync"] += ops.failures
    assert (stats.committed, stats.failed) == (0, 1)
    # The file was fsynced before the rename: its content is known and complete; only whether
    # the rename survives a power loss is not.
    assert states_equal(asyncckpt.load(tmp_path / checkpoint_name(1)).state, state(1))


def test_eio_in_the_synchronous_save_leaves_no_file(tmp_path: Path, faults: Counter[str]) -> None:
    ops = FaultyOps("fsync", err=errno.EIO)
    with pytest.raises(CheckpointWriteError, match="Input/output error"):
        asyncckpt.save(tmp_path / checkpoint_name(1), state(1), step=1, ops=ops)
    faults["fsync EIO: injected in the file fsync"] += ops.failures
    assert list(tmp_path.iterdir()) == [] and fsyncs_per_descriptor(ops) == [1]


@pytest.mark.parametrize("op", ["fsync_dir", "unlink"])
def test_a_failure_while_pruning_does_not_fail_the_committed_save(
    tmp_path: Path, op: str, faults: Counter[str]
) -> None:
    # fsync_dir: the 1st call publishes step 1, the 2nd step 2, the 3rd publishes step 3 and
    # the 4th makes retention's unlink of step 1 durable. unlink: the 1st is retention's.
    ops = FaultyOps(op, err=errno.EIO, nth=4 if op == "fsync_dir" else 1)
    with AsyncCheckpointer(tmp_path, keep_last=2, ops=ops) as ckpt:
        paths = [ckpt.save(step, state(step)).result(timeout=30) for step in (1, 2, 3)]
        stats = ckpt.stats()
    faults[f"EIO while pruning: injected in {op}"] += ops.failures
    assert ops.failures == 1
    assert paths == [tmp_path / checkpoint_name(s) for s in (1, 2, 3)]
    assert (stats.committed, stats.failed) == (3, 0)
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    failed = [e for e in lines if e["event"] == "checkpoint.prune_failed"]
    assert len(failed) == 1 and "Input/output error" in str(failed[0]["error"])
    assert states_equal(asyncckpt.load(tmp_path / checkpoint_name(3)).state, state(3))


class UnlinkFailsToo(FaultyOps):
    """fsync fails with EIO, and so does removing the temp file afterwards."""

    def unlink(self, path: Path) -> None:
        self.record("unlink", path)
        self.failures += 1
        raise OSError(errno.EIO, "injected Input/output error in unlink")


def test_a_temp_file_that_cannot_be_removed_does_not_hide_the_fsync_error(
    tmp_path: Path, faults: Counter[str]
) -> None:
    ops = UnlinkFailsToo("fsync", err=errno.EIO)
    with pytest.raises(
        CheckpointWriteError, match=r"Input/output error in fsync.*could not be removed"
    ) as info:
        asyncckpt.save(tmp_path / checkpoint_name(1), state(1), step=1, ops=ops)
    faults["fsync EIO: injected in the file fsync"] += 1
    faults["fsync EIO: temp file removal failed too"] += 1
    assert isinstance(info.value.__cause__, OSError) and "fsync" in str(info.value.__cause__)
    assert len(temp_files(tmp_path)) == 1 and not (tmp_path / checkpoint_name(1)).exists()
    with AsyncCheckpointer(tmp_path) as ckpt:  # the next run's first save removes it
        ckpt.save(2, state(2)).result(timeout=30)
        assert temp_files(tmp_path) == []
