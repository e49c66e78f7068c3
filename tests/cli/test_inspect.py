"""``asyncckpt inspect``: metadata, tensor table and plain values of one file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from asyncckpt.errors import EXIT_CHECKPOINT, EXIT_OK

from .helpers import checkpoint, run, truncate


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
