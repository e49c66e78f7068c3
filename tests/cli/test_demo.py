"""``asyncckpt demo``: trains, resumes, and after a crash ends like an uninterrupted run."""

from __future__ import annotations

import re
from pathlib import Path

import asyncckpt
from asyncckpt.errors import EXIT_FAILURE, EXIT_OK

from .helpers import run, run_module


def final_loss(output: str) -> str:
    match = re.search(r"final loss (\d+\.\d+)", output)
    assert match, output
    return match[1]


def test_demo_trains_then_resumes(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    result = run("demo", directory, "--steps", "6", "--every", "3")
    assert result.exit_code == EXIT_OK, result.output
    assert "trained steps 1-6" in result.stdout
    assert "2 saves (2 committed, 0 failed)" in result.stdout
    assert re.search(
        r"ckpt 6: [\d.]+ MB, write \d+ ms \+ fsync \d+ ms \(\d+ MB/s\), stall [\d.]+ ms", result.stdout
    )
    assert [c.step for c in asyncckpt.list_checkpoints(directory)][-1] == 6
    again = run("demo", directory, "--steps", "6", "--every", "3")
    assert again.exit_code == EXIT_OK, again.output
    assert re.search(r"resume: found \d checkpoints? \(1 valid.*\); resuming from step 6", again.stdout)
    assert "nothing to train: already at step 6" in again.stdout
    more = run("demo", directory, "--steps", "9", "--every", "3")
    assert more.exit_code == EXIT_OK, more.output
    assert "resuming from step 6" in more.stdout
    assert "trained steps 7-9" in more.stdout


def test_demo_refuses_a_file_as_directory(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    result = run("demo", path)
    assert result.exit_code == EXIT_FAILURE
    assert "not a directory" in result.stderr


def test_demo_crash_then_resume_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    first = run_module("demo", crashed, "--steps", "12", "--every", "4", "--crash-at", "10")
    assert first.returncode == 137, first.stdout + first.stderr
    assert "simulated crash at step 10" in first.stdout
    committed = [c.step for c in asyncckpt.list_checkpoints(crashed)]
    assert committed and committed[-1] in (4, 8)
    second = run_module("demo", crashed, "--steps", "12", "--every", "4")
    assert second.returncode == EXIT_OK, second.stdout + second.stderr
    assert f"resuming from step {committed[-1]}" in second.stdout
    assert f"trained steps {committed[-1] + 1}-12" in second.stdout
    reference = run_module("demo", clean, "--steps", "12", "--every", "4")
    assert reference.returncode == EXIT_OK
    assert final_loss(second.stdout) == final_loss(reference.stdout)
    assert run_module("validate", crashed).returncode == EXIT_OK
