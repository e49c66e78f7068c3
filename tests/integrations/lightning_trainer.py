"""A tiny Lightning run for tests/integrations/test_lightning.py (also imported by it).

Usage: python lightning_trainer.py CHECKPOINT_DIR OUT_FILE [--kill-at STEP] [--resume]

Trains ``EPOCHS`` epochs of ``BATCHES`` batches with ``AsyncCheckpointIO`` and a
``ModelCheckpoint`` at every epoch end (the two newest kept, plus ``last.ckpt``), then writes the
final weights, optimizer, scheduler and loop counters to OUT_FILE with ``asyncckpt.save``.
``--kill-at STEP`` sends SIGKILL to the process before that step (after at least one commit);
``--resume`` passes the checkpoint directory as ``ckpt_path``.
"""

from __future__ import annotations

import argparse
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import asyncckpt
from asyncckpt.integrations.lightning import AsyncCheckpointIO

EPOCHS = 8
BATCHES = 4


class TinyModule(L.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 16, extra: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = torch.nn.functional.mse_loss(self.net(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def data() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(BATCHES * 8, 8, generator=generator)
    targets = torch.randn(BATCHES * 8, 2, generator=generator)
    return DataLoader(TensorDataset(inputs, targets), batch_size=8, shuffle=False)


class KillAt(L.Callback):
    """SIGKILL before ``step`` (global step), once a checkpoint has been committed."""

    def __init__(self, step: int, io: AsyncCheckpointIO, directory: Path) -> None:
        self.step, self.io, self.directory = step, io, directory

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            if not any(self.directory.glob("*.ckpt")):
                self.io.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def trainer(
    directory: Path,
    io: AsyncCheckpointIO,
    *extra: L.Callback,
    epochs: int = EPOCHS,
    attach: bool = True,
    save_top_k: int = 2,
    save_last: bool = True,
    mode: str = "max",
) -> L.Trainer:
    """A Trainer with ``io`` as its plugin (and as a callback too, if ``attach``)."""
    checkpoints = ModelCheckpoint(
        dirpath=directory,
        every_n_epochs=1,
        save_top_k=save_top_k,
        monitor="step",
        mode=mode,
        save_last=save_last,
    )
    return L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[io],
        callbacks=[checkpoints, *([io] if attach else []), *extra],
        accelerator="cpu",
    )


def final_state(trainer: L.Trainer, module: TinyModule) -> dict[str, Any]:
    """What an exact resume must reproduce: weights, optimizer, scheduler, the loops' counters
    and the callbacks' states (their paths relative to the checkpoint directory)."""
    checkpoint = trainer._checkpoint_connector.dump_checkpoint()
    directory = str(trainer.checkpoint_callback.dirpath)  # type: ignore[union-attr]
    return {
        "model": module.state_dict(),
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "loops": checkpoint["loops"],
        "callbacks": _relative(checkpoint["callbacks"], directory),
    }


def _relative(value: Any, directory: str) -> Any:
    """``value`` with ``directory`` cut from the start of every string (keys included)."""
    if isinstance(value, str):
        return value.removeprefix(directory)
    if isinstance(value, dict):
        return {_relative(k, directory): _relative(v, directory) for k, v in value.items()}
    return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    module = TinyModule()
    io = AsyncCheckpointIO()
    extra = [KillAt(options.kill_at, io, options.directory)] if options.kill_at is not None else []
    run = trainer(options.directory, io, *extra)
    run.fit(module, data(), ckpt_path=options.directory if options.resume else None)
    asyncckpt.save(options.out, final_state(run, module), step=run.global_step)


if __name__ == "__main__":
    main()
