"""The command line, run through its real entry points: typer's runner and ``python -m asyncckpt``."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import asyncckpt
from asyncckpt.cli import app
from asyncckpt.errors import EXIT_CHECKPOINT, EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL
from asyncckpt.events import EventLog
from asyncckpt.format import DATA_OFFSET

STEPS = (10, 20, 30)
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


def run(*args: str | Path) -> Any:
    """Invoke the CLI in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def run_module(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m asyncckpt`` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "asyncckpt", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **ENV},
    )


def state(step: int) -> dict[str, Any]:
    return {
        "model": {"weight": torch.full((4, 3), float(step)), "bias": torch.zeros(3, dtype=torch.float16)},
        "lr": 0.125,
        "betas": (0.9, 0.999),
        "step": step,
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Three valid checkpoints (steps 10, 20, 30) and an events file."""
    directory = tmp_path / "run"
    directory.mkdir()
    for step in STEPS:
        asyncckpt.save(directory / f"step-{step:010d}.ckpt", state(step), step=step, metadata={"run": "t"})
    log = EventLog(directory / "events.jsonl")
    log.info("checkpoint.writer.started", directory=str(directory))
    log.info("checkpoint.save.committed", step=10, bytes=1234, write_ms=1.5)
    log.warning("checkpoint.save.skipped", step=15, reason="all 1 staging slots busy")
    log.error("checkpoint.save.failed", step=20, error="disk full")
    log.close()
    return directory


def checkpoint(directory: Path, step: int) -> Path:
    return directory / f"step-{step:010d}.ckpt"


def flip_blob_byte(path: Path) -> None:
    """Corrupt tensor bytes only: the structure still reads, a checksum does not match."""
    data = bytearray(path.read_bytes())
    data[DATA_OFFSET] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    """Corrupt the structure: the trailer is gone."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --------------------------------------------------------------------------- validate


def test_validate_all_valid_exits_0(run_dir: Path) -> None:
    result = run("validate", run_dir)
    assert result.exit_code == EXIT_OK, result.output
    for step in STEPS:
        assert re.search(rf"{step} .*step-{step:010d}\.ckpt .* 1\.0 .* valid", result.stdout)
    assert "3 checkpoints, all valid" in result.stdout
    assert result.stderr == ""


def test_validate_partial_directory_exits_2(run_dir: Path) -> None:
    truncate(checkpoint(run_dir, 30))
    result = run("validate", run_dir)
    assert result.exit_code == EXIT_PARTIAL, result.output
    assert re.search(r"30 .*step-0000000030\.ckpt .* corrupted .* truncated", result.stdout)
    assert "2 valid, 1 corrupted" in result.stdout
    assert "newest valid: step 20" in result.stdout


def test_validate_full_reads_checksums_that_the_structure_check_does_not(run_dir: Path) -> None:
    flip_blob_byte(checkpoint(run_dir, 30))
    assert run("validate", run_dir).exit_code == EXIT_OK  # structure only: the header is intact
    result = run("validate", run_dir, "--full")
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
    assert run("validate", checkpoint(run_dir, 10), "--full").exit_code == EXIT_OK
    flip_blob_byte(checkpoint(run_dir, 20))
    result = run("validate", checkpoint(run_dir, 20), "--full")
    assert result.exit_code == EXIT_CHECKPOINT
    assert "corrupted" in result.stdout


def test_validate_json_document(run_dir: Path) -> None:
    flip_blob_byte(checkpoint(run_dir, 30))
    result = run("validate", run_dir, "--full", "--json")
    assert result.exit_code == EXIT_PARTIAL
    document = json.loads(result.stdout)
    assert set(document) == {"path", "mode", "checkpoints", "summary", "resume_step", "exit_code"}
    assert document["mode"] == "full"
    assert document["exit_code"] == EXIT_PARTIAL
    assert document["resume_step"] == 20
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


def test_validate_skip_checkpoint_validation_reads_only_preludes(run_dir: Path) -> None:
    flip_blob_byte(checkpoint(run_dir, 30))
    checkpoint(run_dir, 40).write_bytes(b"this is not a checkpoint at all")
    result = run("validate", run_dir, "--skip-checkpoint-validation", "--json")
    document = json.loads(result.stdout)
    statuses = {c["step"]: c["status"] for c in document["checkpoints"]}
    assert statuses == {40: "corrupted", 30: "unchecked", 20: "unchecked", 10: "unchecked"}
    assert result.exit_code == EXIT_PARTIAL


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
    from asyncckpt import cli
    from asyncckpt.inspection import resume_candidates

    flip_blob_byte(checkpoint(run_dir, 30))
    files = resume_candidates(run_dir)
    quiet = cli._check_all(files, "full")
    assert "checking" not in capsys.readouterr().err  # small: no bar
    monkeypatch.setattr(cli, "PROGRESS_MIN_BYTES", 1)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich draws on the captured stream as on a terminal
    assert cli._check_all(files, "full") == quiet
    captured = capsys.readouterr()
    assert "checking step-" in captured.err
    assert captured.out == ""  # stdout stays clean for --json


def test_validate_rejects_both_modes_with_exit_1(run_dir: Path) -> None:
    result = run("validate", run_dir, "--full", "--skip-checkpoint-validation")
    assert result.exit_code == EXIT_FAILURE
    assert "exclude each other" in result.stderr


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("command", ["validate", "ls", "inspect", "logs"])
def test_missing_path_is_one_line_exit_1(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "nowhere"
    result = run(command, missing)
    assert result.exit_code == EXIT_FAILURE
    assert result.stderr.strip() == f"error: {missing}: no such file or directory"
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for args in (["validate", missing, "--debug"], ["--debug", "validate", missing]):
        result = run(*args)
        assert result.exit_code == EXIT_FAILURE
        assert "Traceback" in result.stderr
        assert f"error: {missing}: no such file or directory" in result.stderr


def test_directory_without_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    for command in ("validate", "ls"):
        result = run(command, tmp_path)
        assert result.exit_code == EXIT_CHECKPOINT, command
        assert f"error: {tmp_path}: no checkpoints" in result.stderr


def test_non_checkpoint_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is text")
    result = run("inspect", path)
    assert result.exit_code == EXIT_CHECKPOINT
    assert result.stderr.strip().startswith(f"error: {path}: not a checkpoint (bad magic")
    assert len(result.stderr.strip().splitlines()) == 1
    assert run("validate", path).exit_code == EXIT_CHECKPOINT


def test_unreadable_file(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = checkpoint(run_dir, 10)

    def refuse(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *args, **kwargs)

    # Root reads every file whatever its mode, so the refusal is injected where the CLI opens files.
    monkeypatch.setattr("asyncckpt.inspection.open", refuse, raising=False)
    monkeypatch.setattr("asyncckpt.loader.open", refuse, raising=False)
    result = run("inspect", path)
    assert result.exit_code == EXIT_FAILURE
    assert result.stderr.strip() == f"error: {path}: Permission denied"
    result = run("validate", path)  # like a resume, validate counts it as a broken candidate
    assert result.exit_code == EXIT_CHECKPOINT
    assert "cannot be opened: Permission denied" in result.stdout
    assert run("validate", run_dir).exit_code == EXIT_PARTIAL


def test_usage_errors_exit_1_not_2(run_dir: Path) -> None:
    assert run("validate").exit_code == EXIT_FAILURE
    assert run("no-such-command").exit_code == EXIT_FAILURE
    assert run("logs", run_dir, "--level", "loud").exit_code == EXIT_FAILURE


def test_ls_and_inspect_refuse_the_wrong_kind_of_path(run_dir: Path) -> None:
    result = run("ls", checkpoint(run_dir, 10))
    assert result.exit_code == EXIT_FAILURE and "not a directory" in result.stderr
    result = run("inspect", run_dir)
    assert result.exit_code == EXIT_FAILURE and "is a directory" in result.stderr


# --------------------------------------------------------------------------- ls


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


# --------------------------------------------------------------------------- inspect


def test_inspect_shows_metadata_tensor_table_and_plain_values(run_dir: Path) -> None:
    result = run("inspect", checkpoint(run_dir, 20))
    assert result.exit_code == EXIT_OK, result.output
    out = result.stdout
    assert re.search(r"format\s+1\.0", out)
    assert re.search(r"step\s+20", out)
    assert re.search(r'metadata\s+\{"run": "t"\}', out)
    assert re.search(r"model\.weight\s+│ float32\s+│ \[4, 3\]\s+│\s+48 │", out)
    assert re.search(r"model\.bias\s+│ float16\s+│ \[3\]\s+│\s+6 │", out)
    assert "lr: 0.125" in out
    assert "betas: (0.9, 0.999)" in out
    assert "model: 2 tensors" in out


def test_inspect_json(run_dir: Path) -> None:
    document = json.loads(run("inspect", checkpoint(run_dir, 10), "--json").stdout)
    assert document["step"] == 10 and document["version"] == "1.0"
    assert document["metadata"] == {"run": "t"}
    assert document["tensors"][0] == {"key": "model.weight", "dtype": "float32", "shape": [4, 3], "bytes": 48}
    assert document["tree"]["lr"] == 0.125
    assert document["tree"]["model"]["weight"] == {"tensor": 0}


def test_inspect_legacy_file(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2, 5, dtype=torch.float64), "global_step": 7, "name": "x"}, path)
    result = run("inspect", path)
    assert result.exit_code == EXIT_OK, result.output
    assert "0.x (legacy torch.save)" in result.stdout
    assert re.search(r"step\s+7", result.stdout)
    assert re.search(r"w\s+│ float64\s+│ \[2, 5\]\s+│\s+80 │", result.stdout)


def test_inspect_truncated_file_exits_3(run_dir: Path) -> None:
    truncate(checkpoint(run_dir, 10))
    result = run("inspect", checkpoint(run_dir, 10))
    assert result.exit_code == EXIT_CHECKPOINT
    assert "truncated" in result.stderr
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- logs


def test_logs_renders_console_lines(run_dir: Path) -> None:
    result = run("logs", run_dir)
    assert result.exit_code == EXIT_OK, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert re.match(
        r"^\d{4}-\d\d-\d\dT\S+Z \[info\s+\] checkpoint\.save\.committed\s+step=10 bytes=1234", lines[1]
    )
    assert "[warning  ] checkpoint.save.skipped" in lines[2]
    assert "reason='all 1 staging slots busy'" in lines[2]
    assert "[error    ] checkpoint.save.failed" in lines[3]
    assert "\x1b[" not in result.stdout  # no colors when not a terminal


def test_logs_filters_by_event_glob_and_level(run_dir: Path) -> None:
    names = lambda result: [json.loads(line)["event"] for line in result.stdout.splitlines()]  # noqa: E731
    assert names(run("logs", run_dir, "--json", "--event", "checkpoint.save.*")) == [
        "checkpoint.save.committed",
        "checkpoint.save.skipped",
        "checkpoint.save.failed",
    ]
    assert names(run("logs", run_dir, "--json", "-e", "*.skipped", "-e", "*.started")) == [
        "checkpoint.writer.started",
        "checkpoint.save.skipped",
    ]
    assert names(run("logs", run_dir, "--json", "--level", "warning")) == [
        "checkpoint.save.skipped",
        "checkpoint.save.failed",
    ]


def test_logs_skips_lines_that_are_not_json_and_the_half_written_last_line(run_dir: Path) -> None:
    events = run_dir / "events.jsonl"
    with events.open("a") as file:
        file.write('not json\n{"event": "checkpoint.pruned", "level": "info"}\n{"event": "half')
    result = run("logs", run_dir, "--json")
    assert result.exit_code == EXIT_OK
    assert json.loads(result.stdout.splitlines()[-1])["event"] == "checkpoint.pruned"
    assert "half" not in result.stdout
    assert "skipped a line that is not a JSON object: not json" in result.stderr


def test_logs_directory_without_events_file(tmp_path: Path) -> None:
    result = run("logs", tmp_path)
    assert result.exit_code == EXIT_FAILURE
    assert "no events.jsonl" in result.stderr


def test_logs_follow_in_process_stops_on_its_hooks(run_dir: Path) -> None:
    result = run("logs", run_dir, "--follow", "--json", "--max-lines", "2")
    assert result.exit_code == EXIT_OK
    assert len(result.stdout.splitlines()) == 2
    result = run("logs", run_dir, "--follow", "--json", "--idle-timeout", "0.1", "--poll-interval", "0.01")
    assert result.exit_code == EXIT_OK
    assert len(result.stdout.splitlines()) == 4


class LineReader:
    """Reads a child's stdout in a thread so the test can wait for a line with a deadline."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(process,), daemon=True)
        self.thread.start()

    def _pump(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout: float = 60.0) -> str:
        line = self.lines.get(timeout=timeout)
        assert line is not None, "the follower exited"
        return line


@pytest.fixture
def follower(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], LineReader]]:
    events = tmp_path / "events.jsonl"
    events.touch()
    process = subprocess.Popen(
        [sys.executable, "-m", "asyncckpt", "logs", str(events), "--follow", "--json"]
        + ["--poll-interval", "0.02", "--max-lines", "4", "--idle-timeout", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ENV},
    )
    yield process, LineReader(process)
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def event_line(name: str, **fields: Any) -> str:
    return json.dumps({"event": name, "level": "info", "timestamp": "2024-01-01T00:00:00Z", **fields})


def test_logs_follow_survives_half_lines_truncation_and_recreation(
    tmp_path: Path, follower: tuple[subprocess.Popen[str], LineReader]
) -> None:
    process, reader = follower
    events = tmp_path / "events.jsonl"
    writer = subprocess.Popen(
        [sys.executable, "-c", APPENDER, str(events)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def write(op: str, text: str) -> None:
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.write(json.dumps([op, text]) + "\n")
        writer.stdin.flush()
        assert writer.stdout.readline() == "ok\n"

    a, b = event_line("checkpoint.save.staged", step=1), event_line("checkpoint.save.committed", step=1)
    c, d = event_line("c", step=2), event_line("d", step=3)
    try:
        write("append", a + "\n" + b[:25])  # one whole line and the first part of the next
        assert reader.next() == a  # the follower has read the file, half line included
        write("append", b[25:] + "\n")
        assert reader.next() == b  # printed once, whole
        write("truncate", c + "\n")  # shorter than before: the follower starts from the top
        assert reader.next() == c
        write("replace", d + "\n")  # a new file under the same name
        assert reader.next() == d
    finally:
        assert writer.stdin is not None
        writer.stdin.close()
        writer.wait(timeout=30)
    assert process.wait(timeout=60) == EXIT_OK  # --max-lines 4
    assert reader.lines.get(timeout=30) is None  # nothing else was printed


def test_logs_follow_waits_for_the_events_file_of_a_directory(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "asyncckpt", "logs", str(tmp_path), "--follow", "--json", "--max-lines", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ENV},
    )
    try:
        assert process.stderr is not None and process.stdout is not None
        assert process.stderr.readline().strip() == f"waiting for {tmp_path / 'events.jsonl'} to appear"
        line = event_line("checkpoint.writer.started")
        (tmp_path / "events.jsonl").write_text(line + "\n")
        assert process.stdout.readline().rstrip("\n") == line
        assert process.wait(timeout=60) == EXIT_OK
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


APPENDER = r"""
import json, os, sys
path = sys.argv[1]
for command in sys.stdin:
    op, text = json.loads(command)
    data = text.encode()
    if op == "append":
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.write(fd, data)
        os.close(fd)
    elif op == "truncate":
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(data)
    elif op == "replace":
        with open(path + ".new", "wb") as f:
            f.write(data)
        os.replace(path + ".new", path)
    print("ok", flush=True)
"""


# --------------------------------------------------------------------------- demo


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
    assert run_module("validate", crashed, "--full").returncode == EXIT_OK


# --------------------------------------------------------------------------- entry points


def test_python_m_asyncckpt_validate_partial_and_json(run_dir: Path) -> None:
    flip_blob_byte(checkpoint(run_dir, 30))
    result = run_module("validate", run_dir, "--full", "--json")
    assert result.returncode == EXIT_PARTIAL
    assert json.loads(result.stdout)["summary"]["corrupted"] == 1
    missing = run_module("ls", run_dir / "nowhere")
    assert missing.returncode == EXIT_FAILURE
    assert missing.stderr.strip() == f"error: {run_dir / 'nowhere'}: no such file or directory"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "asyncckpt"
    if not script.exists():
        pytest.skip("the package is not installed with its console script")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_OK
    assert result.stdout.strip() == f"asyncckpt {asyncckpt.__version__}"
