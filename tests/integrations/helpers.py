"""Helpers shared by the integration tests: bitwise comparison and child processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]


def bitwise(value: Any) -> Any:
    """The value with every tensor replaced by its dtype, shape and raw bytes."""
    if isinstance(value, torch.Tensor):
        raw = value.detach().cpu().reshape(-1).contiguous().view(torch.uint8)
        return (value.dtype, tuple(value.shape), bytes(raw.numpy()))
    if isinstance(value, dict):
        return {k: bitwise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(bitwise(v) for v in value)
    return value


def launch(script: Path, *args: Any) -> subprocess.Popen[str]:
    """Run ``script`` in a fresh interpreter that imports asyncckpt from this checkout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, str(script), *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(process: subprocess.Popen[str], expect: int = 0, timeout: float = 150) -> str:
    """Wait for ``process``; assert its exit status (``-9``: killed by SIGKILL)."""
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == expect, output[-4000:]
    return output
