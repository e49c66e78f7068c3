"""The same plugin for the ``pytorch_lightning`` package: saves asyncckpt files, resumes from a directory."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

pl = pytest.importorskip("pytorch_lightning")

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt.integrations.pytorch_lightning import AsyncCheckpointIO  # noqa: E402

pytestmark = pytest.mark.timeout(120)


class Tiny(pl.LightningModule):  # type: ignore[misc]
    def __init__(self, root: Path = Path("data")) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self.net(inputs), targets)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(directory: Path, epochs: int, ckpt_path: Any = None) -> Any:
    io = AsyncCheckpointIO()
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[io],
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=directory, save_last=True), io],
    )
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16, 1)), batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Tiny(), data, ckpt_path=ckpt_path)
    return trainer, io


def test_pytorch_lightning_checkpoints_through_asyncckpt_and_resumes(tmp_path: Path) -> None:
    fit(tmp_path, epochs=1)
    loaded = asyncckpt.load(tmp_path / "last.ckpt")
    assert loaded.step == 2
    assert loaded.state["hyper_parameters"] == {"root": Path("data")}
    trainer, io = fit(tmp_path, epochs=2, ckpt_path=tmp_path)
    assert io.last_load is not None and io.last_load.step == 2
    assert trainer.global_step == 4


def test_pytorch_lightning_falls_back_past_a_corrupted_newest_checkpoint(tmp_path: Path) -> None:
    fit(tmp_path, epochs=1)  # epoch=0-step=2.ckpt, then last.ckpt: the newest, at the same step
    last = tmp_path / "last.ckpt"
    weight = asyncckpt.load(last).state["state_dict"]["net.weight"].numpy().tobytes()
    data = bytearray(last.read_bytes())
    data[data.index(weight)] ^= 0x01  # a flipped bit in a tensor: its checksum fails
    last.write_bytes(bytes(data))
    trainer, io = fit(tmp_path, epochs=2, ckpt_path=tmp_path)  # (the warning: test_lightning.py)
    assert io.last_load is not None
    assert (Path(io.last_load.path).name, io.last_load.source) == ("epoch=0-step=2.ckpt", "fallback")
    assert [(d.path, d.kind) for d in io.last_load.diagnostics] == [(str(last), "corrupted")]
    assert trainer.global_step == 4
