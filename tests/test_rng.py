"""rng_state / set_rng_state: every global generator restored, and the state is storable."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import asyncckpt
from asyncckpt.rng import rng_state, set_rng_state


def draws() -> tuple[Any, ...]:
    """A few numbers from every global generator (CUDA's too, when present)."""
    cuda = torch.rand(3, device="cuda").cpu().tolist() if torch.cuda.is_available() else None
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        np.random.randn(),  # leaves a cached gaussian in NumPy's legacy state
        torch.rand(3).tolist(),
        cuda,
    )


def test_set_rng_state_replays_every_generator() -> None:
    np.random.randn()
    saved = rng_state()
    first = draws()
    draws()
    set_rng_state(saved)
    assert draws() == first


def test_the_state_survives_asyncckpt_save_and_load(tmp_path: Path) -> None:
    saved = rng_state()
    first = draws()
    path = asyncckpt.save(tmp_path / "rng.ckpt", {"rng": saved}, step=1)
    loaded = asyncckpt.load(path).state["rng"]
    set_rng_state(loaded)
    assert draws() == first


def test_the_state_survives_torch_save_with_weights_only(tmp_path: Path) -> None:
    saved = rng_state()
    first = draws()
    torch.save({"rng": saved}, tmp_path / "rng.pt")
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert draws() == first


def test_the_state_holds_only_storable_values() -> None:
    def check(value: Any) -> None:
        if isinstance(value, dict):
            assert all(isinstance(k, str) for k in value)
            for item in value.values():
                check(item)
        elif isinstance(value, list | tuple):
            for item in value:
                check(item)
        elif isinstance(value, torch.Tensor):
            assert value.device.type == "cpu"
        else:
            assert value is None or isinstance(value, int | float | str | bytes)

    state = rng_state()
    check(state)
    assert {"version", "python", "torch", "numpy"} <= set(state)


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"version": 99},
        {"version": 1},
        {"version": 1, "python": (3, (), None), "torch": torch.zeros(1)},
    ],
    ids=["none", "list", "future-version", "empty", "malformed"],
)
def test_a_malformed_state_is_refused(bad: Any) -> None:
    before = random.getstate()
    with pytest.raises(ValueError, match="rng state"):
        set_rng_state(bad)
    assert random.getstate() == before


def test_numpy_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    with_numpy = rng_state()
    monkeypatch.setitem(sys.modules, "numpy", None)  # makes ``import numpy`` raise ImportError
    without = rng_state()
    assert "numpy" not in without and "numpy" in with_numpy
    with pytest.warns(RuntimeWarning, match="NumPy is not installed"):
        set_rng_state(with_numpy)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_cuda_states_without_cuda_warn() -> None:
    state = {**rng_state(), "cuda": [torch.get_rng_state()]}
    first = draws()
    with pytest.warns(RuntimeWarning, match="CUDA is not available"):
        set_rng_state(state)
    assert draws() == first  # everything else was restored


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generators_are_restored() -> None:
    saved = rng_state()
    assert len(saved["cuda"]) == torch.cuda.device_count()
    first = torch.rand(4, device="cuda").cpu()
    set_rng_state(saved)
    assert torch.equal(torch.rand(4, device="cuda").cpu(), first)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generators_are_restored_in_a_fresh_process(tmp_path: Path) -> None:
    """Before CUDA is initialized, torch queues seeds; a queued manual_seed must not win."""
    saved = rng_state()
    want = torch.rand(4, device="cuda").cpu()
    torch.save(saved, tmp_path / "rng.pt")
    script = (
        "import sys, torch\n"
        "from asyncckpt.rng import set_rng_state\n"
        "torch.manual_seed(12345)\n"
        f"set_rng_state(torch.load({str(tmp_path / 'rng.pt')!r}, weights_only=True))\n"
        "sys.stdout.write(repr(torch.rand(4, device='cuda').cpu().tolist()))\n"
    )
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == repr(want.tolist())
