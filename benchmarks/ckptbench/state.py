"""The benchmark's training state: a model of fp32/bf16 parameters and a filled Adam optimizer.

Each parameter brings four tensors to the state: the weight itself, Adam's ``exp_avg`` and
``exp_avg_sq`` (same dtype and shape) and its 0-dim ``step`` tensor, exactly what
``torch.optim.Adam.state_dict()`` holds. Sizes are spread log-normally (a few large matrices,
many small ones, one bias-like vector in four) and scaled so that the bytes add up to the
requested total.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

TENSORS_PER_PARAM = 4  # weight, exp_avg, exp_avg_sq, step
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``"256M"`` → 268435456 (binary units K, M, G; a bare number is bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"not a size: {text!r} (examples: 256M, 1G, 1.5G)")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def format_size(nbytes: int) -> str:
    """268435456 → ``"256M"``; 1.5 GiB → ``"1.5G"``."""
    for unit in ("G", "M", "K"):
        if nbytes >= _UNITS[unit]:
            value = nbytes / _UNITS[unit]
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{nbytes}"


class ParamModel(torch.nn.Module):
    """A module that only holds parameters (named ``layers.<i>.weight`` / ``.bias``)."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for param in params:
            layer = torch.nn.Module()
            layer.register_parameter("weight" if param.dim() == 2 else "bias", param)
            self.layers.append(layer)


@dataclass
class BenchState:
    """One benchmark state: the objects and what each saver gets from them."""

    model: ParamModel
    optimizer: torch.optim.Adam
    nbytes: int
    n_tensors: int

    def objects(self) -> dict[str, Any]:
        """What a trainer hands to asyncckpt: objects with ``state_dict()``."""
        return {"model": self.model, "optimizer": self.optimizer}

    def state_dict(self) -> dict[str, Any]:
        """What a trainer hands to torch.save / DCP: the plain state dicts."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the state, in state-dict order."""
        return list(flat_tensors(self.state_dict()).values())


def flat_tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a nested state dict under dotted keys (safetensors' flat dict)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flat_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            out.update(flat_tensors(value, f"{prefix}.{i}" if prefix else str(i)))
    return out


def build_state(total_bytes: int, n_tensors: int, *, seed: int = 0) -> BenchState:
    """A state of about ``total_bytes`` in exactly ``n_tensors`` tensors (a multiple of 4)."""
    n_params = max(1, n_tensors // TENSORS_PER_PARAM)
    generator = torch.Generator().manual_seed(seed)
    fill = _Filler(generator)
    weights = torch.randn(n_params, generator=generator).mul_(0.8).exp_()
    dtypes = [torch.bfloat16 if i % 2 == 0 else torch.float32 for i in range(n_params)]
    is_bias = [i % 4 == 3 for i in range(n_params)]
    for i in range(n_params):
        if is_bias[i]:
            weights[i] *= 0.02
    # Each parameter's bytes count three times (weight + two moments) plus a 4-byte step.
    budget = total_bytes - 4 * n_params
    scale = budget / 3 / float(weights.sum())
    params = []
    for i in range(n_params):
        itemsize = torch.empty(0, dtype=dtypes[i]).element_size()
        numel = max(1, int(weights[i] * scale) // itemsize)
        params.append(torch.nn.Parameter(fill(_shape(numel, is_bias[i]), dtypes[i])))
    model = ParamModel(params)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for param in params:
        optimizer.state[param] = {
            "step": torch.tensor(100.0),
            "exp_avg": fill(param.shape, param.dtype).mul_(1e-3),
            "exp_avg_sq": fill(param.shape, param.dtype).square_().mul_(1e-6),
        }
    nbytes = sum(t.numel() * t.element_size() for t in flat_tensors(_plain(model, optimizer)).values())
    return BenchState(model, optimizer, nbytes, n_params * TENSORS_PER_PARAM)


def _plain(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def _shape(numel: int, is_bias: bool) -> tuple[int, ...]:
    if is_bias or numel < 1024:
        return (numel,)
    cols = 1 << min(12, int(math.log2(math.isqrt(numel))))
    return (max(1, numel // cols), cols)


_POOL_ELEMENTS = 1 << 20


class _Filler:
    """Random values in [-1, 1), tiled from a 1 Mi-element pool per dtype (generating GiBs of fresh
    random numbers takes minutes on a small machine; the bytes only need to be non-trivial)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.pools: dict[torch.dtype, torch.Tensor] = {}
        self.cursor = 0

    def __call__(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        pool = self.pools.get(dtype)
        if pool is None:
            pool = torch.empty(2 * _POOL_ELEMENTS, dtype=torch.float32)
            pool = pool.uniform_(-1.0, 1.0, generator=self.generator).to(dtype)
            self.pools[dtype] = pool
        tensor = torch.empty(shape, dtype=dtype)
        flat = tensor.view(-1)
        for begin in range(0, flat.numel(), _POOL_ELEMENTS):
            n = min(_POOL_ELEMENTS, flat.numel() - begin)
            self.cursor = (self.cursor + 7919) % _POOL_ELEMENTS
            flat[begin : begin + n].copy_(pool[self.cursor : self.cursor + n])
        return tensor
