"""AsyncCheckpointIO with real Lightning: exact resume after kill -9, fallback, hostile hyper-parameters."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import random
import warnings
from pathlib import Path
from typing import Any

import pytest

L = pytest.importorskip("lightning")

import torch  # noqa: E402
from helpers import bitwise, finish, launch  # noqa: E402
from lightning_trainer import BATCHES, EPOCHS, TinyModule, data, final_state, trainer  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt.errors import UnsupportedValueError  # noqa: E402
from asyncckpt.integrations.lightning import AsyncCheckpointIO, load_checkpoint, resume_path  # noqa: E402

pytestmark = pytest.mark.timeout(180)

SCRIPT = Path(__file__).with_name("lightning_trainer.py")


def test_kill_9_then_resume_from_the_directory_is_bitwise_an_uninterrupted_run(tmp_path: Path) -> None:
    kill_at = random.Random().randint(BATCHES + 1, EPOCHS * BATCHES - 1)  # after the first commit
    killed = launch(SCRIPT, tmp_path / "run", tmp_path / "unused.ckpt", "--kill-at", kill_at)
    L.seed_everything(0, verbose=False)
    module = TinyModule()
    straight, _ = fit(tmp_path / "straight", epochs=EPOCHS, module=module)
    want = final_state(straight, module)
    finish(killed, expect=-9)
    assert list((tmp_path / "run").glob("*.ckpt")), f"killed at step {kill_at} before any commit"
    finish(launch(SCRIPT, tmp_path / "run", tmp_path / "resumed.ckpt", "--resume"))
    got = asyncckpt.load(tmp_path / "resumed.ckpt").state
    assert got["global_step"] == want["global_step"] == EPOCHS * BATCHES, kill_at
    for part in ("model", "optimizer", "scheduler", "epoch", "loops", "callbacks"):
        assert bitwise(got[part]) == bitwise(want[part]), (part, kill_at)
    # Lightning's own retention went through the plugin: the two newest epochs and last.ckpt.
    # ModelCheckpoint saves epoch k, then removes epoch k-2: a kill between the two (the removal
    # is queued behind the write) leaves k-2, which the resumed callback no longer knows of; the
    # same happens to Lightning's own synchronous saving, in a shorter window. At most that one.
    names = sorted(p.name for p in (tmp_path / "run").glob("*.ckpt"))
    newest = [
        f"epoch={EPOCHS - 2}-step={(EPOCHS - 1) * BATCHES}.ckpt",
        f"epoch={EPOCHS - 1}-step={EPOCHS * BATCHES}.ckpt",
        "last.ckpt",
    ]
    stale = [name for name in names if name not in newest]
    assert set(newest) <= set(names), (names, kill_at)
    assert len(stale) <= 1 and all(name.startswith("epoch=") for name in stale), (names, kill_at)


def fit(directory: Path, *, epochs: int, ckpt_path: Any = None, module: Any = None) -> tuple[Any, Any]:
    io = AsyncCheckpointIO()
    module = module if module is not None else TinyModule()
    run = trainer(directory, io, epochs=epochs)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*(does not have many workers|isinstance.treespec|is not empty).*"
        )
        run.fit(module, data(), ckpt_path=ckpt_path)
    return run, io


def test_checkpoints_are_asyncckpt_files_at_lightnings_names(tmp_path: Path) -> None:
    run, _ = fit(tmp_path, epochs=2)
    names = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert names == [f"epoch=0-step={BATCHES}.ckpt", f"epoch=1-step={2 * BATCHES}.ckpt", "last.ckpt"]
    loaded = asyncckpt.load(tmp_path / "last.ckpt")
    assert loaded.step == 2 * BATCHES
    assert loaded.metadata["framework"] == "lightning"
    state = loaded.state
    assert state["global_step"] == 2 * BATCHES
    assert set(state["state_dict"]) == set(run.lightning_module.state_dict())
    assert state["hyper_parameters"] == {"lr": 0.05, "hidden": 16, "extra": None}
    assert load_checkpoint(tmp_path)["global_step"] == 2 * BATCHES


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    fit(tmp_path, epochs=3)
    newest = tmp_path / f"epoch=2-step={3 * BATCHES}.ckpt"
    (tmp_path / "last.ckpt").unlink()
    with open(newest, "r+b") as file:
        file.truncate(os.path.getsize(newest) // 2)
    with pytest.warns(RuntimeWarning, match="skipping") as caught:
        run, io = fit(tmp_path, epochs=4, ckpt_path=tmp_path)
    assert io.last_load is not None
    assert io.last_load.step == 2 * BATCHES
    assert io.last_load.source == "fallback"
    [diagnostic] = io.last_load.diagnostics
    assert diagnostic.path == str(newest)
    assert diagnostic.kind == "corrupted"
    [warning] = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert str(newest) in str(warning.message)
    assert run.global_step == 4 * BATCHES


def test_a_broken_last_ckpt_falls_back_within_its_directory(tmp_path: Path) -> None:
    fit(tmp_path, epochs=2)
    (tmp_path / "last.ckpt").write_bytes(b"ASYNCKPT" + b"\0" * 100)
    with pytest.warns(RuntimeWarning, match="last.ckpt is not usable"):
        _, io = fit(tmp_path, epochs=3, ckpt_path="last")
    assert io.last_load is not None and io.last_load.step == 2 * BATCHES


def test_resume_path_is_none_for_a_fresh_run(tmp_path: Path) -> None:
    assert resume_path(tmp_path / "missing") is None
    assert resume_path(tmp_path) is None
    fit(tmp_path, epochs=1)
    assert resume_path(tmp_path) == str(tmp_path)


class Precision(enum.Enum):
    FULL = "32"
    HALF = "16"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    root: Path
    batch: int
    precision: Precision


def test_safe_hyper_parameters_come_back_exactly_and_rebuild_the_module(tmp_path: Path) -> None:
    extra = {
        "root": Path("data") / "train",
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "precision": Precision.HALF,
        "data": DataConfig(Path("/datasets/x"), 8, Precision.FULL),
        "args": argparse.Namespace(seed=3, out=Path("out"), dtypes=(torch.float16, Precision.FULL)),
        "nested": [{"path": Path("a"), "device": torch.device("cpu", 0)}],
    }
    fit(tmp_path, epochs=1, module=TinyModule(extra=extra))
    hparams = load_checkpoint(tmp_path / "last.ckpt")["hyper_parameters"]
    assert hparams["extra"] == extra
    assert typed(hparams["extra"]) == typed(extra)  # every type, nested ones too (PosixPath, enum)
    assert TinyModule(**hparams).hparams["extra"] == extra


def typed(value: Any) -> Any:
    """``value`` as its type and the typed values it holds, all the way down."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        inner: Any = {f.name: typed(getattr(value, f.name)) for f in dataclasses.fields(value)}
    elif isinstance(value, argparse.Namespace):
        inner = {k: typed(v) for k, v in vars(value).items()}
    elif isinstance(value, dict):
        inner = {k: typed(v) for k, v in value.items()}
    elif isinstance(value, list | tuple):
        inner = [typed(v) for v in value]
    else:
        inner = repr(value)
    return (type(value), inner)


class Opaque:
    """A value the format cannot hold and asyncckpt must never pickle."""


class Evil:
    """Unpickling this runs a shell command: what a pickle-based checkpoint would do on load."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


@dataclasses.dataclass(frozen=True)
class Holder:
    value: Any


@pytest.mark.parametrize(
    ("value", "reason", "inside"),
    [
        (Opaque(), "cannot store a value of type Opaque", ""),
        (Evil(), "cannot store a value of type Evil", ""),
        ({1, 2}, "cannot store a value of type set", ""),
        (torch.nn.Linear(2, 2), "cannot be rebuilt from a checkpoint", ""),
        ([{"ok": 1, "bad": Opaque()}], "cannot store a value of type Opaque", "[0]['bad']"),
        (Holder(Evil()), "cannot store a value of type Evil", "['value']"),
        (argparse.Namespace(net=torch.nn.Linear(2, 2)), "cannot store a value of type Linear", "['net']"),
    ],
    ids=["object", "reduce", "set", "module", "nested", "in-dataclass", "module-in-namespace"],
)
def test_a_hostile_hyper_parameter_fails_at_save_and_nothing_is_written(
    tmp_path: Path, value: Any, reason: str, inside: str
) -> None:
    with pytest.raises(UnsupportedValueError, match=reason) as caught:
        fit(tmp_path, epochs=1, module=TinyModule(extra=value))
    assert caught.value.key == f"state['hyper_parameters']['extra']{inside}"
    assert caught.value.path == str(tmp_path / f"epoch=0-step={BATCHES}.ckpt")
    assert "save_hyperparameters(ignore=['extra'])" in str(caught.value)
    assert [p.name for p in tmp_path.iterdir() if p.name != "events.jsonl"] == []
