"""A tiny Hugging Face Trainer run for tests/integrations/test_transformers.py (also imported by it).

Usage: python hf_trainer.py OUTPUT_DIR OUT_FILE [--kill-at STEP] [--resume]

Trains a 2-layer GPT-2 built from a config (nothing is downloaded) for ``MAX_STEPS`` steps on
CPU with ``AsyncCheckpointTrainer``, a checkpoint every ``SAVE_STEPS`` steps (the two newest
kept), then writes the final weights, optimizer, scheduler and ``TrainerState`` to OUT_FILE with
``asyncckpt.save``. ``--kill-at STEP`` sends SIGKILL at the end of that step (after at least one
commit); ``--resume`` passes ``resume_from_checkpoint=True``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

import asyncckpt
from asyncckpt.integrations.transformers import AsyncCheckpointTrainer

MAX_STEPS = 24
SAVE_STEPS = 4
SAMPLES = 40  # 10 steps an epoch: resumes land mid-epoch and at epoch starts
VOCAB = 64


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def arguments(output_dir: Path, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = {
        "max_steps": MAX_STEPS,
        "save_steps": SAVE_STEPS,
        "save_total_limit": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "warmup_steps": 3,
        "logging_steps": 5,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
        **overrides,
    }
    return TrainingArguments(str(output_dir), **options)


class KillAt(TrainerCallback):
    """SIGKILL at the end of step ``step``, once a checkpoint has been committed."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.trainer: AsyncCheckpointTrainer | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step and self.trainer is not None:
            if not asyncckpt.list_checkpoints(self.trainer.checkpoint_directory()):
                assert self.trainer.checkpointer is not None
                self.trainer.checkpointer.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def trainer(output_dir: Path, *callbacks: Any, **overrides: Any) -> AsyncCheckpointTrainer:
    return AsyncCheckpointTrainer(
        model=model(),
        args=arguments(output_dir, **overrides),
        train_dataset=Tokens(),
        callbacks=list(callbacks),
    )


def final_state(run: AsyncCheckpointTrainer) -> dict[str, Any]:
    state = dataclasses.asdict(run.state)
    for volatile in ("log_history", "total_flos"):  # timings and per-process sums
        state.pop(volatile)
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.lr_scheduler.state_dict(),
        "trainer_state": state,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    kill = [KillAt(options.kill_at)] if options.kill_at is not None else []
    run = trainer(options.output_dir, *kill)
    for callback in kill:
        callback.trainer = run
    run.train(resume_from_checkpoint=True if options.resume else None)
    asyncckpt.save(options.out, final_state(run), step=run.state.global_step)


if __name__ == "__main__":
    main()
