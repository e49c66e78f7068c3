"""Which blobs may be copied while the trainer runs on, and the optimizer hooks that wait for them.

Parameters and optimizer state change only inside ``optimizer.step()``. Their copies may
therefore run while forward and backward run, provided the next step of every optimizer in the
state first waits for them: that is what the step pre-hook installed here does. Every other
tensor (buffers such as BatchNorm's running statistics, tensors of a plain state dict, extras) is
copied before ``save()`` returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .snapshot import Snapshot, StorageKey, storage_key
from .staging import StagedCopy


def optimizers_in(state: Any) -> list[torch.optim.Optimizer]:
    """The optimizer objects in ``state`` (dicts, lists and tuples are searched)."""
    found: list[torch.optim.Optimizer] = []
    stack = [state]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.optim.Optimizer):
            found.append(value)
        elif isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return found


def optimizer_storages(optimizers: list[torch.optim.Optimizer]) -> set[StorageKey]:
    """The storages that only ``step()`` of ``optimizers`` writes: parameters and their state."""
    storages: set[StorageKey | None] = set()
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            storages.update(storage_key(param) for param in group["params"])
        for per_param in optimizer.state.values():
            if isinstance(per_param, Mapping):
                storages.update(storage_key(v) for v in per_param.values() if isinstance(v, torch.Tensor))
    storages.discard(None)
    return storages  # type: ignore[return-value]


def step_guarded_blobs(snapshot: Snapshot, optimizers: list[torch.optim.Optimizer]) -> frozenset[int]:
    """Indices of the blobs whose whole storage belongs to ``optimizers``."""
    if not optimizers:
        return frozenset()
    storages = optimizer_storages(optimizers)
    return frozenset(i for i, blob in enumerate(snapshot.blobs) if storage_key(blob.tensor) in storages)


class StepGuard:
    """Makes the next ``step()`` of each hooked optimizer wait for the newest staged copy.

    Copies finish in the order they were staged (one copier thread, one side stream), so waiting
    for the newest is waiting for all.
    """

    def __init__(self) -> None:
        self._pending: StagedCopy | None = None
        self._hooks: dict[int, Any] = {}

    def arm(self, staged: StagedCopy, optimizers: list[torch.optim.Optimizer]) -> None:
        self._pending = staged
        for optimizer in optimizers:
            if id(optimizer) not in self._hooks:
                self._hooks[id(optimizer)] = optimizer.register_step_pre_hook(self._before_step)

    def wait(self) -> None:
        """Wait for the newest staged copy (the hooks call this before a step)."""
        staged, self._pending = self._pending, None
        if staged is not None:
            staged.guard()

    def _before_step(self, *_: Any) -> None:
        self.wait()

    def remove(self) -> None:
        """Wait for the pending copy, then remove every hook."""
        self.wait()
        for hook in self._hooks.values():
            hook.remove()
        self._hooks.clear()
