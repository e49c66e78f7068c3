"""Exit codes and error lines: usage errors exit 1, checkpoint problems 3, --debug, the entry points."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import asyncckpt
from asyncckpt.cli.exits import Group, existing, os_error_text, reports_errors
from asyncckpt.errors import (
    EXIT_CHECKPOINT,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PARTIAL,
    CorruptedCheckpointError,
    UsageError,
)
from asyncckpt.storage import PosixFile, PosixStorage

from .helpers import ENV, checkpoint, flip_blob_byte, run, run_module

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

    def refuse_storage(self: PosixStorage, name: str) -> PosixFile:
        if self.path(name) == path:
            raise PermissionError(13, "Permission denied", str(path))
        return open_file(self, name)

    # Root reads every file whatever its mode, so the refusal is injected where the CLI opens files.
    open_file = PosixStorage.open
    monkeypatch.setattr("asyncckpt.cli.inspection.open", refuse, raising=False)
    monkeypatch.setattr(PosixStorage, "open", refuse_storage)
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


# --------------------------------------------------------------------------- the mapping itself


def one_command_app(error: BaseException) -> typer.Typer:
    """An app whose only command raises ``error`` through :func:`reports_errors`."""
    app = typer.Typer(cls=Group, add_completion=False)

    @app.command()
    @reports_errors
    def fails(debug: bool = False) -> None:
        raise error

    @app.command()
    def other() -> None:  # a second command, so that typer keeps the command names
        pass

    return app


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (UsageError("bad option", path="/x"), EXIT_FAILURE, "error: /x: bad option"),
        (CorruptedCheckpointError("truncated", path="/x", offset=7), EXIT_CHECKPOINT, "error: /x: truncated"),
        (PermissionError(13, "Permission denied", "/x"), EXIT_FAILURE, "error: /x: Permission denied"),
        (ValueError("boom"), EXIT_FAILURE, "error: unexpected error: ValueError: boom (--debug shows"),
    ],
)
def test_errors_map_to_their_exit_code_and_one_line(error: BaseException, code: int, line: str) -> None:
    result = CliRunner().invoke(one_command_app(error), ["fails"], env=ENV)
    assert result.exit_code == code
    assert result.stderr.startswith(line)
    assert len(result.stderr.strip().splitlines()) == 1
    debug = CliRunner().invoke(one_command_app(error), ["fails", "--debug"], env=ENV)
    assert debug.exit_code == code and "Traceback" in debug.stderr


def test_os_error_text_and_existing(tmp_path: Path) -> None:
    assert (
        os_error_text(FileNotFoundError(2, "No such file or directory", "/a"))
        == "/a: No such file or directory"
    )
    assert os_error_text(OSError("plain")) == "plain"
    assert existing(tmp_path) == tmp_path
    with pytest.raises(UsageError) as raised:
        existing(tmp_path / "nowhere")
    assert raised.value.reason == "no such file or directory"
    assert raised.value.path == str(tmp_path / "nowhere")
    assert raised.value.exit_code == EXIT_FAILURE


# --------------------------------------------------------------------------- entry points


def test_python_m_asyncckpt_validate_partial_and_json(run_dir: Path) -> None:
    flip_blob_byte(checkpoint(run_dir, 30))
    result = run_module("validate", run_dir, "--json")
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
