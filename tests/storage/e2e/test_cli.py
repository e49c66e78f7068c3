"""The command line on S3 (a moto server on 127.0.0.1): ``validate``, ``ls`` and ``inspect`` take
``s3://`` URLs, with credentials and the endpoint from the environment or ``--storage-options``;
paths in the output stay URLs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt.catalog import checkpoint_name
from asyncckpt.cli import app
from asyncckpt.errors import EXIT_CHECKPOINT, EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL
from asyncckpt.storage.remote import FsspecStorage

from ..conftest import raw_s3, s3_options

pytestmark = pytest.mark.timeout(120)

MakeS3 = Callable[..., FsspecStorage]


@pytest.fixture
def run_url(moto_url: str, bucket: str) -> str:
    """``s3://<bucket>/run`` with steps 10, 20 and 30."""
    url = f"s3://{bucket}/run"
    for step in (10, 20, 30):
        state = {"w": torch.full((4, 3), float(step)), "lr": 0.125}
        asyncckpt.save(
            f"{url}/{checkpoint_name(step)}", state, step=step, storage_options=s3_options(moto_url)
        )
    return url


def cli(moto_url: str, *args: str) -> Any:
    """The CLI in-process, the endpoint and fake credentials from the environment only."""
    env = {"COLUMNS": "200", "NO_COLOR": "1", "AWS_ENDPOINT_URL": moto_url}
    return CliRunner().invoke(app, list(args), env=env)


def corrupt(moto_url: str, url: str, step: int) -> None:
    fs = raw_s3(moto_url)
    root = url.removeprefix("s3://")
    key = next(k for k in fs.find(root) if checkpoint_name(step) in k and k.endswith(".data"))
    data = bytearray(fs.cat_file(key))
    data[fmt.read_layout(io.BytesIO(data), "x").blobs[0].offset + 1] ^= 0xFF
    fs.pipe_file(key, bytes(data))


def test_validate_a_run_on_s3(moto_url: str, run_url: str) -> None:
    result = cli(moto_url, "validate", f"{run_url}/")
    assert result.exit_code == EXIT_OK, result.output
    assert "3 checkpoints, all valid; a resume would load step 30" in result.stdout
    assert run_url in result.stdout and result.stderr == ""

    corrupt(moto_url, run_url, 30)
    document = json.loads(cli(moto_url, "validate", run_url, "--json").stdout)
    assert document["exit_code"] == EXIT_PARTIAL and document["path"] == run_url
    assert document["resume_file"] == f"{run_url}/{checkpoint_name(20)}"  # a URL, not s3:/...
    newest = document["checkpoints"][0]
    assert (newest["file"], newest["path"]) == (checkpoint_name(30), f"{run_url}/{checkpoint_name(30)}")
    assert newest["status"] == "corrupted" and newest["reason"].startswith("checksum mismatch in w ")

    single = cli(moto_url, "validate", f"{run_url}/{checkpoint_name(20)}")
    assert single.exit_code == EXIT_OK and "1 checkpoint, all valid" in single.stdout


def test_ls_and_inspect_on_s3(moto_url: str, run_url: str, make_s3: MakeS3) -> None:
    storage = make_s3()  # the same bucket and prefix: an upload that never committed
    storage.write(checkpoint_name(40), lambda sink: sink.write(b"half a checkpoint") or 17)

    listed = cli(moto_url, "ls", run_url)
    assert listed.exit_code == EXIT_OK, listed.output
    assert "3 checkpoints, 1 temp file" in listed.stdout
    document = json.loads(cli(moto_url, "ls", run_url, "--json").stdout)
    assert document["path"] == run_url
    files = {f["step"]: f for f in document["files"]}
    assert [f["kind"] for f in document["files"]] == ["checkpoint"] * 3 + ["temp"]
    assert files[10]["version"] == "1.0" and files[40]["file"].startswith(f"{checkpoint_name(40)}.")

    shown = cli(moto_url, "inspect", f"{run_url}/{checkpoint_name(20)}", "--json")
    assert shown.exit_code == EXIT_OK, shown.output
    found = json.loads(shown.stdout)
    assert found["path"] == f"{run_url}/{checkpoint_name(20)}" and found["step"] == 20
    assert found["tensors"] == [{"key": "w", "dtype": "float32", "shape": [4, 3], "bytes": 48}]


def test_storage_options_on_the_command_line(moto_url: str, run_url: str) -> None:
    options = json.dumps(s3_options(moto_url))
    env = {"COLUMNS": "200", "NO_COLOR": "1"}
    result = CliRunner().invoke(app, ["ls", run_url, "--storage-options", options], env=env)
    assert result.exit_code == EXIT_OK, result.output
    bad = CliRunner().invoke(app, ["ls", run_url, "--storage-options", "[1]"], env=env)
    assert bad.exit_code == EXIT_FAILURE and "--storage-options must be a JSON object" in bad.stderr


def test_wrong_kinds_and_empty_runs(moto_url: str, run_url: str, bucket: str) -> None:
    one = f"{run_url}/{checkpoint_name(10)}"
    assert cli(moto_url, "ls", one).exit_code == EXIT_FAILURE
    inspected = cli(moto_url, "inspect", run_url)
    assert inspected.exit_code == EXIT_FAILURE and "is a directory" in inspected.stderr
    empty = cli(moto_url, "validate", f"s3://{bucket}/nothing/")
    assert empty.exit_code == EXIT_CHECKPOINT and "no checkpoints" in empty.stderr


def test_python_m_asyncckpt_validate_with_credentials_from_the_environment(
    moto_url: str, run_url: str
) -> None:
    env = {**os.environ, "AWS_ENDPOINT_URL": moto_url, "COLUMNS": "200", "NO_COLOR": "1"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run(
        [sys.executable, "-m", "asyncckpt", "validate", run_url],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert "a resume would load step 30" in done.stdout
