"""Exact resume: 2N steps in one process equal N steps, a checkpoint, a fresh process and N more."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import asyncckpt
from asyncckpt import format as fmt

TRAINER = Path(__file__).with_name("resume_trainer.py")
ROOT = Path(__file__).resolve().parent.parent
STEPS = 25


def run(*args: Any) -> subprocess.Popen[str]:
    command = [sys.executable, str(TRAINER), *map(str, args), str(STEPS)]
    # the package is importable from the repository even where it is not installed
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(process: subprocess.Popen[str]) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output


def stop(process: subprocess.Popen[str]) -> None:
    """Kill ``process`` if it still runs (after a failure elsewhere)."""
    if process.poll() is None:
        process.kill()
        process.communicate()


def bitwise(value: Any) -> Any:
    """The state with every tensor replaced by its dtype, shape and raw bytes."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, tuple(value.shape), fmt.tensor_bytes(value.contiguous()).tobytes())
    if isinstance(value, dict):
        return {k: bitwise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(bitwise(v) for v in value)
    return value


def test_a_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    straight = run("straight", tmp_path / "unused", tmp_path / "straight.ckpt")
    try:
        finish(run("first", checkpoints, tmp_path / "unused.ckpt"))
        finish(run("resume", checkpoints, tmp_path / "resumed.ckpt"))
        finish(straight)
    finally:
        stop(straight)
    want = asyncckpt.load(tmp_path / "straight.ckpt").state
    got = asyncckpt.load(tmp_path / "resumed.ckpt").state
    assert set(got["optimizer"]["state"]) == {0, 1, 2, 3}
    assert int(got["optimizer"]["state"][0]["step"]) == 2 * STEPS
    assert bitwise(got["model"]) == bitwise(want["model"])
    assert bitwise(got["optimizer"]) == bitwise(want["optimizer"])
    assert bitwise(got["rng"]) == bitwise(want["rng"])
