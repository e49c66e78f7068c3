"""AsyncCheckpointIO's contract with real Lightning: the plugin alone, Lightning's names, its
deletions, background failures at teardown, and the overlapped copies of a finished state dict."""

from __future__ import annotations

import functools
import json
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

L = pytest.importorskip("lightning")

import torch  # noqa: E402
from helpers import bitwise, finish, launch  # noqa: E402
from lightning_trainer import BATCHES, TinyModule, data, final_state, trainer  # noqa: E402

import asyncckpt  # noqa: E402
import asyncckpt.integrations._lightning as plugin_module  # noqa: E402
from asyncckpt.checkpointer import AsyncCheckpointer  # noqa: E402
from asyncckpt.integrations.lightning import AsyncCheckpointIO  # noqa: E402
from asyncckpt.saving.plan import plan_save  # noqa: E402
from asyncckpt.testing import FaultyOps  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def fit(run: Any, module: Any = None, ckpt_path: Any = None) -> Any:
    module = module if module is not None else TinyModule()
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*(does not have many workers|isinstance.treespec|is not empty).*"
        )
        run.fit(module, data(), ckpt_path=ckpt_path)
    return module


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.ckpt"))


@pytest.fixture
def no_thread_left() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    assert [t.name for t in threading.enumerate() if t not in before and t.is_alive()] == []


def test_the_plugin_alone_with_no_arguments_saves_and_resumes_exactly(
    tmp_path: Path, no_thread_left: None
) -> None:
    L.seed_everything(0, verbose=False)
    straight_module = TinyModule()
    straight = trainer(tmp_path / "straight", AsyncCheckpointIO(), epochs=3, attach=False)
    fit(straight, straight_module)
    io = AsyncCheckpointIO()
    L.seed_everything(0, verbose=False)
    fit(trainer(tmp_path / "run", io, epochs=2, attach=False), TinyModule())
    assert names(tmp_path / "run") == [
        f"epoch=0-step={BATCHES}.ckpt",
        f"epoch=1-step={2 * BATCHES}.ckpt",
        "last.ckpt",
    ]
    assert asyncckpt.load(tmp_path / "run" / "last.ckpt").metadata["framework"] == "lightning"
    resumed = trainer(tmp_path / "run", io, epochs=3, attach=False)  # the same plugin, reopened
    module = fit(resumed, ckpt_path=tmp_path / "run")
    assert io.last_load is not None and io.last_load.step == 2 * BATCHES
    assert bitwise(final_state(resumed, module)) == bitwise(final_state(straight, straight_module))


def test_versioned_names_are_lightnings_and_resume_takes_the_newest_written(tmp_path: Path) -> None:
    for _ in range(2):  # a second fresh run into the same directory: Lightning adds -v1
        fit(trainer(tmp_path, AsyncCheckpointIO(), epochs=1))
    assert names(tmp_path) == [
        f"epoch=0-step={BATCHES}-v1.ckpt",
        f"epoch=0-step={BATCHES}.ckpt",
        "last-v1.ckpt",
        "last.ckpt",
    ]
    assert {asyncckpt.load(p).step for p in tmp_path.glob("*.ckpt")} == {BATCHES}
    io = AsyncCheckpointIO()
    fit(trainer(tmp_path, io, epochs=2), ckpt_path=tmp_path)
    assert io.last_load is not None and Path(io.last_load.path).name == "last-v1.ckpt"  # written last


def faulty(monkeypatch: pytest.MonkeyPatch, ops: FaultyOps) -> None:
    """Every checkpointer the plugin opens writes through ``ops``."""
    monkeypatch.setattr(plugin_module, "AsyncCheckpointer", functools.partial(AsyncCheckpointer, ops=ops))


def test_teardown_raises_a_failure_of_the_last_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_thread_left: None
) -> None:
    faulty(monkeypatch, FaultyOps("fsync", nth=1))  # the only save fails in the background
    io = AsyncCheckpointIO()
    with pytest.raises(asyncckpt.CheckpointWriteError) as caught:
        fit(trainer(tmp_path, io, epochs=1, save_last=False))
    assert caught.value.path == str(tmp_path / f"epoch=0-step={BATCHES}.ckpt")
    assert names(tmp_path) == []


def test_a_removal_after_a_failed_save_keeps_the_older_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_thread_left: None
) -> None:
    # save_top_k=1: epoch 1's save is queued, then the removal of epoch 0's file; the save fails.
    faulty(monkeypatch, FaultyOps("fsync", nth=2))
    with pytest.raises(asyncckpt.CheckpointWriteError) as caught:
        fit(trainer(tmp_path, AsyncCheckpointIO(), epochs=2, save_top_k=1, save_last=False))
    assert caught.value.path == str(tmp_path / f"epoch=1-step={2 * BATCHES}.ckpt")
    assert names(tmp_path) == [f"epoch=0-step={BATCHES}.ckpt"]
    assert asyncckpt.load(tmp_path / f"epoch=0-step={BATCHES}.ckpt").step == BATCHES


def test_a_removal_waits_for_the_save_before_it(tmp_path: Path) -> None:
    fit(trainer(tmp_path, AsyncCheckpointIO(), epochs=3, save_top_k=1, save_last=False))
    assert names(tmp_path) == [f"epoch=2-step={3 * BATCHES}.ckpt"]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    order = [
        (e["event"], Path(e["path"]).name)
        for e in events
        if e["event"] in ("checkpoint.save.committed", "checkpoint.deleted")
    ]
    committed, deleted = "checkpoint.save.committed", "checkpoint.deleted"
    assert [(kind, name.split("-step")[0]) for kind, name in order] == [
        (committed, "epoch=0"),
        (committed, "epoch=1"),
        (deleted, "epoch=0"),
        (committed, "epoch=2"),
        (deleted, "epoch=1"),
    ]


class Recorder(L.Callback):
    """What a save at the end of each epoch must hold: the module and optimizer as they are
    before the next epoch's first step (the overlapped copies run while that step may start)."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, Any]] = {}

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch > 0:
            self.seen[trainer.global_step] = bitwise(
                {"state_dict": pl_module.state_dict(), "optimizer": trainer.optimizers[0].state_dict()}
            )


def test_attached_saves_overlap_the_copies_and_hold_the_values_at_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deferred: list[tuple[int, int]] = []

    class Spy(AsyncCheckpointer):
        def save(self, step: int, state: Any, **kwargs: Any) -> Any:
            plan = plan_save(step, state, None, overlap=True, live=kwargs.get("overlap_with", ()))
            deferred.append((len(plan.deferred), len(plan.snapshot.tensors)))
            return super().save(step, state, **kwargs)

    monkeypatch.setattr(plugin_module, "AsyncCheckpointer", Spy)
    recorder = Recorder()
    run = trainer(tmp_path, AsyncCheckpointIO(), recorder, epochs=3, save_top_k=-1, save_last=False)
    fit(run)
    # 4 parameters and AdamW's exp_avg and exp_avg_sq of each: copied while training goes on
    assert deferred and all(n >= 12 for n, _ in deferred), deferred
    assert sorted(recorder.seen) == [BATCHES, 2 * BATCHES]
    for step, want in recorder.seen.items():
        state = asyncckpt.load(tmp_path / f"epoch={step // BATCHES - 1}-step={step}.ckpt").state
        got = bitwise({"state_dict": state["state_dict"], "optimizer": state["optimizer_states"][0]})
        assert got == want, step


def test_the_plugin_alone_copies_inside_the_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overlap_with: list[Any] = []

    class Spy(AsyncCheckpointer):
        def save(self, step: int, state: Any, **kwargs: Any) -> Any:
            overlap_with.append(kwargs.get("overlap_with"))
            return super().save(step, state, **kwargs)

    monkeypatch.setattr(plugin_module, "AsyncCheckpointer", Spy)
    fit(trainer(tmp_path, AsyncCheckpointIO(), epochs=1, attach=False))
    assert overlap_with == [(), ()]  # epoch=0 and last.ckpt: nothing to overlap with
    assert torch.equal(
        asyncckpt.load(tmp_path / "last.ckpt").state["state_dict"]["net.0.weight"],
        asyncckpt.load(tmp_path / f"epoch=0-step={BATCHES}.ckpt").state["state_dict"]["net.0.weight"],
    )


def test_a_damaged_newer_last_ckpt_is_named_when_the_resume_goes_back(tmp_path: Path) -> None:
    # save_top_k=1 keeping the lowest step: epoch=0 stays, last.ckpt moves on to step 8
    fit(trainer(tmp_path, AsyncCheckpointIO(), epochs=2, save_top_k=1, mode="min"))
    assert names(tmp_path) == [f"epoch=0-step={BATCHES}.ckpt", "last.ckpt"]
    last = tmp_path / "last.ckpt"
    last.write_bytes(last.read_bytes()[:-100])  # its tail cut off: its step cannot be read
    io = AsyncCheckpointIO()
    fit(trainer(tmp_path, io, epochs=3, save_top_k=1, mode="min"), ckpt_path=tmp_path)
    assert io.last_load is not None and io.last_load.step == BATCHES
    assert [d.path for d in io.last_load.diagnostics] == [str(last)]


SAVE_AFTER_FIT = """
import sys, warnings
from pathlib import Path
sys.path.insert(0, {here!r})
from lightning_trainer import TinyModule, data, trainer
from asyncckpt.integrations.lightning import AsyncCheckpointIO
warnings.simplefilter("ignore")
directory = Path(sys.argv[1])
run = trainer(directory, AsyncCheckpointIO(), epochs=1)
run.fit(TinyModule(), data())
run.save_checkpoint(directory / "final.ckpt")  # after fit: no teardown follows
"""


def test_a_save_after_fit_is_written_before_the_process_exits(tmp_path: Path) -> None:
    script = tmp_path / "save_after_fit.py"
    script.write_text(SAVE_AFTER_FIT.format(here=str(Path(__file__).parent)))
    finish(launch(script, tmp_path / "run"))
    loaded = asyncckpt.load(tmp_path / "run" / "final.ckpt")
    assert loaded.step == BATCHES and loaded.metadata["framework"] == "lightning"
