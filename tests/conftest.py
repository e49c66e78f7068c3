"""Shared fixtures: a temporary directory, a rich deterministic state tree, exact comparison."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncckpt.dtypes import DTYPE_BY_NAME

SEED = 20240601


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    """An empty directory of its own for each test."""
    return tmp_path


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A contiguous tensor of ``dtype`` whose bytes are random (bool: 0 or 1 only)."""
    numel = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def plain_values() -> dict[Any, Any]:
    """Every kind of non-tensor leaf, under str and int keys in a deliberate order."""
    return {
        "zebra": None,
        7: True,
        "alpha": False,
        -3: 0,
        "ints": [1, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**70, -(2**70), 10**40],
        "floats": [0.0, -0.0, 1.5, -2.25e-310, math.inf, -math.inf, math.nan, 1e308],
        "text": ["", "hello", "héllo ✓ 𝄞", "\x00nul"],
        "bytes": [b"", b"\x00\xff\x80", bytes(range(256))],
        "nested": {"tuple": (1, (2, ("three",)), [4.0, None]), "empty": ({}, [], ())},
        2**64 - 1: "the largest int key",
        -(2**63): "the smallest int key",
    }


def dtype_tensors(generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """For every storable dtype: full, 0-dim, zero-size and two non-contiguous tensors."""
    found = {}
    for name, dtype in DTYPE_BY_NAME.items():
        found[name] = {
            "full": random_tensor(dtype, (4, 6), generator),
            "scalar": random_tensor(dtype, (), generator),
            "empty": random_tensor(dtype, (0, 3), generator),
            "transposed": random_tensor(dtype, (3, 5), generator).t(),
            "stepped": random_tensor(dtype, (4, 7), generator)[1:, ::3],
        }
    return found


TrainingObjects = tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]


def untrained_objects(seed: int = SEED) -> TrainingObjects:
    """A tiny model with tied embedding/output weights and a buffer, Adam, and a StepLR."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.ModuleDict(
            {"embed": torch.nn.Embedding(10, 4), "mix": torch.nn.Linear(4, 4), "head": torch.nn.Linear(4, 10)}
        )
    model["head"].weight = model["embed"].weight  # tied weights
    model.register_buffer("counter", torch.tensor(seed, dtype=torch.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def trained_objects() -> TrainingObjects:
    """:func:`untrained_objects` after one optimizer step and one scheduler step (Adam has state)."""
    model, optimizer, scheduler = untrained_objects()
    tokens = torch.tensor([1, 2, 3, 4])
    logits = model["head"](torch.tanh(model["mix"](model["embed"](tokens))))
    torch.nn.functional.cross_entropy(logits, torch.tensor([2, 3, 4, 5])).backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


@pytest.fixture
def trained() -> TrainingObjects:
    """Model, optimizer and scheduler after one training step (deterministic)."""
    return trained_objects()


@pytest.fixture
def untrained() -> TrainingObjects:
    """Model, optimizer and scheduler of the same shapes, different values, never stepped."""
    return untrained_objects(seed=SEED + 1)


def build_rich_state() -> dict[Any, Any]:
    """A deterministic state with every kind of value the format stores (see the conformance suite)."""
    generator = torch.Generator().manual_seed(SEED)
    base = torch.arange(24, dtype=torch.float32)
    tied = random_tensor(torch.float32, (3, 3), generator)
    model, optimizer, scheduler = trained_objects()
    return {
        "plain": plain_values(),
        "tensors": dtype_tensors(generator),
        "views": {
            "slice": base[2:10],
            "grid": base.view(4, 6)[:, 1::2],
            "as_int": base.view(torch.int32)[4:8],
            "whole": base,
        },
        "tied": {"encoder": tied, "decoder": tied},
        "model": model.state_dict(),
        "optim": optimizer.state_dict(),
        "sched": scheduler.state_dict(),
        "steps": (1, 2, 3),
    }


@pytest.fixture
def rich_state() -> dict[Any, Any]:
    """A fresh :func:`build_rich_state` for each test."""
    return build_rich_state()


@pytest.fixture(scope="session")
def rich_state_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`build_rich_state` saved once per session at step 1 (treat it as read-only)."""
    import asyncckpt

    path = tmp_path_factory.mktemp("rich") / "step-0000000001.ckpt"
    return asyncckpt.save(path, build_rich_state(), step=1)


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor``'s elements in logical (row-major) order, as a 1-D uint8 tensor."""
    # A fresh tensor with row-major strides: contiguous() keeps odd strides of size-1 dimensions.
    flat = torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor.detach()).reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def assert_identical(expected: Any, actual: Any, path: str = "state") -> None:
    """Exact equality of state trees: container types (a Mapping becomes a dict), key order and
    types, int vs float vs bool, floats bit for bit (nan-safe, -0.0 distinct), tensors' dtype,
    shape and bytes. A failure names the path."""
    if isinstance(expected, torch.Tensor):
        assert type(actual) is torch.Tensor, f"{path}: {type(actual).__name__}, expected a tensor"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype}, expected {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape}, expected {expected.shape}"
        assert not actual.requires_grad, f"{path}: restored tensors do not require grad"
        assert torch.equal(tensor_bytes(actual), tensor_bytes(expected)), f"{path}: bytes differ"
        return
    if isinstance(expected, Mapping):
        assert type(actual) is dict, f"{path}: {type(actual).__name__}, expected dict"
        assert [(type(k), k) for k in actual] == [(type(k), k) for k in expected], f"{path}: keys differ"
        for key in expected:
            assert_identical(expected[key], actual[key], f"{path}[{key!r}]")
        return
    assert type(actual) is type(expected), (
        f"{path}: {type(actual).__name__}, expected {type(expected).__name__}"
    )
    if isinstance(expected, list | tuple):
        assert len(actual) == len(expected), f"{path}: length {len(actual)}, expected {len(expected)}"
        for i, (want, got) in enumerate(zip(expected, actual, strict=True)):
            assert_identical(want, got, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert struct.pack("<d", actual) == struct.pack("<d", expected), f"{path}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


@pytest.fixture
def assert_same_state() -> Callable[[Any, Any], None]:
    """:func:`assert_identical`, as a fixture for test modules that cannot import conftest."""
    return assert_identical
