"""AsyncCheckpointTrainer with a real Hugging Face Trainer: exact resume after kill -9, fallback, refusals."""

from __future__ import annotations

import os
import random
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from helpers import bitwise, finish, launch  # noqa: E402
from hf_trainer import MAX_STEPS, SAVE_STEPS, Tokens, arguments, final_state, trainer  # noqa: E402
from hf_trainer import model as straight_model  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt.errors import UnsupportedValueError, UsageError  # noqa: E402
from asyncckpt.integrations.transformers import AsyncCheckpointTrainer  # noqa: E402

pytestmark = pytest.mark.timeout(180)

SCRIPT = Path(__file__).with_name("hf_trainer.py")


def train(run: AsyncCheckpointTrainer, **kwargs: Any) -> None:
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        run.train(**kwargs)


def test_kill_9_then_resume_true_is_bitwise_an_uninterrupted_run(tmp_path: Path) -> None:
    kill_at = random.Random().randint(SAVE_STEPS + 1, MAX_STEPS - 1)  # after the first commit
    killed = launch(SCRIPT, tmp_path / "run", tmp_path / "unused.ckpt", "--kill-at", kill_at)
    straight = trainer(tmp_path / "straight")
    # dropout draws from the RNGs and the sampler shuffles: equal weights need both restored
    assert straight.model.config.resid_pdrop > 0 and straight.args.data_seed is not None
    train(straight)
    want = final_state(straight)
    finish(killed, expect=-9)
    assert asyncckpt.list_checkpoints(tmp_path / "run" / "asyncckpt"), f"killed at {kill_at} before a commit"
    finish(launch(SCRIPT, tmp_path / "run", tmp_path / "resumed.ckpt", "--resume"))
    got = asyncckpt.load(tmp_path / "resumed.ckpt").state
    assert got["trainer_state"]["global_step"] == MAX_STEPS
    for part in ("model", "optimizer", "scheduler", "trainer_state"):
        assert bitwise(got[part]) == bitwise(want[part]), (part, kill_at)
    # save_total_limit=2 went through asyncckpt's retention
    steps = [info.step for info in asyncckpt.list_checkpoints(tmp_path / "run" / "asyncckpt")]
    assert steps == [MAX_STEPS - SAVE_STEPS, MAX_STEPS]


def test_a_checkpoint_holds_the_whole_training_state(tmp_path: Path) -> None:
    run = trainer(tmp_path, max_steps=SAVE_STEPS)
    train(run)
    assert run.checkpointer is None  # closed when train() returned
    [info] = asyncckpt.list_checkpoints(tmp_path / "asyncckpt")
    loaded = asyncckpt.load(info.path)
    assert loaded.step == SAVE_STEPS
    assert loaded.metadata["framework"] == "transformers"
    assert set(loaded.state) == {"model", "optimizer", "lr_scheduler", "rng", "trainer_state"}
    assert set(loaded.state["model"]) == set(run.model.state_dict())
    assert '"global_step": 4' in loaded.state["trainer_state"]
    assert not any(p.name.startswith("checkpoint-") for p in tmp_path.iterdir())  # no Trainer folders


def test_the_writers_priority_reaches_the_checkpointer(tmp_path: Path) -> None:
    seen: list[int] = []
    run = trainer(tmp_path, max_steps=SAVE_STEPS)
    run.asyncckpt_background_nice = 7  # as AsyncCheckpointTrainer(..., background_nice=7) sets it

    class Probe(transformers.TrainerCallback):
        def on_save(self, *args: Any, **kwargs: Any) -> None:  # the checkpointer opens at the first save
            assert run.checkpointer is not None
            seen.append(run.checkpointer.background_nice)

    run.add_callback(Probe())
    train(run)
    assert seen == [7]


def test_no_writer_thread_outlives_train(tmp_path: Path) -> None:
    # As examples/train_hf_trainer.py: the last checkpoint at the last step, then the script exits.
    # A writer thread still running then aborted the process at exit (see tests/test_priority.py).
    before = set(threading.enumerate())
    run = trainer(tmp_path, max_steps=SAVE_STEPS)
    run.asyncckpt_background_nice = 10  # as AsyncCheckpointTrainer(..., background_nice=10) sets it
    train(run)
    assert [t.name for t in threading.enumerate() if t not in before and t.is_alive()] == []
    assert [info.step for info in asyncckpt.list_checkpoints(tmp_path / "asyncckpt")] == [SAVE_STEPS]


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    train(trainer(tmp_path, max_steps=2 * SAVE_STEPS, save_total_limit=None))
    newest = asyncckpt.list_checkpoints(tmp_path / "asyncckpt")[-1].path
    with open(newest, "r+b") as file:
        file.seek(os.path.getsize(newest) // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0xFF]))
    resumed = trainer(tmp_path, max_steps=3 * SAVE_STEPS, save_total_limit=None)
    with pytest.warns(RuntimeWarning, match="skipping") as caught:
        train(resumed, resume_from_checkpoint=True)
    assert resumed.last_load is not None
    assert resumed.last_load.step == SAVE_STEPS
    assert resumed.last_load.source == "fallback"
    [diagnostic] = resumed.last_load.diagnostics
    assert diagnostic.path == str(newest)
    assert diagnostic.kind == "corrupted"
    assert any(str(newest) in str(w.message) for w in caught)
    assert resumed.state.global_step == 3 * SAVE_STEPS


def test_resume_true_without_checkpoints_says_so(tmp_path: Path) -> None:
    run = trainer(tmp_path)
    assert not run.has_checkpoint()
    with pytest.raises(asyncckpt.NoValidCheckpointError) as caught:
        train(run, resume_from_checkpoint=True)
    assert caught.value.diagnostics == []  # no candidate at all, as opposed to none usable
    assert caught.value.path == str(tmp_path / "asyncckpt")


class Opaque:
    """A value the format cannot hold and asyncckpt must never pickle."""


def test_a_value_the_format_cannot_hold_fails_at_save_and_nothing_is_written(tmp_path: Path) -> None:
    run = trainer(tmp_path, max_steps=SAVE_STEPS)
    optimizer = torch.optim.AdamW(run.model.parameters(), lr=1e-3)
    optimizer.param_groups[0]["owner"] = Opaque()
    run.optimizer = optimizer
    with pytest.raises(UnsupportedValueError, match="cannot store a value of type Opaque") as caught:
        train(run)
    assert caught.value.key == "state['optimizer']['param_groups'][0]['owner']"
    assert sorted(p.name for p in (tmp_path / "asyncckpt").iterdir()) == ["events.jsonl"]


def test_what_it_cannot_do_yet_is_refused_before_training(tmp_path: Path) -> None:
    run = trainer(tmp_path)
    run.args.load_best_model_at_end = True
    with pytest.raises(UsageError, match="load_best_model_at_end"):
        train(run)


class StopAt(transformers.TrainerCallback):  # type: ignore[misc]
    """Ends training after step ``step``, as a preemption would (its checkpoint still saved)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_one_file_or_the_directory_is_exact(tmp_path: Path) -> None:
    straight = trainer(tmp_path / "straight", max_steps=3 * SAVE_STEPS)
    train(straight)
    want = bitwise(final_state(straight))
    # the same run (max_steps sets the LR schedule), stopped after its second checkpoint
    train(trainer(tmp_path / "run", StopAt(2 * SAVE_STEPS), max_steps=3 * SAVE_STEPS, save_total_limit=None))
    first, _ = (info.path for info in asyncckpt.list_checkpoints(tmp_path / "run" / "asyncckpt"))
    for target, step in ((first, SAVE_STEPS), (tmp_path / "run" / "asyncckpt", 2 * SAVE_STEPS)):
        resumed = trainer(tmp_path / f"from-{step}", max_steps=3 * SAVE_STEPS)
        train(resumed, resume_from_checkpoint=str(target))
        assert resumed.last_load is not None and resumed.last_load.step == step
        assert bitwise(final_state(resumed)) == want, target


def test_a_broken_file_falls_back_within_its_directory(tmp_path: Path) -> None:
    train(trainer(tmp_path, max_steps=2 * SAVE_STEPS, save_total_limit=None))
    newest = asyncckpt.list_checkpoints(tmp_path / "asyncckpt")[-1].path
    with open(newest, "r+b") as file:
        file.truncate(os.path.getsize(newest) // 2)
    resumed = trainer(tmp_path, max_steps=3 * SAVE_STEPS, save_total_limit=None)
    with pytest.warns(RuntimeWarning, match="is not usable"):
        train(resumed, resume_from_checkpoint=str(newest))
    assert resumed.last_load is not None
    assert (resumed.last_load.step, resumed.last_load.source) == (SAVE_STEPS, "fallback")
    assert resumed.state.global_step == 3 * SAVE_STEPS


def plain_trainer(output_dir: Path, **overrides: Any) -> Any:
    args = arguments(output_dir, **overrides)
    return transformers.Trainer(model=straight_model(), args=args, train_dataset=Tokens())


def test_a_hugging_face_checkpoint_folder_resumes_the_trainers_own_way(tmp_path: Path) -> None:
    # A run switches to asyncckpt between two restarts: its last checkpoint is the Trainer's own.
    train(plain_trainer(tmp_path / "run", max_steps=SAVE_STEPS))
    folder = str(tmp_path / "run" / f"checkpoint-{SAVE_STEPS}")
    own = plain_trainer(tmp_path / "own", max_steps=2 * SAVE_STEPS)
    train(own, resume_from_checkpoint=folder)
    resumed = trainer(tmp_path / "run", max_steps=2 * SAVE_STEPS)
    train(resumed, resume_from_checkpoint=folder)
    assert resumed.last_load is None  # nothing of asyncckpt's was loaded
    assert resumed.state.global_step == 2 * SAVE_STEPS
    assert bitwise(final_state(resumed)) == bitwise(final_state(own))
    steps = [info.step for info in asyncckpt.list_checkpoints(tmp_path / "run" / "asyncckpt")]
    assert steps == [2 * SAVE_STEPS]


def test_resume_from_a_missing_path_says_it_is_missing(tmp_path: Path) -> None:
    run = trainer(tmp_path)
    missing = tmp_path / "asyncckpt" / "step-0000000004.ckpt"
    with pytest.raises(FileNotFoundError, match="step-0000000004.ckpt"):
        train(run, resume_from_checkpoint=str(missing))
    assert not (tmp_path / "asyncckpt").exists()  # nothing was trained or written
