"""``asyncckpt ls``, ``validate`` and ``inspect`` on multi-rank steps (saved by 2 ranks once per
module): world size, shards per rank, which shard is broken; validate predicts the resume."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ckpt_workers as cw
import dist_workers as workers
import pytest
import torch
from dist_harness import run_world
from typer.testing import CliRunner

import asyncckpt
from asyncckpt import catalog
from asyncckpt import format as fmt
from asyncckpt.cli import app
from asyncckpt.errors import EXIT_CHECKPOINT, EXIT_OK, EXIT_PARTIAL

pytestmark = pytest.mark.timeout(120)
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("steps") / "run"
    results = run_world(cw.train_and_save, 2, str(root), [1, 2, 3], 3)
    assert all(r.ok for r in results), [r.message for r in results]
    yield root


@pytest.fixture
def run_dir(saved: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(saved, copy)
    return copy


def flip_last_blob(shard: Path) -> None:
    """One flipped bit in a shard's last blob: its header still reads, a checksum does not."""
    with open(shard, "rb") as file:
        layout = fmt.read_layout(file, str(shard))
    with open(shard, "r+b") as file:
        file.seek(layout.blobs[-1].offset)
        byte = file.read(1)[0]
        file.seek(layout.blobs[-1].offset)
        file.write(bytes([byte ^ 0x01]))


def resume_in_a_plain_process(root: Path) -> asyncckpt.LoadResult | None:
    model = workers.mlp(7)
    optimizer = torch.optim.Adam(model.parameters())
    with asyncckpt.AsyncCheckpointer(root) as ckpt:
        return ckpt.restore({"model": model, "optimizer": optimizer})


def test_ls_shows_steps_with_their_ranks(run_dir: Path) -> None:
    (run_dir / "step-0000000004").mkdir()
    (run_dir / "step-0000000004" / "rank-00000.ckpt").write_bytes(b"partial")

    result = run("ls", run_dir)
    document = json.loads(run("ls", run_dir, "--json").stdout)

    assert result.exit_code == EXIT_OK, result.output
    for step in (1, 2, 3):
        row = rf"{step} .* 2 .* 1\.0 .* step-{step:010d}/ .* 2 ranks, 2 shard files"
        assert re.search(row, result.stdout)
    assert re.search(r"4 .* step-0000000004/ .* uncommitted", result.stdout)
    assert "3 multi-rank steps, 1 uncommitted" in result.stdout
    rows = {row["step"]: row for row in document["steps"]}
    assert rows[3]["world_size"] == 2 and rows[3]["shards"] == 2 and rows[3]["committed"]
    assert not rows[4]["committed"] and rows[4]["world_size"] is None


def test_validate_names_the_broken_shard_and_predicts_the_resume(run_dir: Path) -> None:
    assert run("validate", run_dir).exit_code == EXIT_OK
    flip_last_blob(run_dir / catalog.shard_name(3, 1))

    result = run("validate", run_dir)
    document = json.loads(run("validate", run_dir, "--json").stdout)
    resumed = resume_in_a_plain_process(run_dir)

    assert result.exit_code == EXIT_PARTIAL, result.output
    row = r"3 .*step-0000000003 .* corrupted .* rank-00001\.ckpt: .*checksum mismatch"
    assert re.search(row, result.stdout)
    assert "a resume would load step 2" in result.stdout
    [broken] = next(s for s in document["steps"] if s["step"] == 3)["broken"]
    assert broken["rank"] == 1 and broken["path"].endswith("step-0000000003/rank-00001.ckpt")
    assert resumed is not None and document["resume_step"] == resumed.step == 2
    assert [d.path for d in resumed.diagnostics] == [broken["path"]]


def test_validate_structure_reads_headers_only(run_dir: Path) -> None:
    flip_last_blob(run_dir / catalog.shard_name(3, 0))
    (run_dir / catalog.shard_name(2, 1)).unlink()

    result = run("validate", run_dir, "--verify", "structure")

    assert result.exit_code == EXIT_PARTIAL, result.output
    assert re.search(r"3 .*step-0000000003 .* valid", result.stdout)  # blob bytes not read
    assert re.search(r"2 .*step-0000000002 .* corrupted .* rank-00001\.ckpt: missing", result.stdout)


def test_validate_one_step_folder(run_dir: Path) -> None:
    assert run("validate", run_dir / "step-0000000002").exit_code == EXIT_OK
    flip_last_blob(run_dir / catalog.shard_name(2, 0))
    result = run("validate", run_dir / "step-0000000002")
    assert result.exit_code == EXIT_CHECKPOINT, result.output
    assert "rank-00000.ckpt" in result.stdout


def test_inspect_a_step_folder(run_dir: Path) -> None:
    (run_dir / catalog.shard_name(3, 1)).unlink()

    result = run("inspect", run_dir / "step-0000000003")
    document = json.loads(run("inspect", run_dir / "step-0000000003", "--json").stdout)

    assert result.exit_code == EXIT_OK, result.output
    assert re.search(r"world size\s+2", result.stdout) and "metadata" in result.stdout
    assert re.search(r"0 .* rank-00000\.ckpt .* ok", result.stdout)
    assert re.search(r"1 .* rank-00001\.ckpt .* missing", result.stdout)
    # the global shape, in 2 chunks
    assert re.search(r"model\.0\.weight .* float32 .* \[16, 8\] .* 2", result.stdout)
    assert document["world_size"] == 2 and document["metadata"] == {"step": 3}
    assert [s["status"] for s in document["shards"]] == ["ok", "missing"]
