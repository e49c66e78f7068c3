"""Discovery: which objects are candidates, their steps and their order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import asyncckpt
from asyncckpt import AsyncCheckpointer
from asyncckpt.catalog import checkpoint_name
from asyncckpt.errors import CorruptedCheckpointError, NoValidCheckpointError
from asyncckpt.loading import check_candidates, load_latest
from asyncckpt.loading.candidates import discover
from asyncckpt.storage import PosixFile, PosixStorage
from asyncckpt.storage.temps import temp_name

from .helpers import PruningStorage, assert_same_state, make_state, truncate, write, write_steps


def test_temp_files_and_symlinks_are_never_candidates(tmp_path: Path) -> None:
    write_steps(tmp_path, 100)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    newer = write(outside, 900)
    temp = temp_name(tmp_path / checkpoint_name(800))
    temp.write_bytes(newer.read_bytes())
    (tmp_path / checkpoint_name(700)).symlink_to(newer)
    (tmp_path / "link_600.pt").symlink_to(newer)
    result = load_latest(tmp_path)
    assert (result.step, result.source) == (100, "primary")
    assert result.summary.startswith("found 1 checkpoint (1 valid)")
    assert temp.read_bytes() == newer.read_bytes()


def test_a_legacy_step_can_come_from_the_file_name(tmp_path: Path) -> None:
    write_steps(tmp_path, 100)
    torch.save(make_state(7)["model"], tmp_path / "ckpt_500.pth")
    result = load_latest(tmp_path)
    assert (result.step, result.version) == (500, "0.x")


def test_a_legacy_file_without_a_step_is_a_candidate_tried_last(tmp_path: Path) -> None:
    write_steps(tmp_path, 100)
    torch.save({"weights": torch.ones(2)}, tmp_path / "weights.pt")
    result = load_latest(tmp_path)
    assert result.step == 100 and result.diagnostics == []
    assert result.summary == "found 2 checkpoints (1 valid, 1 not checked); resuming from step 100"


def test_a_lone_legacy_file_without_a_step_is_no_usable_checkpoint(tmp_path: Path) -> None:
    # Issue 17, item 5: the resume and check_candidates give one answer (test_verify.py): the
    # file is diagnosed incompatible, never loaded and never silently ignored for a fresh start.
    torch.save({"weights": torch.ones(2)}, tmp_path / "weights.pt")
    with pytest.raises(NoValidCheckpointError) as caught:
        load_latest(tmp_path)
    [diagnostic] = caught.value.diagnostics
    assert (Path(diagnostic.path).name, diagnostic.kind) == ("weights.pt", "incompatible")
    assert diagnostic.step is None
    assert diagnostic.reason.startswith("legacy torch.save file without a step")
    assert "no usable checkpoint: weights.pt incompatible: legacy torch.save file without a step" in str(
        caught.value
    )
    with AsyncCheckpointer(tmp_path) as ckpt, pytest.raises(NoValidCheckpointError):
        ckpt.restore({"model": torch.nn.Linear(2, 2)})  # not a fresh start: the file is there


def test_discovery_order_and_steps(tmp_path: Path) -> None:
    write_steps(tmp_path, 5, 300)
    torch.save({"step": 300}, tmp_path / "same_step.pt")
    torch.save({"global_step": 40}, tmp_path / "model_900.pt")  # the content's step wins
    torch.save({"w": torch.ones(1)}, tmp_path / "b.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "a.pth")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    found = discover(PosixStorage(tmp_path))
    assert [(c.name, c.step, c.named_step) for c in found] == [
        (checkpoint_name(300), 300, 300),
        ("same_step.pt", 300, None),
        ("model_900.pt", 40, None),
        (checkpoint_name(5), 5, 5),
        ("a.pth", None, None),
        ("b.pt", None, None),
    ]
    assert all(c.error is None and c.where == str(tmp_path / c.name) for c in found)
    assert [c.label for c in found[-2:]] == ["a.pth", "b.pt"]


def test_a_legacy_file_pruned_while_it_is_probed_is_no_candidate(tmp_path: Path) -> None:
    write_steps(tmp_path, 100)
    torch.save({"step": 200}, tmp_path / "old_200.pt")
    storage = PruningStorage(tmp_path, {"old_200.pt"})
    assert [c.name for c in discover(storage)] == [checkpoint_name(100)]
    assert storage.opened == ["old_200.pt"]


def test_a_broken_legacy_file_keeps_its_error_and_its_named_step(tmp_path: Path) -> None:
    (tmp_path / "model_900.pt").write_bytes(b"PK\x03\x04" + bytes(100))
    [candidate] = discover(PosixStorage(tmp_path))
    assert candidate.step == 900 and candidate.size == 104
    assert isinstance(candidate.error, CorruptedCheckpointError)
    assert candidate.error.path == str(tmp_path / "model_900.pt")
    assert candidate.error.reason.startswith("legacy torch.save file refused")


def test_an_object_the_storage_refuses_to_open_is_a_diagnosed_candidate(tmp_path: Path) -> None:
    # A store that commits with a record raises CorruptedCheckpointError from open() when the
    # record is damaged: the candidate carries that error, discovery goes on.
    torch.save({"step": 7}, tmp_path / "model_7.pt")
    write_steps(tmp_path, 5)

    class DamagedRecords(PosixStorage):
        def open(self, name: str) -> PosixFile:
            if name == "model_7.pt":
                raise CorruptedCheckpointError("commit record checksum mismatch", path=self.where(name))
            return super().open(name)

    storage = DamagedRecords(tmp_path)
    [legacy, v1] = discover(storage)
    assert (legacy.step, v1.step) == (7, 5)
    assert isinstance(legacy.error, CorruptedCheckpointError)
    assert legacy.error.reason == "commit record checksum mismatch"


def write_named(directory: Path, name: str, step: int, *, mtime_ns: int) -> Path:
    path = directory / name
    asyncckpt.save(path, make_state(step), step=step)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def test_any_ckpt_file_is_a_candidate_with_its_step_read_from_its_header(tmp_path: Path) -> None:
    write_named(tmp_path, "epoch=0-step=4.ckpt", 4, mtime_ns=1_000)
    write_named(tmp_path, "epoch=1-step=8.ckpt", 8, mtime_ns=2_000)
    newest = write_named(tmp_path, "last.ckpt", 8, mtime_ns=3_000)  # the same step, written later
    write(tmp_path, 6)
    result = load_latest(tmp_path)
    assert (result.step, result.path, result.source) == (8, newest, "primary")
    assert_same_state(result.state, make_state(8))
    reports = check_candidates(tmp_path, verify="full")
    assert [(r.path.name, r.step) for r in reports] == [
        ("last.ckpt", 8),
        ("epoch=1-step=8.ckpt", 8),
        ("step-0000000006.ckpt", 6),
        ("epoch=0-step=4.ckpt", 4),
    ]


def test_a_broken_named_checkpoint_falls_back_with_its_diagnosis(tmp_path: Path) -> None:
    write_named(tmp_path, "epoch=0-step=4.ckpt", 4, mtime_ns=1_000)
    broken = write_named(tmp_path, "epoch=1-step=8.ckpt", 8, mtime_ns=2_000)
    truncate(broken, os.path.getsize(broken) // 2)
    result = load_latest(tmp_path)
    assert (result.step, result.source) == (4, "fallback")
    [diagnostic] = result.diagnostics
    assert diagnostic.path == str(broken)
    assert diagnostic.kind == "corrupted"
