"""Shared helpers of the load-side tests: states, checkpoints, damage, a log recorder, models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt.catalog import FAILED_LOG_NAME, checkpoint_name
from asyncckpt.storage import PosixFile, PosixStorage


def make_state(step: int, *, width: int = 8) -> dict[str, Any]:
    """A small state whose every value depends on ``step``."""
    base = torch.arange(width * 4, dtype=torch.float32).reshape(width, 4)
    return {
        "model": {
            "layers.0.weight": base + step,
            "layers.0.bias": torch.full((width,), float(step)),
            "layers.1.weight": (base.t() * step).contiguous(),
        },
        "optimizer": {"state": {0: {"exp_avg": base * 0.5}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "step": step,
    }


def write(directory: Path, step: int, state: Any = None) -> Path:
    return asyncckpt.save(
        directory / checkpoint_name(step), make_state(step) if state is None else state, step=step
    )


def write_steps(directory: Path, *steps: int) -> list[Path]:
    return [write(directory, step) for step in steps]


def layout_of(path: Path) -> fmt.Layout:
    with open(path, "rb") as file:
        return fmt.read_layout(file, str(path))


def blob_of(path: Path, key: str) -> fmt.BlobEntry:
    layout = layout_of(path)
    entry = next(t for t in layout.tensors if t.key == key)
    return layout.blobs[entry.blob]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_blob_byte(path: Path, key: str = "model.layers.0.weight", at: int = 5) -> int:
    offset = blob_of(path, key).offset + at
    flip_byte(path, offset)
    return offset


def truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as file:
        file.truncate(keep)


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != FAILED_LOG_NAME}


def failed_lines(directory: Path) -> list[list[str]]:
    text = (directory / FAILED_LOG_NAME).read_text(encoding="utf-8")
    return [line.split("|") for line in text.splitlines()]


def assert_same_state(got: Any, want: Any) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for key in want:
            assert_same_state(got[key], want[key])
    elif isinstance(want, list | tuple):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same_state(g, w)
    else:
        assert got == want


class Recorder:
    """A ``log`` callable that keeps its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.calls.append((event, fields))


def mlp(width: int = 8, *, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


def trained(
    width: int = 8, *, seed: int = 0, steps: int = 2
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = mlp(width, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    return model, optimizer


def save_objects(
    directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> Path:
    state = {"model": model, "optimizer": optimizer, "step": step}
    return asyncckpt.save(directory / checkpoint_name(step), state, step=step)


class PruningStorage(PosixStorage):
    """A POSIX storage whose ``open`` first deletes the objects in ``prune`` (once each): like a
    writer's retention removing a checkpoint between a reader's listing and its opening.

    ``commit_before_prune`` maps a name to a state saved (as that step) just before it is
    pruned, like the trainer's newer commit that made retention run.
    """

    def __init__(
        self, root: Path, prune: set[str], commit_before_prune: dict[str, int] | None = None
    ) -> None:
        super().__init__(root)
        self.prune = set(prune)
        self.commits = dict(commit_before_prune or {})
        self.opened: list[str] = []

    def open(self, name: str) -> PosixFile:
        self.opened.append(name)
        if name in self.prune:
            self.prune.discard(name)
            step = self.commits.pop(name, None)
            if step is not None:
                write(self.root, step)
            self.delete([name])
        return super().open(name)


def hand_made(path: Path, step: int, rows: list[list[Any]], tree: Any, data: bytes = bytes(64)) -> Path:
    """A v1 file written by hand, checksums consistent: ``rows`` are tensor-table rows
    ``[key, dtype, shape, stride, blob, offset]`` over one blob holding ``data``."""
    import crc32c

    fields = {
        "format": "asyncckpt",
        "version": "1.0",
        "status": "complete",
        "step": step,
        "created": "2026-01-01T00:00:00.000000+00:00",
        "writer": "hand-made",
        "metadata": {},
        "blobs": [[4096, len(data), crc32c.crc32c(data)]],
        "tensors": rows,
        "tree": tree,
    }
    raw = fmt.pack(fields)
    body = fmt.encode_prelude() + bytes(4096 - 64) + data
    path.write_bytes(body + raw + fmt.encode_trailer(len(body), raw))
    return path
