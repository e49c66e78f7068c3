"""Discovery: which objects are candidates, their steps and their order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asyncckpt import AsyncCheckpointer
from asyncckpt.catalog import checkpoint_name
from asyncckpt.errors import CorruptedCheckpointError, NoValidCheckpointError
from asyncckpt.loading import load_latest
from asyncckpt.loading.candidates import discover
from asyncckpt.storage import PosixFile, PosixStorage
from asyncckpt.storage.posix import temp_name

from .helpers import PruningStorage, make_state, write, write_steps


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
