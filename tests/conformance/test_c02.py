"""Conformance C-02: a corrupted newest checkpoint falls back to the newest intact one, and the
diagnostics name the primary's failure: file, what failed, and where."""

from __future__ import annotations

from pathlib import Path

import torch

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt.catalog import checkpoint_name
from asyncckpt.loading import FAILED_LOG_NAME, load_latest, restore


def model_state(step: int) -> dict[str, torch.Tensor]:
    return {f"layers.{i}.weight": torch.full((64, 64), float(step * 10 + i)) for i in range(5)}


def test_c02_corrupted_primary_falls_back_with_diagnostics(tmp_path: Path) -> None:
    paths = [
        asyncckpt.save(tmp_path / checkpoint_name(step), {"model": model_state(step)}, step=step)
        for step in (100, 200, 300, 400, 500)
    ]
    primary = paths[-1]
    with open(primary, "rb") as file:
        layout = fmt.read_layout(file, str(primary))
    entry = next(t for t in layout.tensors if t.key == "model.layers.3.weight")
    blob = layout.blobs[entry.blob]
    data = bytearray(primary.read_bytes())
    data[blob.offset + 1000] ^= 0x01  # one bit inside the tensor's bytes
    primary.write_bytes(bytes(data))

    result = load_latest(tmp_path)

    assert (result.step, result.source, result.path) == (400, "fallback", paths[-2])
    assert torch.equal(result.state["model"]["layers.3.weight"], model_state(400)["layers.3.weight"])
    [diagnostic] = result.diagnostics
    assert diagnostic.path == str(primary)
    assert diagnostic.kind == "corrupted"
    assert "checksum mismatch in model.layers.3.weight" in diagnostic.reason
    assert f"at offset {blob.offset}" in diagnostic.reason
    assert result.summary.startswith(
        "found 5 checkpoints (1 valid, 1 corrupted, 3 not checked); resuming from step 400 "
        "(fallback: step 500 corrupted: checksum mismatch in model.layers.3.weight"
    )
    [line] = (tmp_path / FAILED_LOG_NAME).read_text().splitlines()
    assert line.split("|")[:2] == [str(primary), diagnostic.reason]

    model = torch.nn.ModuleDict(
        {"layers": torch.nn.ModuleList(torch.nn.Linear(64, 64, bias=False) for _ in range(5))}
    )
    restored = restore(tmp_path, {"model": model})
    assert (restored.step, restored.source) == (400, "fallback")
    assert restored.diagnostics[0].reason == diagnostic.reason
    assert torch.equal(model.state_dict()["layers.3.weight"], model_state(400)["layers.3.weight"])
