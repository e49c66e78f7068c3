"""The one walk of state trees: key paths, leaves, and maps over decoded trees.

A state tree is nested dicts (any ``Mapping`` when walking), lists and tuples; everything else is
a leaf. In an encoded tree (a snapshot's skeleton, a decoded header) the leaves include the
format's :class:`~asyncckpt.format.TensorRef` (a tensor's index in the table) and
:class:`~asyncckpt.format.BigInt` (an int wider than 64 bits). Key paths are tuples of the keys
and indices from the root, e.g. ``("optim", "param_groups", 0)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any, TypeVar

import torch

from . import _values
from .format import BigInt, TensorRef, TypedValue

KeyPath = tuple[Any, ...]
Leaf = TypeVar("Leaf")


def key_path(path: KeyPath, root: str = "state") -> str:
    """``("optim", "param_groups", 0)`` → ``state["optim"]["param_groups"][0]`` (for messages)."""
    return root + "".join(f"[{part!r}]" for part in path)


def dotted_key(path: KeyPath) -> str:
    """``("model", "layers.3.weight")`` → ``model.layers.3.weight`` (a tensor's key in the table)."""
    return ".".join(map(str, path)) or "<root>"


def walk(tree: Any, path: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    """Every leaf of ``tree`` with its key path, depth first, in the containers' own order.

    Descends into mappings, lists and tuples only; anything else (a tensor, a module, an
    optimizer, a :class:`TensorRef`) is yielded as a leaf, not looked into. Iterative, so a deep
    tree cannot exhaust the stack.
    """
    stack: list[Iterator[tuple[KeyPath, Any]]] = [iter([(path, tree)])]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        where, node = entry
        if isinstance(node, Mapping):
            stack.append(_children(where, node.items()))
        elif isinstance(node, list | tuple):
            stack.append(_children(where, enumerate(node)))
        else:
            yield where, node


def _children(path: KeyPath, items: Iterable[tuple[Any, Any]]) -> Iterator[tuple[KeyPath, Any]]:
    for key, value in items:
        yield (*path, key), value


def leaves_of(tree: Any, kind: type[Leaf]) -> list[tuple[KeyPath, Leaf]]:
    """Every leaf of exactly type ``kind`` in an encoded ``tree``, with its key path, in
    :func:`walk`'s order: :func:`walk` with one kind of leaf kept, for decoded trees.

    An encoded tree's containers are exact dicts, lists and tuples (what the decoder makes) and
    its depth is bounded by the format (``MAX_DEPTH``), so recursion is safe; a subclass of one
    of them is a leaf here. A few times faster than :func:`walk` (the loader walks trees of
    10,000 tensors on every restore).
    """
    if type(tree) is kind:
        return [((), tree)]
    found: list[tuple[KeyPath, Leaf]] = []

    def visit(node: Any, path: KeyPath) -> None:
        for key, value in node.items() if type(node) is dict else enumerate(node):
            of = type(value)
            if of is kind:
                found.append(((*path, key), value))
            elif of is dict or of is list or of is tuple:
                visit(value, (*path, key))

    if type(tree) in (dict, list, tuple):
        visit(tree, ())
    return found


def map_leaves(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """A copy of an encoded ``tree`` (dicts, lists, tuples) with ``fn`` applied to every leaf.

    Containers keep their exact type (a tuple stays a tuple); the tree's depth is bounded by the
    format (``MAX_DEPTH``), so recursion is safe.
    """
    if isinstance(tree, dict):
        return {key: map_leaves(value, fn) for key, value in tree.items()}
    if isinstance(tree, list):
        return [map_leaves(value, fn) for value in tree]
    if isinstance(tree, tuple):
        return tuple(map_leaves(value, fn) for value in tree)
    return fn(tree)


def renumber_refs(tree: Any, index: list[int]) -> Any:
    """``tree`` with every ``TensorRef(i)`` replaced by ``TensorRef(index[i])`` (flags kept)."""
    return map_leaves(
        tree, lambda leaf: replace(leaf, index=index[leaf.index]) if isinstance(leaf, TensorRef) else leaf
    )


def unflatten(tree: Any, tensors: list[torch.Tensor]) -> Any:
    """Put ``tensors`` back where their refs stand in an encoded ``tree``; big ints become ints,
    typed values their Python values (:mod:`asyncckpt._values`).

    A reference with flags gives a ``torch.nn.Parameter`` or a tensor that requires grad, sharing
    the tensor's memory; references with the same index and flags give one object (tied weights).
    A flag a dtype cannot carry (grad on an int tensor: the format's reader refuses it) is ignored.
    """
    rebuilt: dict[tuple[int, int], torch.Tensor] = {}

    def leaf(value: Any) -> Any:
        if isinstance(value, TensorRef):
            if not value.flags:
                return tensors[value.index]
            key = (value.index, value.flags)
            if key not in rebuilt:
                rebuilt[key] = _as_saved(tensors[value.index], value)
            return rebuilt[key]
        if isinstance(value, BigInt):
            return value.value
        if isinstance(value, TypedValue):
            return _values.decode(value, lambda payload: unflatten(payload, []))
        return value

    return map_leaves(tree, leaf)


def _as_saved(tensor: torch.Tensor, ref: TensorRef) -> torch.Tensor:
    """``tensor`` as the Parameter or grad-requiring leaf ``ref`` says it was (same memory)."""
    requires_grad = ref.requires_grad and (tensor.is_floating_point() or tensor.is_complex())
    if ref.parameter:
        return torch.nn.Parameter(tensor.detach(), requires_grad=requires_grad)
    return tensor.detach().requires_grad_(requires_grad)
