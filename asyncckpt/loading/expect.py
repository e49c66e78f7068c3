"""Expect checks: whether a checkpoint's state fits the state the caller expects (keys, shapes, dtypes).

The loader calls :func:`fit` before it reads a single tensor byte, on the tensor table of the
file's header (or on a loaded legacy state), so an incompatible checkpoint is diagnosed without
touching the caller's objects. Only tensors are compared (plain values such as a learning rate
may legitimately differ), plus the presence of the expected top-level keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import format as fmt
from .._tree import dotted_key, leaves_of, walk
from ..errors import IncompatibleCheckpointError
from .modules import ModuleStates

Path_ = tuple[Any, ...]


@dataclass(frozen=True)
class TensorShape:
    """What the comparison needs of a tensor: its dtype, shape and layout (``"strided"``,
    ``"nested"``, ``"sparse_coo"``, ...; a nested tensor has no shape: ``()``)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    layout: str = "strided"


def layout_name(tensor: torch.Tensor) -> str:
    """``"strided"`` for a dense tensor, ``"nested"``, ``"sparse_coo"``, ``"sparse_csr"``, ..."""
    if tensor.is_nested:
        return "nested"
    layout = tensor.layout
    return "strided" if layout is torch.strided else str(layout).removeprefix("torch.")


def tensor_shape(tensor: torch.Tensor) -> TensorShape:
    """A loaded tensor's :class:`TensorShape`, for any kind of tensor a legacy file may hold."""
    layout = layout_name(tensor)
    return TensorShape(tensor.dtype, () if layout == "nested" else tuple(tensor.shape), layout)


@dataclass
class Expected:
    """The expected state, reduced to what is compared.

    ``top_keys``: keys the state's top-level dict must have (None: the state may be anything).
    ``tensors``: every expected tensor by key path. ``scopes``: path prefixes under which every
    tensor of the checkpoint must be expected (else it is "unexpected"). ``optimizers``: the
    parameter-group sizes of optimizers, whose state tensors are not compared one by one.
    """

    top_keys: list[Any] | None = None
    tensors: dict[Path_, TensorShape] = field(default_factory=dict)
    scopes: list[Path_] = field(default_factory=list)
    optimizers: dict[Path_, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Fit:
    """The outcome: ``mismatches`` make a checkpoint incompatible, ``notes`` (dtypes) do not."""

    mismatches: list[str]
    notes: list[str]


def fit(tree: Any, index: Mapping[Path_, TensorShape], checks: tuple[Expected, ...], where: str) -> list[str]:
    """Compare a checkpoint with every expected state; return the dtype notes.

    Raises :class:`IncompatibleCheckpointError` (``path``) listing every mismatch.
    """
    mismatches: list[str] = []
    notes: list[str] = []
    for expected in checks:
        found = compare(tree, index, expected)
        mismatches += [m for m in found.mismatches if m not in mismatches]
        notes += [n for n in found.notes if n not in notes]
    if mismatches:
        raise IncompatibleCheckpointError(
            f"does not fit the expected state ({count(len(mismatches), 'mismatch')}: "
            f"{'; '.join(mismatches)}); was the model changed since it was written?",
            path=where,
        )
    return notes


def count(n: int, noun: str) -> str:
    """``count(2, "mismatch")`` → ``"2 mismatches"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("ch") else f"{n} {noun}s"


Refs = list[tuple[Path_, fmt.TensorRef]]  # every tensor reference of a tree, with its key path


def layout_refs(layout: fmt.Layout) -> Refs:
    """Every tensor reference of a v1 file's tree with its key path, in document order (so the
    first of two paths to one tensor comes first): one walk, shared by the loader's checks."""
    return leaves_of(layout.tree, fmt.TensorRef)


def layout_index(layout: fmt.Layout, refs: Refs) -> dict[Path_, TensorShape]:
    """Every tensor of a v1 file's header by key path (nothing is read but the header)."""
    shapes: dict[tuple[torch.dtype, tuple[int, ...]], TensorShape] = {}  # one each: many tensors share one
    index: dict[Path_, TensorShape] = {}
    for path, node in refs:
        entry = layout.tensors[node.index]
        found = shapes.get((entry.dtype, entry.shape))
        if found is None:
            found = shapes[entry.dtype, entry.shape] = TensorShape(entry.dtype, entry.shape)
        index[path] = found
    return index


def state_index(state: Any) -> dict[Path_, TensorShape]:
    """Every tensor of a loaded state (a legacy file's) by key path."""
    return tensor_index(state, lambda node: tensor_shape(node) if isinstance(node, torch.Tensor) else None)


def expected_from(expect: Any) -> Expected:
    """Reduce a user's ``expect`` (a state tree, or objects with ``state_dict()``)."""
    expected = Expected()
    if isinstance(expect, Mapping):
        expected.top_keys = list(expect)
        for key, value in expect.items():
            expected.scopes.append((key,))
            _collect(value, (key,), expected)
    else:
        expected.scopes.append(())
        _collect(expect, (), expected)
    return expected


def expected_for_restore(objects: Mapping[str, Any], modules: ModuleStates) -> Expected:
    """What ``restore`` must find for ``objects``: every key; modules' exact tensors; optimizers'
    parameter groups. Other objects' own ``load_state_dict`` judges their state.

    ``modules``: each module's ``state_dict()`` (:class:`~.modules.LiveModules`)."""
    expected = Expected(top_keys=list(objects))
    for key, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            expected.scopes.append((key,))
            _collect(modules[key], (key,), expected)
        elif isinstance(obj, torch.optim.Optimizer):
            _collect(obj, (key,), expected)
    return expected


def _collect(value: Any, path: Path_, expected: Expected) -> None:
    if isinstance(value, torch.Tensor):
        expected.tensors[path] = tensor_shape(value)
    elif isinstance(value, torch.optim.Optimizer):
        expected.optimizers[path] = [len(group["params"]) for group in value.param_groups]
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _collect(item, (*path, key), expected)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _collect(item, (*path, i), expected)
    elif callable(getattr(value, "state_dict", None)):
        _collect(value.state_dict(), path, expected)


def tensor_index(tree: Any, resolve: Callable[[Any], TensorShape | None]) -> dict[Path_, TensorShape]:
    """Every tensor of ``tree`` by key path; ``resolve`` says whether a node is a tensor."""
    index: dict[Path_, TensorShape] = {}
    for path, node in walk(tree):
        shape = resolve(node)
        if shape is not None:
            index[path] = shape
    return index


def compare(tree: Any, index: Mapping[Path_, TensorShape], expected: Expected) -> Fit:
    """Compare a checkpoint (its ``tree`` and tensor ``index``) with ``expected``; list every
    mismatch: missing and unexpected keys, shape and optimizer-group mismatches."""
    mismatches: list[str] = []
    notes: list[str] = []
    if expected.top_keys is not None:
        if not isinstance(tree, Mapping):
            kind = type(tree).__name__
            return Fit([f"the state is a {kind}, expected a dict with keys {expected.top_keys!r}"], [])
        mismatches += [f"missing {key!r}" for key in expected.top_keys if key not in tree]
    absent = {(key,) for key in expected.top_keys or () if key not in tree}
    for path, want in expected.tensors.items():
        if absent and _under(path, absent):
            continue
        got = index.get(path)
        if got is None:
            mismatches.append(f"missing {dotted_key(path)}")
        elif got.layout != want.layout:
            mismatches.append(
                f"{dotted_key(path)} is a {got.layout} tensor in the checkpoint, a {want.layout} one expected"
            )
        elif got.shape != want.shape:
            mismatches.append(
                f"shape of {dotted_key(path)} is {list(got.shape)} in the checkpoint, "
                f"{list(want.shape)} expected"
            )
        elif got.dtype != want.dtype:
            notes.append(
                f"{dotted_key(path)} is {_name(got.dtype)} in the checkpoint, {_name(want.dtype)} expected"
            )
    unexpected = [
        path
        for path in index
        if path not in expected.tensors
        and _under(path, expected.scopes)
        and not _under(path, expected.optimizers)
    ]
    mismatches += [f"unexpected {dotted_key(path)}" for path in sorted(unexpected, key=dotted_key)]
    for path, sizes in expected.optimizers.items():
        if not _under(path, absent):
            mismatches += _optimizer_mismatches(_subtree(tree, path), path, sizes)
    return Fit(mismatches, notes)


def _under(path: Path_, prefixes: Any) -> bool:
    return any(path[: len(prefix)] == prefix for prefix in prefixes)


def _subtree(tree: Any, path: Path_) -> Any:
    for key in path:
        try:
            tree = tree[key]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


def _optimizer_mismatches(state: Any, path: Path_, sizes: list[int]) -> list[str]:
    where = dotted_key(path)
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(groups, list | tuple) or not all(
        isinstance(g, Mapping) and isinstance(g.get("params"), list | tuple) for g in groups
    ):
        return [f"{where} is not an optimizer state (no param_groups with params)"]
    found = [len(g["params"]) for g in groups]
    if found == sizes:
        return []
    return [f"{where} has parameter groups of sizes {found} in the checkpoint, {sizes} expected"]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
