"""Running the command line in tests: typer's runner, ``python -m asyncckpt``, states and damage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from typer.testing import CliRunner

from asyncckpt.cli import app
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
