"""Live checks: does every tensor ``restore`` hands to a live object fit what is there?

:mod:`.expect` compares a checkpoint with the *expected* state (keys, shapes); this module
compares each tensor that ``load_state_dict`` would put into a live module or optimizer with the
tensor it replaces, before a byte is read into any of them:

- a module's tensor: the same layout, shape and kind of dtype (a float may become another float,
  never an int or a complex) as the module's own;
- an optimizer's state tensor: the optimizer's state tensor under the same key when it has one
  (an in-process rollback); otherwise, for torch's own optimizers (``torch.optim``), the
  parameter it belongs to: its shape (Adafactor's factors: one that broadcasts to it) and kind
  of dtype, and a single value for ``step`` (ASGD's ``eta`` and ``mu``, NAdam's
  ``mu_product``); a state tensor that belongs to no parameter, and a hyperparameter tensor
  that holds more than one value, are refused;
- whatever the object: a tensor that reads more elements than its bytes hold (a stride-0 or
  overlapping view, which ``load_state_dict`` would copy out in full) only goes where a live
  tensor of at least its size receives it (never into an optimizer's state, which keeps the view
  and updates it in place), so a file cannot make a restore allocate more than its own size
  beyond what the live objects already hold; two state tensors of an optimizer never share
  bytes (one in-place update would change the other);
- once read, a ``step`` of torch's optimizers is a finite number, not negative
  (:func:`check_steps`).

A refusal is an :class:`IncompatibleCheckpointError` whose ``key`` names the first tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .. import format as fmt
from .._tree import dotted_key, walk
from ..dtypes import itemsize
from ..errors import IncompatibleCheckpointError
from .expect import Refs, count, layout_name
from .modules import ModuleStates

Path_ = tuple[Any, ...]

# torch.optim's per-parameter state: tensors of the parameter's shape, except these.
ONE_VALUE = frozenset({"step", "eta", "mu", "mu_product"})  # Adam's step, ASGD's eta and mu, NAdam's
FACTORS = frozenset({"row_var", "col_var"})  # Adafactor's factors broadcast to the parameter
OWN_LAYOUT = frozenset({"LBFGS"})  # state about all parameters at once: only the allocation bound


class Incoming(NamedTuple):  # a named tuple: made for every tensor of every restore, 3x faster
    """A checkpoint tensor as ``restore`` would hand it over: dtype, shape, layout, and how many
    distinct elements its memory holds (``stored < numel``: an overlapping view)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    layout: str
    stored: int
    memory: tuple[int, int, int] | None = None  # (blob or storage, first byte, end): what it reads

    @property
    def numel(self) -> int:
        """How many elements it has once copied out."""
        return math.prod(self.shape)


def layout_incoming(layout: fmt.Layout, refs: Refs) -> dict[Path_, Incoming]:
    """Every tensor of a v1 file's header, by key path (``refs``: :func:`~.expect.layout_refs`;
    nothing but the header is read)."""
    found: dict[Path_, Incoming] = {}
    tensors = layout.tensors
    spans: dict[tuple[torch.dtype, tuple[int, ...], tuple[int, ...]], tuple[int, int]] = {}  # many share one
    for path, node in refs:
        entry = tensors[node.index]
        kind = (entry.dtype, entry.shape, entry.stride)
        reach = spans.get(kind)
        if reach is None:
            span = _span(entry.shape, entry.stride)
            reach = spans[kind] = (span, span * itemsize(entry.dtype))
        span, nbytes = reach
        memory = (entry.blob, entry.offset, entry.offset + nbytes) if span else None
        found[path] = Incoming(entry.dtype, entry.shape, "strided", span, memory)
    return found


def state_incoming(state: Any) -> dict[Path_, Incoming]:
    """Every tensor of a loaded state (a legacy file's), by key path."""
    found: dict[Path_, Incoming] = {}
    for path, node in walk(state):
        if isinstance(node, torch.Tensor):
            layout = layout_name(node)
            if layout == "strided":
                shape = tuple(node.shape)
                span = _span(shape, tuple(node.stride()))
                start = int(node.storage_offset()) * node.element_size()
                where = node.untyped_storage().data_ptr()
                memory = (where, start, start + span * node.element_size()) if span else None
                found[path] = Incoming(node.dtype, shape, layout, span, memory)
            else:
                found[path] = Incoming(node.dtype, (), layout, 0)
    return found


def check_live(
    objects: Mapping[str, Any],
    tree: Any,
    incoming: Mapping[Path_, Incoming],
    where: str,
    modules: ModuleStates,
) -> None:
    """Refuse a checkpoint whose tensors do not fit the live ``objects`` (see the module's rules;
    ``modules``: each module's ``state_dict()``, :class:`~.modules.LiveModules`).

    Raises :class:`IncompatibleCheckpointError` (``path``: ``where``; ``key``: the first tensor)
    listing every problem.
    """
    by_object: dict[Any, dict[Path_, Incoming]] = {}
    for path, tensor in incoming.items():
        if path and path[0] in objects:
            by_object.setdefault(path[0], {})[path] = tensor
    problems: list[tuple[Path_, str]] = []
    for name, obj in objects.items():
        mine = by_object.get(name)
        if not mine:
            continue
        if isinstance(obj, torch.nn.Module):
            problems += _module_problems(modules[name], mine)
        elif isinstance(obj, torch.optim.Optimizer):
            state = tree.get(name) if isinstance(tree, Mapping) else None
            problems += _Optimizer(obj, state).problems(mine)
        else:
            problems += _object_problems(name, obj, mine)
    if problems:
        text = "; ".join(f"{dotted_key(path)}: {problem}" for path, problem in problems)
        raise IncompatibleCheckpointError(
            f"does not fit the live objects ({count(len(problems), 'mismatch')}: {text})",
            path=where,
            key=dotted_key(problems[0][0]),
        )


def _module_problems(state: Mapping[str, Any], incoming: Mapping[Path_, Incoming]) -> list[tuple[Path_, str]]:
    live = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    problems = []
    for path, tensor in incoming.items():
        target = live.get(path[1]) if len(path) == 2 else None
        problem = _against(tensor, target) if target is not None else _unbounded(tensor, None)
        if problem:
            problems.append((path, problem))
    return problems


def _object_problems(name: str, obj: Any, incoming: Mapping[Path_, Incoming]) -> list[tuple[Path_, str]]:
    """Any other object judges its own state; only the allocation bound applies."""
    overlapping = {path: t for path, t in incoming.items() if t.stored < t.numel}
    if not overlapping:
        return []
    try:
        live = dict(walk(obj.state_dict(), (name,)))
    except Exception:  # an object whose state_dict() fails has no live tensors to offer
        live = {}
    problems = []
    for path, tensor in overlapping.items():
        target = live.get(path)
        problem = _unbounded(tensor, target if isinstance(target, torch.Tensor) else None)
        if problem:
            problems.append((path, problem))
    return problems


class _Optimizer:
    """One live optimizer and the checkpoint's state for it: which parameter each state entry
    belongs to, as ``Optimizer.load_state_dict`` maps them (by position in the param groups)."""

    def __init__(self, optimizer: torch.optim.Optimizer, state: Any) -> None:
        self.optimizer = optimizer
        kind = type(optimizer)
        self.builtin = kind.__module__.startswith("torch.optim") and kind.__name__ not in OWN_LAYOUT
        params = [param for group in optimizer.param_groups for param in group["params"]]
        self.params: dict[Any, torch.Tensor] = {}
        self.states: dict[Any, Any] = {}  # saved id → the live optimizer's state of its parameter
        live = optimizer.state
        for saved, param in zip(_saved_ids(state), params, strict=False):
            try:
                self.params[saved] = param
            except TypeError:  # an unhashable id: load_state_dict refuses the state itself
                continue
            self.states[saved] = live.get(param)

    def problems(self, incoming: Mapping[Path_, Incoming]) -> list[tuple[Path_, str]]:
        found = []
        for path, tensor in incoming.items():
            part = path[1] if len(path) > 1 else None
            if part == "state" and len(path) >= 3:
                problem = self._state_problem(path, tensor)
            elif part == "param_groups" and self.builtin and tensor.numel != 1:
                problem = f"a hyperparameter holds one value, the checkpoint has shape {list(tensor.shape)}"
            else:
                problem = _unbounded(tensor, None) if part in ("state", "param_groups") else None
            if problem:
                found.append((path, problem))
        return found + _shared_memory({p: t for p, t in incoming.items() if len(p) > 1 and p[1] == "state"})

    def _state_problem(self, path: Path_, tensor: Incoming) -> str | None:
        if tensor.stored < tensor.numel:  # load_state_dict keeps a view, and steps update in place
            return (
                f"a view of {tensor.numel} elements over {tensor.stored} stored ones: an optimizer "
                "updates its state in place"
            )
        param = self.params.get(path[2])
        if param is None:
            return "belongs to no parameter of the optimizer" if self.builtin else _unbounded(tensor, None)
        key = path[3] if len(path) == 4 else None
        per_param = self.states.get(path[2])
        live = per_param.get(key) if isinstance(per_param, Mapping) and key is not None else None
        if isinstance(live, torch.Tensor):
            return _against(tensor, live)
        if not self.builtin:
            return _unbounded(tensor, param)
        if tensor.layout != "strided":
            return f"a {tensor.layout} tensor, the parameter is a strided one"
        if key in ONE_VALUE:
            numeric = _kind(tensor.dtype) in ("floating", "integer")
            return None if tensor.numel == 1 and numeric else _one_value(key, tensor)
        fits = _broadcasts if key in FACTORS else _same
        if not fits(tensor.shape, tuple(param.shape)):
            return f"shape {list(tensor.shape)} does not fit its parameter of shape {list(param.shape)}"
        if _kind(tensor.dtype) != _kind(param.dtype):
            return f"dtype {_name(tensor.dtype)}, its parameter is {_name(param.dtype)}"
        return None


def _shared_memory(incoming: Mapping[Path_, Incoming]) -> list[tuple[Path_, str]]:
    """State tensors that read the same bytes: ``load_state_dict`` keeps them as views, and one
    in-place update would change the other."""
    regions = sorted(
        ((t.memory, path) for path, t in incoming.items() if t.memory is not None), key=lambda r: r[0]
    )
    problems = []
    reach: tuple[int, int, Path_] | None = None  # the region and end reached so far, and by whom
    for (region, start, end), path in regions:
        if reach is not None and reach[0] == region and start < reach[1]:
            problems.append((path, f"shares its memory with {dotted_key(reach[2])}"))
        if reach is None or reach[0] != region or end > reach[1]:
            reach = (region, end, path)
    return problems


def _saved_ids(state: Any) -> list[Any]:
    """The parameter ids of the checkpoint's param groups, in order (empty when malformed)."""
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(groups, list | tuple):
        return []
    ids: list[Any] = []
    for group in groups:
        params = group.get("params") if isinstance(group, Mapping) else None
        if isinstance(params, list | tuple):
            ids.extend(params)
    return ids


def _against(tensor: Incoming, live: torch.Tensor) -> str | None:
    """What is wrong with putting ``tensor`` where ``live`` is (None: nothing)."""
    live_layout = layout_name(live)
    if tensor.layout != live_layout:
        return f"a {tensor.layout} tensor in the checkpoint, the live tensor is {live_layout}"
    if live.shape != tensor.shape:
        return f"shape {list(tensor.shape)} in the checkpoint, the live tensor has {list(live.shape)}"
    if tensor.dtype != live.dtype and _kind(tensor.dtype) != _kind(live.dtype):
        return f"dtype {_name(tensor.dtype)} in the checkpoint, the live tensor is {_name(live.dtype)}"
    return None


def _unbounded(tensor: Incoming, target: torch.Tensor | None) -> str | None:
    """An overlapping view with no live tensor of its size to receive it (None: it is bounded)."""
    if tensor.stored >= tensor.numel or (target is not None and target.numel() >= tensor.numel):
        return None
    return (
        f"a view of {tensor.numel} elements over {tensor.stored} stored ones (shape "
        f"{list(tensor.shape)}) and no live tensor of that size to receive it"
    )


def _value(step: torch.Tensor) -> float:
    """A one-element tensor's value; NaN when it has no number (complex, bits, ...)."""
    try:
        return float(step.item())  # any one-element tensor
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return math.nan


def _one_value(key: str, tensor: Incoming) -> str:
    shape = list(tensor.shape)
    return f"{key} holds one value, the checkpoint has a {_name(tensor.dtype)} tensor of shape {shape}"


def _same(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    return shape == target


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without growing it (each dim equal or 1)."""
    if len(shape) > len(target):
        return False
    return all(size in (1, want) for size, want in zip(reversed(shape), reversed(target), strict=False))


def _span(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """How many elements a strided view reaches in its memory (its distinct elements, at most)."""
    if any(size == 0 for size in shape):
        return 0
    return 1 + sum((size - 1) * abs(step) for size, step in zip(shape, stride, strict=False))


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    if dtype == torch.bool:
        return "bool"
    return "bits" if str(dtype).startswith("torch.bits") else "integer"  # bits8/16: no arithmetic


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_steps(objects: Mapping[str, Any], state: Any, where: str) -> None:
    """Refuse a ``step`` in torch's optimizers' state that is not a finite number >= 0 (Adam
    raises OverflowError computing ``beta ** step`` on the next step). Reads one value each.

    Raises :class:`IncompatibleCheckpointError` (``key``: the step).
    """
    for name, obj in objects.items():
        if not isinstance(obj, torch.optim.Optimizer) or not _Optimizer(obj, None).builtin:
            continue
        saved = state.get(name) if isinstance(state, Mapping) else None
        per_param = saved.get("state") if isinstance(saved, Mapping) else None
        for index, entry in per_param.items() if isinstance(per_param, Mapping) else ():
            step = entry.get("step") if isinstance(entry, Mapping) else None
            if isinstance(step, torch.Tensor) and step.numel() == 1:
                value = _value(step)
                if not (math.isfinite(value) and value >= 0):
                    key = dotted_key((name, "state", index, "step"))
                    raise IncompatibleCheckpointError(
                        f"{key} is {value}: a step is a finite number, not negative", path=where, key=key
                    )
