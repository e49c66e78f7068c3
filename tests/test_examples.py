"""Every script in examples/ runs, and a second run resumes from the first one's checkpoints."""

from __future__ import annotations

import importlib.util
import os
import re
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


OWN_EXAMPLES = ["train_plain.py", "train_lightning.py", "train_hf_trainer.py"]


@pytest.mark.parametrize("script", [*OWN_EXAMPLES, "torchrun_fsdp2.py"])
def test_the_readme_links_the_example(script: str) -> None:
    assert f"](examples/{script})" in (ROOT / "README.md").read_text(encoding="utf-8")


NUMBERS = {"One": 1, "Two": 2, "Three": 3, "Four": 4, "Five": 5, "Six": 6}


@pytest.mark.parametrize("script", OWN_EXAMPLES)
def test_the_example_says_how_many_lines_asyncckpt_adds(script: str) -> None:
    text = (EXAMPLES / script).read_text(encoding="utf-8")
    claimed = re.search(r"\b(\w+) lines differ from the same", text)
    assert claimed is not None and claimed.group(1) in NUMBERS, script
    marked = [line for line in text.splitlines() if re.search(r"# asyncckpt(:|$)", line)]
    assert len(marked) == NUMBERS[claimed.group(1)], marked
