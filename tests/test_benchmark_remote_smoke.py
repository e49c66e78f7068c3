"""benchmarks/remote.py runs a tiny configuration against its own moto server and writes the JSON
and Markdown it promises. This checks that the script works, not how fast anything is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "remote.py"

pytestmark = pytest.mark.timeout(300)


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
        env=env,
    )


def test_help_lists_the_options(tmp_path: Path) -> None:
    done = _run(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--sizes", "--tensors", "--rounds", "--endpoint", "--out", "--no-dcp"):
        assert option in done.stdout


def test_tiny_configuration_writes_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "result"
    done = _run(tmp_path, "--sizes", "1M", "--tensors", "10", "--rounds", "1", "--no-dcp", "--out", str(out))
    assert done.returncode == 0, done.stderr
    document = json.loads(out.with_suffix(".json").read_text())
    [result] = document["results"]
    assert result["tensors"] == 10 and result["bytes"] == (1 << 20) // 40 * 40  # whole float32s
    for part in ("save", "restore"):
        assert result[part]["asyncckpt"]["n"] == 1 and result[part]["floor"]["n"] == 1
        assert result[part]["asyncckpt_vs_floor"]["median"] > 0
    assert "--sizes 1M" in document["command"]
    assert "| 1M in 10 tensors | save |" in out.with_suffix(".md").read_text()
