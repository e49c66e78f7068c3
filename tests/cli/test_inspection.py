"""What the CLI reads, as plain data: errors carry the path as a field, not in the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncckpt.cli.inspection import inspect_file, kind_of, prelude_report, read_prelude, resume_candidates
from asyncckpt.errors import CorruptedCheckpointError

from .helpers import STEPS, checkpoint


def test_read_prelude_of_a_good_and_a_bad_file(run_dir: Path) -> None:
    assert read_prelude(checkpoint(run_dir, 10)) == ("1.0", None)
    bad = run_dir / "step-0000000040.ckpt"
    bad.write_bytes(b"garbage, not a checkpoint")
    version, error = read_prelude(bad)
    assert version is None and isinstance(error, CorruptedCheckpointError)
    assert error.path == str(bad) and error.reason.startswith("not a checkpoint (bad magic")
    report = prelude_report(bad)
    assert (report.step, report.status, report.reason) == (40, "corrupted", error.reason)


def test_inspect_file_error_carries_the_path(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hi")
    with pytest.raises(CorruptedCheckpointError) as raised:
        inspect_file(path)
    # Two bytes: "truncated", as load says for the same file (docs/FORMAT.md, Reading).
    assert raised.value.path == str(path) and raised.value.reason == "truncated: 2 bytes, not a checkpoint"


def test_resume_candidates_newest_first_without_temp_files(run_dir: Path) -> None:
    (run_dir / ".step-0000000040.ckpt.tmp-1a2b3c4d").write_bytes(b"x")
    found = [entry.path for entry in resume_candidates(run_dir)]
    assert found == [checkpoint(run_dir, step) for step in reversed(STEPS)]
    assert [entry.path for entry in resume_candidates(checkpoint(run_dir, 10))] == [checkpoint(run_dir, 10)]
    assert [kind_of(n) for n in ("step-0000000001.ckpt", "a.pt", ".step-0000000001.ckpt.tmp-ab", "x")] == [
        "checkpoint",
        "legacy",
        "temp",
        None,
    ]
