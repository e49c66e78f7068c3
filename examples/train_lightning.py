"""PyTorch Lightning with asyncckpt: run it, kill it, run it again.

    python examples/train_lightning.py --dir runs/lightning --epochs 5

Five lines differ from the same script without asyncckpt (marked ``# asyncckpt``): the import,
the plugin, passing it as the Trainer's plugin and as a callback (so that copies of parameters and
optimizer state overlap training), and ``ckpt_path``, which resumes from the newest valid
checkpoint of the directory. Three are enough: the import, ``plugins=[AsyncCheckpointIO()]`` and
``ckpt_path``; the copies are then made inside each save.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from asyncckpt.integrations.lightning import AsyncCheckpointIO, resume_path  # asyncckpt


class Regression(L.LightningModule):
    def __init__(self, lr: float = 1e-2, hidden: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = torch.nn.functional.mse_loss(self.net(inputs), targets)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default="runs/lightning", help="checkpoint directory")
    parser.add_argument("--epochs", type=int, default=5)
    options = parser.parse_args()

    L.seed_everything(0)
    inputs = torch.randn(512, 16)
    data = DataLoader(TensorDataset(inputs, inputs.sum(1, keepdim=True)), batch_size=32)
    checkpoints = ModelCheckpoint(dirpath=options.dir, save_top_k=2, monitor="train_loss", save_last=True)
    io = AsyncCheckpointIO()  # asyncckpt
    trainer = L.Trainer(
        max_epochs=options.epochs,
        plugins=[io],  # asyncckpt
        callbacks=[checkpoints, io],  # asyncckpt: io here too lets the copies overlap training
        logger=False,
        enable_progress_bar=False,
    )
    trainer.fit(Regression(), data, ckpt_path=resume_path(options.dir))  # asyncckpt: None on a fresh run
    print(f"trained to epoch {trainer.current_epoch}, step {trainer.global_step}")


if __name__ == "__main__":
    main()
