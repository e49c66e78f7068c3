"""What of a state goes through DCP (written once, resharded) and what each rank keeps for itself.

``torch.nn.Module`` and ``torch.optim.Optimizer`` objects go through DCP: their state dicts come
from ``get_model_state_dict`` / ``get_optimizer_state_dict`` (FSDP2 and tensor-parallel
parameters as DTensors, each rank writing its own shards; replicated tensors, as under DDP,
written once in total), and go back with ``set_model_state_dict`` / ``set_optimizer_state_dict``,
at any world size. Everything else is per rank: plain values (``asyncckpt.rng_state()``) and
other objects with ``state_dict()`` (a per-rank data loader) are stored in the rank's own shard
file and restored to the same rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from .._tree import key_path
from ..errors import UnsupportedValueError, UsageError
from .dicts import StateDicts


@dataclass
class SplitState:
    """A state split in two: ``sharded`` is DCP's state dict, ``per_rank`` this rank's values."""

    sharded: dict[str, Any] = field(default_factory=dict)
    per_rank: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    optimizers: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = field(default_factory=dict)


def split_state(state: Mapping[str, Any], dicts: StateDicts | None = None) -> SplitState:
    """Split ``state`` (name → module, optimizer, object with ``state_dict()`` or plain value).

    With ``dicts``, DCP's state dicts of plain modules and optimizers are built from the names
    it learned at an earlier save of the same structure (see :mod:`asyncckpt.dist.dicts`).
    Call it on the thread that trains, between steps: DCP's state dicts of an FSDP2 model share
    the parameters' memory. Raises :class:`UsageError` for an optimizer whose parameters belong
    to no module of ``state``, :class:`UnsupportedValueError` for a DTensor outside a module or
    optimizer (a per-rank value cannot hold another rank's shards).
    """
    split = _objects(state)
    if dicts is None:
        _dcp_state_dicts(split)
    else:
        for name, module in split.modules.items():
            split.sharded[name] = dicts.model(name, module)
        for name, (module, optimizer) in split.optimizers.items():
            split.sharded[name] = dicts.optimizer(name, module, optimizer)
        dicts.forget(split.sharded)
    for name, value in state.items():
        if name in split.modules or name in split.optimizers:
            continue
        plain = value.state_dict() if _has_state_dict(value) else value
        _refuse_dtensors(plain, (name,))
        split.per_rank[name] = plain
    return split


def load_targets(objects: Mapping[str, Any]) -> SplitState:
    """The state dicts DCP loads into for ``objects`` (modules and optimizers); other objects'
    names are listed in ``per_rank`` with None."""
    split = _objects(objects)
    _dcp_state_dicts(split)
    split.per_rank = {name: None for name in objects if name not in split.sharded}
    return split


def _dcp_state_dicts(split: SplitState) -> None:
    for name, module in split.modules.items():
        split.sharded[name] = get_model_state_dict(module)
    for name, (module, optimizer) in split.optimizers.items():
        split.sharded[name] = get_optimizer_state_dict(module, optimizer)


def apply_sharded(targets: SplitState) -> None:
    """Load the state dicts DCP filled in into their modules and optimizers."""
    for name, module in targets.modules.items():
        set_model_state_dict(module, targets.sharded[name])
    for name, (module, optimizer) in targets.optimizers.items():
        set_optimizer_state_dict(module, optimizer, targets.sharded[name])


def apply_per_rank(objects: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """``load_state_dict`` the saved per-rank value of every other object of ``objects``."""
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module | torch.optim.Optimizer) or not _has_state_dict(obj):
            continue
        if name not in values:
            raise UsageError(f"objects[{name!r}] has no saved per-rank value in this checkpoint", key=name)
        obj.load_state_dict(values[name])


def _objects(state: Mapping[str, Any]) -> SplitState:
    split = SplitState()
    for name, value in state.items():
        if not isinstance(name, str):
            raise UsageError(f"state keys must be str, got {name!r}")
        if isinstance(value, torch.nn.Module):
            split.modules[name] = value
    for name, value in state.items():
        if isinstance(value, torch.optim.Optimizer):
            split.optimizers[name] = (_owner(name, value, split.modules), value)
    return split


def _owner(
    name: str, optimizer: torch.optim.Optimizer, modules: dict[str, torch.nn.Module]
) -> torch.nn.Module:
    wanted = set(map(id, chain.from_iterable(group["params"] for group in optimizer.param_groups)))
    for module in modules.values():
        if wanted <= set(map(id, module.parameters())):
            return module
    raise UsageError(
        f"the parameters of optimizer {name!r} do not all belong to one module of the state; "
        "save the model it optimizes under its own name too",
        key=name,
    )


def _has_state_dict(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


def _refuse_dtensors(value: Any, path: tuple[Any, ...]) -> None:
    if isinstance(value, DTensor):
        raise UnsupportedValueError(
            f"{key_path(path)} is a DTensor outside a module or optimizer; put it in a module",
            key=key_path(path),
        )
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_dtensors(item, (*path, key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _refuse_dtensors(item, (*path, index))
