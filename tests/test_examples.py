"""Every script in examples/ runs, and a second run resumes from the first one's checkpoints."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.timeout(180)


def run(script: str, *args: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, env=env, timeout=150
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def needs(*modules: str) -> pytest.MarkDecorator:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


def test_plain_loop(tmp_path: Path) -> None:
    assert "trained steps 1-120" in run("train_plain.py", "--dir", str(tmp_path), "--steps", "120")
    assert "trained steps 101-160" in run("train_plain.py", "--dir", str(tmp_path), "--steps", "160")


@needs("lightning")
def test_lightning(tmp_path: Path) -> None:
    assert "trained to epoch 1, step 16" in run("train_lightning.py", "--dir", str(tmp_path), "--epochs", "1")
    assert "trained to epoch 2, step 32" in run("train_lightning.py", "--dir", str(tmp_path), "--epochs", "2")


@needs("transformers", "accelerate")
def test_hf_trainer(tmp_path: Path) -> None:
    assert "trained to step 20" in run("train_hf_trainer.py", "--output", str(tmp_path), "--steps", "20")
    second = run("train_hf_trainer.py", "--output", str(tmp_path), "--steps", "40")
    assert "trained to step 40" in second
    assert sorted(p.name for p in (tmp_path / "asyncckpt").glob("*.ckpt")) == [
        "step-0000000020.ckpt",
        "step-0000000040.ckpt",
    ]


def test_every_example_is_tested() -> None:
    # torchrun_fsdp2.py is run at world size 2 by tests/dist/test_example_torchrun.py
    tested = {"train_plain.py", "train_lightning.py", "train_hf_trainer.py", "torchrun_fsdp2.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested
