"""``asyncckpt ls``: names and preludes only; temp and legacy files marked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

import asyncckpt
from asyncckpt import AsyncCheckpointer
from asyncckpt.errors import EXIT_OK

from .helpers import STEPS, checkpoint, run, state


def test_ls_marks_temp_and_legacy_files(run_dir: Path) -> None:
    torch.save({"w": torch.ones(2)}, run_dir / "model-epoch-3.pth")
    (run_dir / ".step-0000000040.ckpt.tmp-1a2b3c4d").write_bytes(b"half a checkpoint")
    result = run("ls", run_dir)
    assert result.exit_code == EXIT_OK, result.output
    lines = result.stdout.splitlines()

    def row(name: str) -> str:
        return next(line for line in lines if name in line)

    assert re.search(r"│\s+3 .* 0\.x .* model-epoch-3\.pth .* legacy", row("model-epoch-3.pth"))
    assert re.search(r"│\s+40 .* \.step-0000000040\.ckpt\.tmp-1a2b3c4d .* temp", row(".tmp-"))
    for step in STEPS:
        assert re.search(
            rf"│\s+{step} │ \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d │ .*kB │ 1\.0 ", row(f"{step:010d}.ckpt")
        )
    assert "3 checkpoints, 1 legacy, 1 temp file" in result.stdout


def test_ls_json(run_dir: Path) -> None:
    (run_dir / ".step-0000000040.ckpt.tmp-1a2b3c4d").write_bytes(b"x")
    checkpoint(run_dir, 20).write_bytes(b"garbage")
    document = json.loads(run("ls", run_dir, "--json").stdout)
    files = {f["file"]: f for f in document["files"]}
    assert files["step-0000000010.ckpt"]["kind"] == "checkpoint"
    assert files["step-0000000010.ckpt"]["version"] == "1.0"
    assert files["step-0000000010.ckpt"]["problem"] is None
    assert files[".step-0000000040.ckpt.tmp-1a2b3c4d"]["kind"] == "temp"
    assert files[".step-0000000040.ckpt.tmp-1a2b3c4d"]["step"] == 40
    # Fewer than 8 bytes: "truncated", as load says for the same file (docs/FORMAT.md, Reading).
    assert files["step-0000000020.ckpt"]["problem"] == "truncated: 7 bytes, not a checkpoint"
    assert [f["step"] for f in document["files"]] == [10, 20, 30, 40]


def test_named_checkpoints_are_listed_with_the_step_of_their_header(tmp_path: Path) -> None:
    # Issue 17: `AsyncCheckpointer.save(..., name="last.ckpt")` files were missing from ls (and
    # validate predicted an older step than the resume loads).
    with AsyncCheckpointer(tmp_path) as checkpointer:
        checkpointer.save(1, state(1))
        checkpointer.save(5, state(5), name="last.ckpt")

    table = run("ls", tmp_path)
    listing = json.loads(run("ls", tmp_path, "--json").stdout)
    validated = run("validate", tmp_path)

    assert table.exit_code == EXIT_OK
    assert "last.ckpt" in table.stdout and "named (step from its header)" in table.stdout
    assert "2 checkpoints (1 named)" in table.stdout
    named = next(f for f in listing["files"] if f["file"] == "last.ckpt")
    assert named["step"] == 5 and named["kind"] == "named" and named["version"] == "1.0"
    assert validated.exit_code == EXIT_OK and "a resume would load step 5" in validated.stdout
    assert asyncckpt.load_latest(tmp_path, log=lambda *a, **k: None).step == 5


def test_a_broken_named_checkpoint_is_listed_without_a_step(tmp_path: Path) -> None:
    (tmp_path / "last.ckpt").write_bytes(b"ASYNCKPT" + bytes(100))
    listing = json.loads(run("ls", tmp_path, "--json").stdout)
    [entry] = listing["files"]
    assert entry["step"] is None and entry["kind"] == "named" and entry["problem"]
