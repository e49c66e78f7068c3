"""Where ``restore`` reads a blob straight into: the live tensors of the objects it restores.

A module's parameters and buffers, and an optimizer's existing state tensors (its moments survive
``load_state_dict``, which keeps tensors of the right dtype and device as they are), receive the
bytes of a blob that holds exactly them (same dtype and shape, contiguous, the blob's only
tensor), so no second copy is made. A module whose every tensor was read in place, and whose
loading torch's defaults do (no hook, no override), already holds the checkpoint:
:func:`loaded_in_place` says so, and ``restore`` skips its ``load_state_dict``, which would copy
each tensor onto itself (and costs time quadratic in the number of submodules in torch 2.x).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import format as fmt
from .expect import Refs
from .modules import ModuleStates

KeyPath = tuple[Any, ...]


@dataclass(frozen=True)
class Targets:
    """Where ``restore`` reads blobs straight into, and the state dicts they were taken from."""

    blobs: dict[int, torch.Tensor]  # blob index → the live tensor its bytes go straight into
    modules: ModuleStates  # object name → the module's state_dict() of those tensors


def direct_targets(
    objects: Mapping[str, Any], layout: fmt.Layout, refs: Refs, modules: ModuleStates
) -> Targets:
    """Blob index → the live tensor its bytes go straight into (``refs``: :func:`layout_refs`;
    ``modules``: each module's ``state_dict()``, :class:`~.modules.LiveModules`)."""
    destinations = _live_tensors(objects, modules)
    users = Counter(entry.blob for entry in layout.tensors)
    direct: dict[int, torch.Tensor] = {}
    used: set[tuple[int, int]] = set()
    memory_of = _TargetMemory(layout)
    tensors = layout.tensors
    for path, node in refs:
        target = destinations.get(path)
        if target is None:
            continue
        entry = tensors[node.index]
        if entry.blob in direct or users[entry.blob] != 1:
            continue
        memory = memory_of(entry, target)
        if memory is not None and memory not in used:
            direct[entry.blob] = target
            used.add(memory)
    return Targets(direct, modules)


def loaded_in_place(name: str, module: torch.nn.Module, saved: Any, targets: Targets) -> bool:
    """Whether ``module.load_state_dict(saved, strict=True)`` would change nothing: ``saved`` has
    exactly the keys of its state dict, each value the plain tensor of that key that was read
    in place (one of ``targets.blobs``), and loading is torch's default all the way down (no
    load hook, no override of ``load_state_dict``, ``_load_from_state_dict`` or
    ``set_extra_state``, no swapping of parameters)."""
    live = targets.modules.get(name)
    if live is None or type(saved) is not dict or not _loads_by_default(module):
        return False
    if saved.keys() != live.keys():
        return False
    in_place = {id(tensor) for tensor in targets.blobs.values()}
    for key, value in live.items():
        if saved[key] is not value or id(value) not in in_place or type(value) is not torch.Tensor:
            return False
    return True


def _loads_by_default(module: torch.nn.Module) -> bool:
    base = torch.nn.Module
    if type(module).load_state_dict is not base.load_state_dict or "load_state_dict" in vars(module):
        return False
    if torch.__future__.get_swap_module_params_on_conversion():
        return False
    for sub in module.modules():
        kind, own = type(sub), vars(sub)
        if (
            kind._load_from_state_dict is not base._load_from_state_dict
            or kind.set_extra_state is not base.set_extra_state
            or "_load_from_state_dict" in own  # a method replaced on the instance
            or "set_extra_state" in own
            or sub._load_state_dict_pre_hooks
            or sub._load_state_dict_post_hooks
        ):
            return False
    return True


def _live_tensors(objects: Mapping[str, Any], modules: ModuleStates) -> dict[KeyPath, torch.Tensor]:
    """Key path in the state → an existing tensor the checkpoint's bytes may be read into
    (``modules``: each module's ``state_dict()``)."""
    found: dict[KeyPath, torch.Tensor] = {}
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            for key, value in modules[name].items():
                if isinstance(value, torch.Tensor):
                    found[(name, key)] = value
        elif isinstance(obj, torch.optim.Optimizer):
            found.update(_optimizer_tensors(name, obj))
    return found


def _optimizer_tensors(name: str, optimizer: torch.optim.Optimizer) -> dict[KeyPath, torch.Tensor]:
    """The optimizer's state tensors under their ``state_dict()`` paths.

    ``state_dict()`` numbers parameters in param-group order; walking ``state`` in that order
    gives the same paths without calling it (some optimizers, e.g. ZeroRedundancyOptimizer,
    refuse ``state_dict()`` until consolidated).
    """
    found: dict[KeyPath, torch.Tensor] = {}
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for index, param in enumerate(params):
        per_param = optimizer.state.get(param)
        if isinstance(per_param, Mapping):
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor):
                    found[(name, "state", index, key)] = value
    return found


class _TargetMemory:
    """The memory of ``target`` (its device index, -1 for the CPU, and its storage's address)
    when a blob's bytes are exactly ``target``'s, else None: its one tensor has the target's dtype
    and shape, contiguous from the blob's first byte, and the target is a dense contiguous CPU
    or CUDA tensor whose memory holds its values as they are (no conjugate or negative bit:
    the bytes read would not be its values, and such a view cannot be viewed as bytes).

    The cheapest torch attributes come first (each costs about 0.1 us: 10,000 tensors
    pay for every one); the entry's contiguity is its strides equal to the contiguous target's,
    else worked out once per shape and stride (many tensors share one)."""

    def __init__(self, layout: fmt.Layout) -> None:
        self.blobs = layout.blobs
        self.contiguous: dict[tuple[tuple[int, ...], tuple[int, ...]], bool] = {}

    def __call__(self, entry: fmt.TensorEntry, target: torch.Tensor) -> tuple[int, int] | None:
        if entry.offset != 0 or target.layout != torch.strided or target.dtype != entry.dtype:
            return None
        nbytes = target.nbytes
        if nbytes == 0 or self.blobs[entry.blob].nbytes != nbytes or target.shape != entry.shape:
            return None
        if not target.is_contiguous() or target.is_conj() or target.is_neg():
            return None
        if target.stride() != entry.stride and not self._contiguous(entry.shape, entry.stride):
            return None
        if target.is_cpu:
            return -1, target.untyped_storage().data_ptr()
        return (target.get_device(), target.untyped_storage().data_ptr()) if target.is_cuda else None

    def _contiguous(self, shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
        known = self.contiguous.get((shape, stride))
        if known is None:
            known = self.contiguous[(shape, stride)] = _contiguous(shape, stride)
        return known


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True
