"""Checkpoints at names the caller chooses, retention left to the caller, and ordered deletes."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

import asyncckpt
from asyncckpt import AsyncCheckpointer, CheckpointWriteError
from asyncckpt.errors import UsageError
from asyncckpt.testing import FaultyOps, GatedOps, deterministic_state, states_equal


def event_names(directory: Path) -> list[str]:
    lines = (directory / "events.jsonl").read_text().splitlines()
    return [str(json.loads(line)["event"]) for line in lines]


def ckpt_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.ckpt"))


def test_a_named_save_is_written_at_that_name_and_replaced_atomically(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path, keep_last=None) as ckpt:
        first = ckpt.save(4, deterministic_state(4), name="epoch=0-step=4.ckpt").result(timeout=30)
        ckpt.save(4, deterministic_state(4), name="last.ckpt").result(timeout=30)
        last = ckpt.save(8, deterministic_state(8), name="last.ckpt").result(timeout=30)
    assert first == tmp_path / "epoch=0-step=4.ckpt"
    assert last == tmp_path / "last.ckpt"
    assert ckpt_names(tmp_path) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    loaded = asyncckpt.load(tmp_path / "last.ckpt")
    assert loaded.step == 8
    assert states_equal(loaded.state, deterministic_state(8))


@pytest.mark.parametrize("name", ["../x.ckpt", "a/b.ckpt", ".hidden.ckpt", "model.pt", ".ckpt", "x.ckpt\0"])
def test_a_name_that_is_not_a_plain_ckpt_file_name_is_refused(tmp_path: Path, name: str) -> None:
    with AsyncCheckpointer(tmp_path) as ckpt:
        with pytest.raises(UsageError, match="plain file name"):
            ckpt.save(1, deterministic_state(1), name=name)
        with pytest.raises(UsageError, match="plain file name"):
            ckpt.delete(name)
    assert ckpt_names(tmp_path) == []
    assert not (tmp_path.parent / "x.ckpt").exists()


def test_keep_last_none_deletes_nothing(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path, keep_last=None) as ckpt:
        for step in range(6):
            ckpt.save(step, deterministic_state(step)).result(timeout=30)
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == list(range(6))
    assert "checkpoint.pruned" not in event_names(tmp_path)


def test_a_delete_waits_for_the_saves_queued_before_it(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path, keep_last=None) as ckpt:
        ckpt.save(1, deterministic_state(1), name="old.ckpt").result(timeout=30)
    ops = GatedOps()
    with AsyncCheckpointer(tmp_path, keep_last=None, ops=ops) as ckpt:
        handle = ckpt.save(2, deterministic_state(2), name="new.ckpt")
        ckpt.delete("old.ckpt")
        assert ops.entered.wait(timeout=30)  # the save is stuck in its write
        assert ckpt_names(tmp_path) == ["old.ckpt"]  # so the older checkpoint is still there
        ops.release()
        handle.result(timeout=30)
    assert ckpt_names(tmp_path) == ["new.ckpt"]
    assert event_names(tmp_path)[-2] == "checkpoint.deleted"


def test_a_delete_keeps_the_file_when_an_earlier_save_failed(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path, keep_last=None) as ckpt:
        ckpt.save(1, deterministic_state(1), name="old.ckpt").result(timeout=30)
    ops = FaultyOps("fsync", err=errno.EIO, sticky=True)
    with pytest.raises(CheckpointWriteError), AsyncCheckpointer(tmp_path, keep_last=None, ops=ops) as ckpt:
        handle = ckpt.save(2, deterministic_state(2), name="new.ckpt")
        ckpt.delete("old.ckpt")  # queued while the save may still be running
        handle.wait(timeout=30)
        ckpt.delete("old.ckpt")  # queued after the save failed
    assert ckpt_names(tmp_path) == ["old.ckpt"]
    assert event_names(tmp_path).count("checkpoint.delete_skipped") == 2


def test_a_delete_after_a_later_committed_save_goes_ahead(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path, keep_last=None) as ckpt:
        ckpt.save(1, deterministic_state(1), name="old.ckpt").result(timeout=30)
    ops = FaultyOps("fsync", err=errno.EIO)  # only the first fsync fails
    with AsyncCheckpointer(tmp_path, keep_last=None, ops=ops) as ckpt:
        with pytest.raises(CheckpointWriteError):  # seen through its handle: not raised again
            ckpt.save(2, deterministic_state(2), name="bad.ckpt").result(timeout=30)
        ckpt.save(3, deterministic_state(3), name="new.ckpt")
        ckpt.delete("old.ckpt")
    assert ckpt_names(tmp_path) == ["new.ckpt"]


def test_a_delete_of_a_missing_file_is_not_an_error(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path, keep_last=None) as ckpt:
        ckpt.delete("never-written.ckpt")
    assert "checkpoint.deleted" in event_names(tmp_path)
