"""check_candidates: check-only verification with the resume's own rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from asyncckpt import reader as reader_module
from asyncckpt.catalog import checkpoint_name
from asyncckpt.cli import app
from asyncckpt.errors import EXIT_CHECKPOINT, CorruptedCheckpointError, NoValidCheckpointError, UsageError
from asyncckpt.loading import FAILED_LOG_NAME, check_candidates, load_latest
from asyncckpt.loading import verify as verify_module
from asyncckpt.storage import PosixFile

from .helpers import PruningStorage, Recorder, flip_blob_byte, truncate, write, write_steps


def test_check_candidates_reports_every_file(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200, 300)
    flip_blob_byte(paths[1])
    data = bytearray(paths[2].read_bytes())
    data[8:24] = b"3.1".ljust(16, b"\0")
    paths[2].write_bytes(bytes(data))
    torch.save({"step": 150}, tmp_path / "old.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "nostep.pt")
    full = check_candidates(tmp_path, verify="full")
    assert [(r.step, r.path.name, r.status, r.version) for r in full] == [
        (300, paths[2].name, "incompatible", None),
        (200, paths[1].name, "corrupted", None),
        (150, "old.pt", "valid", "0.x"),
        (100, paths[0].name, "valid", "1.0"),
        (None, "nostep.pt", "incompatible", None),  # a resume cannot use it (issue 17, item 5)
    ]
    assert full[0].reason is not None and "format 3.1" in full[0].reason
    assert full[1].reason is not None and "checksum mismatch in model.layers.0.weight" in full[1].reason
    assert full[3].reason is None and full[3].size == paths[0].stat().st_size
    quick = check_candidates(tmp_path, verify="structure")
    assert [r.status for r in quick] == ["incompatible", "valid", "valid", "valid", "incompatible"]
    assert not (tmp_path / FAILED_LOG_NAME).exists()


def test_check_candidates_checks_one_file(tmp_path: Path) -> None:
    path = write(tmp_path, 42)
    [report] = check_candidates(path, verify="full")
    assert (report.step, report.status, report.version) == (42, "valid", "1.0")
    truncate(path, 9000)
    [report] = check_candidates(path, verify="structure")
    assert report.status == "corrupted" and report.reason is not None and "truncated" in report.reason


def test_check_candidates_of_a_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        check_candidates(tmp_path / "nope.ckpt", verify="full")


def test_check_candidates_verifies_fully_by_default_and_refuses_other_values(tmp_path: Path) -> None:
    path = write(tmp_path, 42)
    flip_blob_byte(path)
    [report] = check_candidates(path)
    assert report.status == "corrupted"
    with pytest.raises(UsageError, match="'full' or 'structure'"):
        check_candidates(path, verify="none")  # type: ignore[arg-type]


def test_a_checksum_mismatch_is_found_by_full_only_and_named(tmp_path: Path) -> None:
    [path] = write_steps(tmp_path, 100)
    offset = flip_blob_byte(path, "model.layers.1.weight")
    [quick] = check_candidates(tmp_path, verify="structure")
    [report] = check_candidates(tmp_path)
    assert quick.status == "valid"
    assert report.status == "corrupted" and report.reason is not None
    assert report.reason.startswith("checksum mismatch in model.layers.1.weight")
    assert f"at offset {offset - 5}" in report.reason and str(path) not in report.reason


def test_a_file_named_for_another_step_is_incompatible_as_on_resume(tmp_path: Path) -> None:
    # Issue 17, item 3: step-0000000900.ckpt whose header says step 100 (a copied file).
    write(tmp_path, 500)
    copied = tmp_path / checkpoint_name(900)
    copied.write_bytes(write(tmp_path, 100).read_bytes())
    (tmp_path / checkpoint_name(100)).unlink()
    reports = check_candidates(tmp_path)
    assert [(r.step, r.path.name, r.status) for r in reports] == [
        (900, copied.name, "incompatible"),
        (500, checkpoint_name(500), "valid"),
    ]
    reason = "the file name says step 900 but the checkpoint holds step 100 (a copied or renamed file?)"
    assert reports[0].reason == reason
    [single] = check_candidates(copied, verify="structure")
    assert (single.step, single.status, single.reason) == (900, "incompatible", reason)
    result = load_latest(tmp_path, log=Recorder())
    assert (result.step, result.source) == (500, "fallback")
    [diagnostic] = result.diagnostics
    assert (diagnostic.path, diagnostic.kind, diagnostic.reason, diagnostic.step) == (
        str(copied),
        "incompatible",
        reason,
        900,
    )


def test_a_lone_legacy_file_without_a_step_gets_the_resumes_answer(tmp_path: Path) -> None:
    # Issue 17, item 5: one answer, "no usable checkpoint", from both (test_candidates.py).
    torch.save({"weights": torch.ones(2)}, tmp_path / "weights.pt")
    [report] = check_candidates(tmp_path)
    [single] = check_candidates(tmp_path / "weights.pt")
    with pytest.raises(NoValidCheckpointError) as caught:
        load_latest(tmp_path, log=Recorder())
    [diagnostic] = caught.value.diagnostics
    for found in (report, single):
        assert (found.step, found.status, found.reason) == (None, diagnostic.kind, diagnostic.reason)


def test_a_file_pruned_while_checking_is_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_steps(tmp_path, 100, 200, 300)
    storage = PruningStorage(tmp_path, {checkpoint_name(200)})
    monkeypatch.setattr(verify_module, "open_target", lambda *_, **__: (storage, None))
    reports = check_candidates(tmp_path)
    assert [(r.step, r.status) for r in reports] == [(300, "valid"), (100, "valid")]
    assert not (tmp_path / FAILED_LOG_NAME).exists()


def test_a_single_file_pruned_while_checking_raises_file_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [path] = write_steps(tmp_path, 100)
    storage = PruningStorage(tmp_path, set())
    monkeypatch.setattr(verify_module, "open_target", lambda *_, **__: (storage, path.name))
    storage.prune.add(path.name)
    with pytest.raises(FileNotFoundError):
        check_candidates(path)
    write_steps(tmp_path, 100)
    storage.opened.clear()
    original = storage.open

    def open_then_prune(name: str) -> PosixFile:
        if storage.opened:  # the probe read it; the check finds it gone
            storage.prune.add(name)
        return original(name)

    monkeypatch.setattr(storage, "open", open_then_prune)
    with pytest.raises(FileNotFoundError, match="removed while it was checked"):
        check_candidates(path)


def test_legacy_files_go_through_the_verification_hook_on_full_checks_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.save({"step": 7, "w": torch.ones(3)}, tmp_path / "a.pt")
    calls: list[str] = []

    def verify_legacy(handle: Any, kind: Any, where: str) -> bool:
        calls.append(where)
        raise CorruptedCheckpointError("checksum mismatch in legacy torch.save member 'x'", path=where)

    monkeypatch.setattr(reader_module, "_verify_legacy", verify_legacy)
    [quick] = check_candidates(tmp_path, verify="structure")
    assert (quick.step, quick.status, quick.version) == (7, "valid", "0.x") and calls == []
    [full] = check_candidates(tmp_path)
    assert (full.status, full.reason) == ("corrupted", "checksum mismatch in legacy torch.save member 'x'")
    assert calls == [str(tmp_path / "a.pt")]


def test_asyncckpt_validate_agrees_with_the_resume(tmp_path: Path) -> None:
    # The CLI checks file by file: the same rules hold for a single file as for a directory.
    write(tmp_path, 500)
    copied = tmp_path / checkpoint_name(900)
    copied.write_bytes(write(tmp_path, 100).read_bytes())
    (tmp_path / checkpoint_name(100)).unlink()
    document = json.loads(CliRunner().invoke(app, ["validate", str(tmp_path), "--json"]).stdout)
    rows = [(row["step"], row["status"]) for row in document["checkpoints"]]
    assert rows == [(900, "incompatible"), (500, "valid")]
    assert document["resume_step"] == load_latest(tmp_path, log=Recorder()).step == 500
    lone = tmp_path / "lone"
    lone.mkdir()
    torch.save({"weights": torch.ones(2)}, lone / "weights.pt")
    result = CliRunner().invoke(app, ["validate", str(lone)])
    assert result.exit_code == EXIT_CHECKPOINT and "a resume would fail" in result.stdout
    with pytest.raises(NoValidCheckpointError):
        load_latest(lone, log=Recorder())
