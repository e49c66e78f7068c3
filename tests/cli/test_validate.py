"""``asyncckpt validate``: --verify full (default) predicts the resume; the others say what they skip."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt.cli import validate as validate_module
from asyncckpt.cli.inspection import resume_candidates
from asyncckpt.cli.validate import Verify
from asyncckpt.errors import EXIT_CHECKPOINT, EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL

from .helpers import STEPS, checkpoint, flip_blob_byte, run, truncate


def test_validate_all_valid_exits_0(run_dir: Path) -> None:
    result = run("validate", run_dir)
    assert result.exit_code == EXIT_OK, result.output
    for step in STEPS:
        assert re.search(rf"{step} .*step-{step:010d}\.ckpt .* 1\.0 .* valid", result.stdout)
    assert "3 checkpoints, all valid" in result.stdout
    assert "(structure and checksums checked)" in result.stdout
    assert "a resume would load step 30" in result.stdout
    assert result.stderr == ""


def test_validate_partial_directory_exits_2(run_dir: Path) -> None:
    truncate(checkpoint(run_dir, 30))
    result = run("validate", run_dir, "--verify", "structure")
    assert result.exit_code == EXIT_PARTIAL, result.output
    assert re.search(r"30 .*step-0000000030\.ckpt .* corrupted .* truncated", result.stdout)
    assert "2 valid, 1 corrupted" in result.stdout
    assert "newest valid: step 20" in result.stdout
    result = run("validate", run_dir)  # the default finds the same, and says what a resume does
    assert result.exit_code == EXIT_PARTIAL, result.output
    assert "2 valid, 1 corrupted" in result.stdout
    assert "a resume would load step 20 (falling back past newer broken ones)" in result.stdout


def test_an_older_broken_checkpoint_exits_2_while_a_resume_loads_the_newest(run_dir: Path) -> None:
    # Issue 17: the code says 2 ("some valid, some not"), the docs said "a resume would fall
    # back". The code stays; the docs and the JSON say both things apart.
    flip_blob_byte(checkpoint(run_dir, 10))
    text = run("validate", run_dir)
    document = json.loads(run("validate", run_dir, "--json").stdout)
    resumed = asyncckpt.load_latest(run_dir, log=lambda *a, **k: None)

    assert text.exit_code == EXIT_PARTIAL and document["exit_code"] == EXIT_PARTIAL
    assert "2 valid, 1 corrupted; a resume would load step 30" in text.stdout
    assert "falling back" not in text.stdout
    assert document["resume_step"] == 30 and document["resume_falls_back"] is False
    assert resumed.step == 30 and resumed.source == "primary"

    truncate(checkpoint(run_dir, 30))
    document = json.loads(run("validate", run_dir, "--json").stdout)
    assert document["resume_step"] == 20 and document["resume_falls_back"] is True


def test_validate_full_reads_checksums_that_the_structure_check_does_not(run_dir: Path) -> None:
    flip_blob_byte(checkpoint(run_dir, 30))
    structure = run("validate", run_dir, "--verify", "structure")
    assert structure.exit_code == EXIT_OK  # structure only: the header is intact
    assert "not checked: tensor data (blob checksums)" in structure.stdout
    for args in ((), ("--verify", "full")):
        result = run("validate", run_dir, *args)
        assert result.exit_code == EXIT_PARTIAL, result.output
        assert "checksum mismatch in model.weight" in result.stdout
        assert "a resume would load step 20 (falling back past newer broken ones)" in result.stdout


def test_validate_all_broken_directory_exits_3(run_dir: Path) -> None:
    for step in STEPS:
        truncate(checkpoint(run_dir, step))
    result = run("validate", run_dir)
    assert result.exit_code == EXIT_CHECKPOINT, result.output
    assert "none valid (3 corrupted); a resume would fail" in result.stdout


def test_validate_single_file(run_dir: Path) -> None:
    assert run("validate", checkpoint(run_dir, 10)).exit_code == EXIT_OK
    flip_blob_byte(checkpoint(run_dir, 20))
    result = run("validate", checkpoint(run_dir, 20))
    assert result.exit_code == EXIT_CHECKPOINT
    assert "corrupted" in result.stdout
    assert run("validate", checkpoint(run_dir, 20), "--verify", "structure").exit_code == EXIT_OK


def test_validate_json_document(run_dir: Path) -> None:
    flip_blob_byte(checkpoint(run_dir, 30))
    result = run("validate", run_dir, "--json")
    assert result.exit_code == EXIT_PARTIAL
    document = json.loads(result.stdout)
    assert set(document) == {
        "path",
        "verify",
        "not_checked",
        "checkpoints",
        "summary",
        "resume_step",
        "resume_file",
        "resume_falls_back",
        "exit_code",
    }
    assert document["verify"] == "full"
    assert document["not_checked"] == []
    assert document["exit_code"] == EXIT_PARTIAL
    assert document["resume_step"] == 20
    assert document["resume_file"] == str(checkpoint(run_dir, 20))
    assert document["resume_falls_back"] is True
    assert [c["step"] for c in document["checkpoints"]] == [30, 20, 10]
    assert [c["status"] for c in document["checkpoints"]] == ["corrupted", "valid", "valid"]
    first = document["checkpoints"][0]
    assert set(first) == {"step", "file", "path", "size", "version", "status", "reason"}
    assert first["file"] == "step-0000000030.ckpt"
    assert first["size"] == checkpoint(run_dir, 30).stat().st_size
    assert "checksum mismatch" in first["reason"]
    assert document["checkpoints"][1]["version"] == "1.0"
    assert document["checkpoints"][1]["reason"] is None
    summary = document["summary"]
    assert (summary["total"], summary["valid"], summary["corrupted"], summary["incompatible"]) == (3, 2, 1, 0)


def test_validate_structure_says_what_it_did_not_check(run_dir: Path) -> None:
    result = run("validate", run_dir, "--verify", "structure")
    assert result.exit_code == EXIT_OK
    assert "(structure checked; tensor data (blob checksums) not checked)" in result.stdout
    assert "--verify full checks what a resume checks" in result.stdout
    document = json.loads(run("validate", run_dir, "--verify", "structure", "--json").stdout)
    assert document["verify"] == "structure"
    assert document["not_checked"] == ["tensor data (blob checksums)"]
    assert "not checked: tensor data (blob checksums)" in document["summary"]["text"]


def test_validate_verify_none_reads_only_preludes(run_dir: Path) -> None:
    flip_blob_byte(checkpoint(run_dir, 30))
    checkpoint(run_dir, 40).write_bytes(b"this is not a checkpoint at all")
    result = run("validate", run_dir, "--verify", "none", "--json")
    document = json.loads(result.stdout)
    statuses = {c["step"]: c["status"] for c in document["checkpoints"]}
    assert statuses == {40: "corrupted", 30: "unchecked", 20: "unchecked", 10: "unchecked"}
    assert result.exit_code == EXIT_PARTIAL
    assert document["verify"] == "none"
    assert document["not_checked"] == ["trailer", "header", "tensor data (blob checksums)"]
    assert document["resume_step"] is None and document["resume_file"] is None
    rows = {c["step"]: c for c in document["checkpoints"]}
    assert rows[40]["reason"].startswith("not a checkpoint (bad magic")  # no path: it has a column
    text = run("validate", run_dir, "--verify", "none")
    assert "(not checked: preludes only)" in text.stdout
    assert "contents not checked (--verify none" in text.stdout


def test_validate_legacy_and_incompatible_files(run_dir: Path) -> None:
    torch.save({"w": torch.ones(2), "step": 5}, run_dir / "old.pt")
    newer = bytearray(checkpoint(run_dir, 30).read_bytes())
    newer[8:24] = b"2.0".ljust(16, b"\0")  # a future major version
    checkpoint(run_dir, 30).write_bytes(bytes(newer))
    document = json.loads(run("validate", run_dir, "--json").stdout)
    rows = {c["file"]: c for c in document["checkpoints"]}
    assert rows["old.pt"]["status"] == "valid" and rows["old.pt"]["version"] == "0.x"
    assert rows["old.pt"]["step"] == 5
    assert rows["step-0000000030.ckpt"]["status"] == "incompatible"
    assert "2.0" in rows["step-0000000030.ckpt"]["reason"]


def test_validate_full_shows_a_progress_bar_on_a_terminal_past_the_threshold(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    flip_blob_byte(checkpoint(run_dir, 30))
    files = resume_candidates(run_dir)
    quiet = validate_module._check_all(files, Verify.full)
    assert "checking" not in capsys.readouterr().err  # small: no bar
    monkeypatch.setattr(validate_module, "PROGRESS_MIN_BYTES", 1)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich draws on the captured stream as on a terminal
    assert validate_module._check_all(files, Verify.full) == quiet
    captured = capsys.readouterr()
    assert "checking step-" in captured.err
    assert captured.out == ""  # stdout stays clean for --json


def test_validate_rejects_an_unknown_verify_value_and_the_old_flags_with_exit_1(run_dir: Path) -> None:
    result = run("validate", run_dir, "--verify", "skip")
    assert result.exit_code == EXIT_FAILURE
    assert "--verify" in result.stderr and "skip" in result.stderr
    for old in ("--full", "--skip-checkpoint-validation"):
        result = run("validate", run_dir, old)
        assert result.exit_code == EXIT_FAILURE
        assert "No such option" in result.stderr


# --------------------------------------------------------------------------- validate predicts the resume


def largest_blob(path: Path) -> tuple[int, fmt.Layout]:
    """The index of the largest blob of a v1 file, and the file's layout."""
    with open(path, "rb", buffering=0) as file:
        assert file.read(len(fmt.MAGIC)) == fmt.MAGIC
        layout = fmt.read_layout(file, str(path))
    return max(range(len(layout.blobs)), key=lambda i: layout.blobs[i].nbytes), layout


def training_state(step: int) -> dict[str, object]:
    generator = torch.Generator().manual_seed(step)
    return {
        "model": {
            "embed": torch.randn(512, 64, generator=generator),
            "head": torch.randn(64, 10, generator=generator),
            "bias": torch.randn(10, generator=generator),
        },
        "step": step,
    }


def test_validate_predicts_what_load_latest_does_with_a_byte_flipped_mid_blob(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    directory.mkdir()
    paths = [
        asyncckpt.save(checkpoint(directory, step), training_state(step), step=step) for step in (1, 2, 3)
    ]
    newest = paths[-1]
    index, layout = largest_blob(newest)
    blob = layout.blobs[index]
    data = bytearray(newest.read_bytes())
    data[blob.offset + blob.nbytes // 2] ^= 0x01  # one bit, in the middle of the largest blob
    newest.write_bytes(bytes(data))

    text = run("validate", directory)
    document = json.loads(run("validate", directory, "--json").stdout)
    structure = run("validate", directory, "--verify", "structure")
    resumed = asyncckpt.load_latest(directory)

    # What the resume does: it skips step 3 (the flipped byte) and loads step 2.
    assert resumed.step == 2 and resumed.path == paths[1] and resumed.source == "fallback"
    [skipped] = resumed.diagnostics
    assert Path(skipped.path) == newest and skipped.kind == "corrupted"

    # validate says the same: exit 2, the file and the blob named, the step it would load.
    assert text.exit_code == EXIT_PARTIAL, text.output
    assert document["exit_code"] == EXIT_PARTIAL
    assert document["resume_step"] == resumed.step
    assert document["resume_file"] == str(resumed.path)
    rows = document["checkpoints"]
    before = rows[: [r["path"] for r in rows].index(str(resumed.path))]
    assert [(Path(r["path"]), r["status"]) for r in before] == [
        (Path(d.path), d.kind) for d in resumed.diagnostics
    ]
    assert before[0]["reason"] == skipped.reason
    assert f"blob {index}" in before[0]["reason"] and layout.blob_key(index) in before[0]["reason"]
    assert "a resume would load step 2 (falling back past newer broken ones)" in text.stdout
    summary = document["summary"]["text"]
    assert f"skipping {newest.name}: checksum mismatch in {layout.blob_key(index)} (blob {index}" in summary
    assert newest.name in text.stdout and f"blob {index}" in text.stdout

    # The structure check cannot see the flip, and says so instead of claiming a resume.
    assert structure.exit_code == EXIT_OK
    assert "not checked: tensor data (blob checksums)" in structure.stdout
    assert "a resume would" not in structure.stdout
