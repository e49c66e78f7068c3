"""Which blobs may be copied while the trainer runs on, and the optimizer hooks that wait for them.

Parameters and optimizer state change only inside ``optimizer.step()``. Their copies may
therefore run while forward and backward run, provided the next step of every optimizer in the
state first waits for them: that is what the step pre-hook installed here does. Every other
tensor (buffers such as BatchNorm's running statistics, weights that forward renormalises,
tensors of a plain state dict, extras) is copied before ``save()`` returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch

from .snapshot import Snapshot, StorageKey, storage_key
from .staging import StagedCopy

T = TypeVar("T")


def optimizers_in(state: Any) -> list[torch.optim.Optimizer]:
    """The optimizer objects in ``state`` (dicts, lists and tuples are searched)."""
    return _objects_in(state, torch.optim.Optimizer)


def modules_in(state: Any) -> list[torch.nn.Module]:
    """The module objects in ``state`` (dicts, lists and tuples are searched)."""
    return _objects_in(state, torch.nn.Module)


def _objects_in(state: Any, kind: type[T]) -> list[T]:
    found: list[T] = []
    stack = [state]
    while stack:
        value = stack.pop()
        if isinstance(value, kind):
            found.append(value)
        elif isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return found


def forward_written_storages(modules: Sequence[torch.nn.Module]) -> set[StorageKey]:
    """Parameters that forward itself changes in place, so the step hook cannot guard them.

    ``nn.Embedding`` / ``nn.EmbeddingBag`` with ``max_norm`` renormalise the rows they look up.
    """
    storages: set[StorageKey | None] = set()
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, torch.nn.Embedding | torch.nn.EmbeddingBag) and sub.max_norm is not None:
                storages.add(storage_key(sub.weight))
    storages.discard(None)
    return storages  # type: ignore[return-value]


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


def step_guarded_blobs(
    snapshot: Snapshot,
    optimizers: list[torch.optim.Optimizer],
    modules: Sequence[torch.nn.Module] = (),
) -> frozenset[int]:
    """Indices of the blobs whose storage only the step of ``optimizers`` changes.

    Storages of ``optimizers`` (parameters and state), less those that forward of one of
    ``modules`` writes (:func:`forward_written_storages`).
    """
    if not optimizers:
        return frozenset()
    storages = optimizer_storages(optimizers) - forward_written_storages(modules)
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
