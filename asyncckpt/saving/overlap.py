"""Which blobs may be copied while the trainer runs on, and the optimizer hooks that wait for them.

Parameters and optimizer state change only inside ``optimizer.step()``. Their copies may
therefore run while forward and backward run, provided the next optimizer step first waits for
them: that is what the step pre-hook installed here does. Every other
tensor (buffers such as BatchNorm's running statistics, weights that forward renormalises,
tensors of a plain state dict, extras) is copied before ``save()`` returns.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .._tree import walk
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
    return [leaf for _, leaf in walk(state) if isinstance(leaf, kind)]


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


def step_guarded_blobs(
    snapshot: Snapshot,
    optimizers: Sequence[torch.optim.Optimizer],
    modules: Sequence[torch.nn.Module] = (),
) -> frozenset[int]:
    """Indices of the blobs whose storage only an optimizer step changes.

    A blob qualifies when its storage is a parameter of one of ``optimizers`` that is also a
    parameter of one of ``modules`` (so that asyncckpt can see how the module uses it), or a
    tensor of an optimizer's state; parameters that forward of a module writes
    (:func:`forward_written_storages`) never qualify. An optimizer whose parameters or state
    cannot be read (a wrapper that is not a real ``Optimizer``) guards nothing.
    """
    if not optimizers:
        return frozenset()
    params: set[StorageKey | None] = set()
    state: set[StorageKey | None] = set()
    for optimizer in optimizers:
        try:
            groups, per_param_states = list(optimizer.param_groups), list(optimizer.state.values())
        except (AttributeError, TypeError):
            continue
        for group in groups:
            params.update(storage_key(param) for param in group["params"])
        for per_param in per_param_states:
            if isinstance(per_param, Mapping):
                state.update(storage_key(v) for v in per_param.values() if isinstance(v, torch.Tensor))
    seen = {storage_key(param) for module in modules for param in module.parameters()}
    guarded = ((params & seen) | state) - forward_written_storages(modules) - {None}
    return frozenset(i for i, blob in enumerate(snapshot.blobs) if blob.storage in guarded)


class StepGuard:
    """Makes every optimizer step in the process wait for the pending staged copies.

    One global step pre-hook (``torch.optim.optimizer.register_optimizer_step_pre_hook``) while
    copies may be pending: it also covers optimizers created after the save, wrappers whose own
    ``step()`` runs no hooks (the inner optimizer's step does), and a parameter shared with an
    optimizer that is not in the state. Waiting costs nothing once the copies are done.
    """

    def __init__(self) -> None:
        self._pending: list[StagedCopy] = []
        self._lock = threading.Lock()
        self._hook: Any = None

    def arm(self, staged: StagedCopy) -> None:
        with self._lock:
            # Copies that ended need no wait: drop them, so saves without steps hold nothing.
            self._pending = [pending for pending in self._pending if not pending.done()]
            self._pending.append(staged)
            if self._hook is None:
                self._hook = register_optimizer_step_pre_hook(self._before_step)

    def wait(self) -> None:
        """Wait for every pending staged copy (the hook calls this before a step)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for staged in pending:
            staged.guard()

    def _before_step(self, *_: Any) -> None:
        self.wait()

    def remove(self) -> None:
        """Wait for the pending copies, then remove the hook."""
        self.wait()
        with self._lock:
            hook, self._hook = self._hook, None
        if hook is not None:
            hook.remove()
