"""examples/torchrun_fsdp2.py under torchrun at world size 2 on CPU: a run, then a resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import asyncckpt

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(240)


def torchrun(*args: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, str(ROOT / "examples" / "torchrun_fsdp2.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=200,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_torchrun_example_trains_and_resumes(tmp_path: Path) -> None:
    first = torchrun("--dir", str(tmp_path), "--steps", "6", "--save-every", "2")
    second = torchrun("--dir", str(tmp_path), "--steps", "9", "--save-every", "3")

    assert "started fresh; trained steps 1-6 on 2 ranks" in first
    assert "resumed from step 6; trained steps 7-9 on 2 ranks" in second
    steps = [(info.step, info.path.name) for info in asyncckpt.list_checkpoints(tmp_path)]
    assert steps == [(4, "step-0000000004"), (6, "step-0000000006"), (9, "step-0000000009")]  # keep_last=3
