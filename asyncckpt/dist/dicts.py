"""DCP's state dicts of plain modules and optimizers, without DCP's per-call name derivation.

``get_model_state_dict`` and ``get_optimizer_state_dict`` work out every parameter's canonical
name (its FQN) on every call: walks of the module tree and a string walk per key and per
parameter, about 0.24 s for 10,000 tensors, paid in every ``save()``. For a module whose
parameters are plain tensors or DTensors (DDP, FSDP2, tensor parallel, a plain module), what
they return with DCP's default options (nothing gathered, nothing moved) is fixed by the structure:
the module's own ``state_dict()`` with its keys renamed (wrapper prefixes such as DDP's
``module.`` removed), and the optimizer's ``state_dict()`` with each parameter's index replaced
by its name. :class:`StateDicts` learns the renaming from DCP's own result the first time it
sees a structure, checks it against that result, and applies it to the ``state_dict()`` calls of
the later saves while the structure stays the same: the same module and optimizer objects, the
same keys, the same parameter objects under the same names and in the same groups.

Anything else gets DCP's functions on every call: other tensor-subclass parameters, FSDP1
wrappers, a ``state_dict`` replaced on the object, an empty
module state, an optimizer without state yet (DCP initializes it), or a renaming whose result
would not equal DCP's.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor

_Ref = weakref.ReferenceType[Any]


@dataclass(frozen=True)
class _ModelNames:
    """A module's structure (the object and its ``state_dict()`` keys) and the renaming DCP
    applies to it (None: not plain; DCP is called)."""

    module: _Ref
    keys: tuple[str, ...]
    renames: dict[str, str] | None


@dataclass(frozen=True)
class _OptimizerNames:
    """An optimizer's structure (the objects, the module's parameters by name, the groups'
    parameters) and each parameter index's name (None: not plain; DCP is called)."""

    optimizer: _Ref
    module: _Ref
    named: tuple[tuple[str, _Ref], ...]
    groups: tuple[tuple[_Ref, ...], ...]
    names: dict[int, str] | None


class StateDicts:
    """DCP's state dicts of the modules and optimizers saved under each name, built from a name
    map learned once per structure (see the module's docstring). ``learned`` counts the times
    a structure was learned (DCP's functions called to check it)."""

    def __init__(self) -> None:
        self.learned = 0
        self._models: dict[str, _ModelNames] = {}
        self._optimizers: dict[str, _OptimizerNames] = {}

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the structures of names other than ``keep`` (a state no longer saved)."""
        names = set(keep)
        self._models = {k: v for k, v in self._models.items() if k in names}
        self._optimizers = {k: v for k, v in self._optimizers.items() if k in names}

    def learned_names(self, name: str) -> bool:
        """Whether the state dict saved under ``name`` was last learned as plain: built from
        names since (True), or left to DCP (False, or never seen)."""
        if name in self._models:
            return self._models[name].renames is not None
        return name in self._optimizers and self._optimizers[name].names is not None

    def model(self, name: str, module: torch.nn.Module) -> dict[str, Any]:
        """What ``get_model_state_dict(module)`` returns; raises what it raises."""
        known = self._models.get(name)
        if known is not None and known.module() is not module:
            known = None
        # Not plain, or state_dict replaced on the object (as DCP's _patch_model_state_dict does).
        if (known is not None and known.renames is None) or "state_dict" in vars(module):
            return get_model_state_dict(module)
        ours = module.state_dict()
        if known is None or known.renames is None or known.keys != tuple(ours):
            return self._learn_model(name, module, ours)
        return _renamed(ours, known.renames)

    def optimizer(
        self, name: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """What ``get_optimizer_state_dict(module, optimizer)`` returns; raises what it raises.

        An optimizer without state yet goes to DCP (which initializes it with a zero step)."""
        known = self._optimizers.get(name)
        if known is not None and (known.optimizer() is not optimizer or known.module() is not module):
            known = None
        if (
            not optimizer.state
            or "state_dict" in vars(optimizer)
            or (known is not None and known.names is None)
        ):
            return get_optimizer_state_dict(module, optimizer)
        named = tuple(module.named_parameters())
        groups = [list(group["params"]) for group in optimizer.param_groups]
        if known is None or known.names is None or not _same_structure(known, named, groups):
            theirs = get_optimizer_state_dict(module, optimizer)
            self._learn_optimizer(name, module, optimizer, named, groups, theirs)
            return theirs
        return _by_name(optimizer.state_dict(), known.names) or get_optimizer_state_dict(module, optimizer)

    def _learn_model(self, name: str, module: torch.nn.Module, ours: dict[str, Any]) -> dict[str, Any]:
        """DCP's state dict of ``module``, and the renaming from ``ours`` to it remembered."""
        self.learned += 1
        theirs = get_model_state_dict(module)
        renames = _model_renames(ours, theirs) if ours and _plain_module(module, ours.values()) else None
        self._models[name] = _ModelNames(weakref.ref(module), tuple(ours), renames)
        return theirs

    def _learn_optimizer(
        self,
        name: str,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        named: tuple[tuple[str, torch.nn.Parameter], ...],
        groups: list[list[torch.Tensor]],
        theirs: dict[str, Any],
    ) -> None:
        self.learned += 1
        names = None
        if _plain_module(module, (p for _, p in named)) and _plain_optimizer(optimizer):
            names = _optimizer_names(optimizer.state_dict(), theirs)
        self._optimizers[name] = _OptimizerNames(
            weakref.ref(optimizer),
            weakref.ref(module),
            tuple((key, weakref.ref(param)) for key, param in named),
            tuple(tuple(weakref.ref(param) for param in group) for group in groups),
            names,
        )


def _renamed(state: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    """``state`` with its keys renamed the way DCP renames them (in place: a renamed key moves
    to the end)."""
    for key in list(state):
        fqn = renames.get(key)
        if fqn is not None:
            state[fqn] = state.pop(key)
    return state


def _model_renames(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, str] | None:
    """The renaming that turns ``ours`` (``module.state_dict()``) into ``theirs`` (DCP's), or
    None when no renaming does. DCP keeps the keys it does not rename in place and moves the
    renamed ones to the end, in their order: so the keys of ``ours`` missing from ``theirs``
    are, in order, the last keys of ``theirs``."""
    gone = [key for key in ours if key not in theirs]
    if len(ours) != len(theirs):
        return None
    renames = dict(zip(gone, list(theirs)[len(theirs) - len(gone) :], strict=True))
    renamed = _renamed(dict(ours), renames)
    if list(renamed) != list(theirs):
        return None
    if not all(_same_value(renamed[key], theirs[key]) for key in theirs):
        return None
    return renames


def _optimizer_names(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[int, str] | None:
    """Each parameter index's name as DCP gives it (``ours``: ``optimizer.state_dict()``,
    ``theirs``: DCP's), or None when renaming ``ours`` by them would not give ``theirs``."""
    groups, their_groups = ours["param_groups"], theirs["param_groups"]
    if set(theirs) != {"state", "param_groups"} or len(groups) != len(their_groups):
        return None
    names: dict[int, str] = {}
    for group, their_group in zip(groups, their_groups, strict=True):
        if len(group["params"]) != len(their_group["params"]):
            return None
        names.update(zip(group["params"], their_group["params"], strict=True))
    rebuilt = _by_name(ours, names)
    if rebuilt is None or list(rebuilt["state"]) != list(theirs["state"]):
        return None
    if not all(rebuilt["state"][key] is theirs["state"][key] for key in theirs["state"]):
        return None
    for group, their_group in zip(rebuilt["param_groups"], their_groups, strict=True):
        if list(group) != list(their_group) or group["params"] != their_group["params"]:
            return None
        if not all(group[key] is their_group[key] for key in group if key != "params"):
            return None
    return names


def _by_name(packed: dict[str, Any], names: dict[int, str]) -> dict[str, Any] | None:
    """``packed`` (an optimizer's ``state_dict()``) with parameter indices replaced by
    ``names``, as DCP does; None when an index has no name."""
    state: dict[str, Any] = {}
    try:
        for index, value in packed["state"].items():
            state[names[index]] = value
        for group in packed["param_groups"]:
            group["params"] = [names[index] for index in group["params"]]
    except (KeyError, TypeError):
        return None
    return {"state": state, "param_groups": packed["param_groups"]}


def _same_structure(
    known: _OptimizerNames,
    named: tuple[tuple[str, torch.nn.Parameter], ...],
    groups: list[list[torch.Tensor]],
) -> bool:
    """Whether the module's parameters by name (``named``) and the optimizer's groups of
    parameters are those ``known`` was learned from (the same objects)."""
    if len(named) != len(known.named) or len(groups) != len(known.groups):
        return False
    if any(key != k or ref() is not p for (key, p), (k, ref) in zip(named, known.named, strict=True)):
        return False
    for group, refs in zip(groups, known.groups, strict=True):
        if len(group) != len(refs) or any(ref() is not p for p, ref in zip(group, refs, strict=True)):
            return False
    return True


def _plain_module(module: torch.nn.Module, tensors: Iterable[Any]) -> bool:
    """No FSDP1 wrapper, and every tensor a plain one or a DTensor (no other subclass)."""
    if any(isinstance(sub, FullyShardedDataParallel) for sub in module.modules()):
        return False
    return all(not isinstance(t, torch.Tensor) or _plain_tensor(t) for t in tensors)


def _plain_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    for per_param in optimizer.state.values():
        if not isinstance(per_param, dict):
            return False
        if any(isinstance(v, torch.Tensor) and not _plain_tensor(v) for v in per_param.values()):
            return False
    return True


_NAMED_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter, DTensor})


def _plain_tensor(tensor: torch.Tensor) -> bool:
    """A tensor DCP's state dicts take as it is: plain, or a DTensor (FSDP2, tensor parallel:
    DCP's default options neither gather nor move it)."""
    return type(tensor) in _NAMED_TENSORS


def _same_value(ours: Any, theirs: Any) -> bool:
    """Two values of two ``state_dict()`` calls: views of the same tensor (DTensors: with equal
    specs, over views of the same local tensor), or of one type."""
    if isinstance(ours, DTensor) and isinstance(theirs, DTensor):
        return (
            type(ours) is type(theirs)
            and ours._spec == theirs._spec
            and _same_value(ours._local_tensor, theirs._local_tensor)
        )
    if isinstance(ours, torch.Tensor) and isinstance(theirs, torch.Tensor):
        return (
            type(ours) is type(theirs)
            and ours.data_ptr() == theirs.data_ptr()
            and ours.shape == theirs.shape
            and ours.stride() == theirs.stride()
            and ours.dtype == theirs.dtype
            and ours.device == theirs.device
        )
    return type(ours) is type(theirs)
