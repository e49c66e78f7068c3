"""An object's ``state_dict()``, taken without torch's per-module overhead where that is exact.

``save()`` calls the ``state_dict()`` of every module in the state on every save.
``torch.nn.Module.state_dict`` recurses through the submodules with keyword arguments, builds a
``_metadata`` entry and prefix strings per module and runs the hook loops: about 3 µs a module
on the trainer's thread, a third of a save's cost at one parameter per module. For a module
tree whose every module uses torch's own ``state_dict``, ``_save_to_state_dict`` and
``get_extra_state`` (none overridden, none replaced on the instance) and has no state-dict
hooks, the result is fixed by the modules' ``_parameters``, ``_buffers`` and ``_modules``:
:func:`state_dict_of` builds it directly, the same keys in the same order with the same
detached tensors (as a plain dict: the walks treat a dict and an ``OrderedDict`` alike, and
none reads ``_metadata``). Anything else gets the object's own ``state_dict()``.

A tree is walked again at every save although it rarely changes. :class:`ModuleTrees` keeps
what the last walk of each root module found: its modules (weakly), their classes, the version
tags of every dict the walk read (each module's ``__dict__``, ``_parameters``, ``_buffers``,
``_modules`` and state-dict hook dicts) and the keys it made. While the root is the same object,
every module has the same class, every class is still one torch's defaults describe and every
tag is unchanged, the tree holds the same modules with the same parameter and buffer objects
under the same names: the state dict is built from the remembered keys and places in a few C
loops. (A tag is a new value from one global counter at every change of any dict: an equal tag
means the same dict, unchanged.) A parameter's data replaced in place (``param.data = ...``)
changes no dict and needs none: the state dict holds the parameter object itself, whose data
the save reads. The set of non-persistent buffer names is not a dict (and a buffer registered again
under its name with another persistence may leave ``_buffers``' tag as it was: setting a key to
the value it holds changes no tag): each module's set is compared with a copy.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any

import torch

_MODULE = torch.nn.Module
# Captured at import: a Module.state_dict patched later is not torch's, and is called.
_STATE_DICT = _MODULE.state_dict
_SAVE_TO_STATE_DICT = _MODULE._save_to_state_dict
_GET_EXTRA_STATE = _MODULE.get_extra_state
_MAX_DEPTH = 500  # deeper trees (or a module inside itself) go to torch, which decides
_DETACH = torch.Tensor.detach
# The dicts of a module that the walk reads besides its __dict__, in this order.
_DICTS = ("_parameters", "_buffers", "_modules", "_state_dict_pre_hooks", "_state_dict_hooks")
_DICTS_OF = itemgetter(*_DICTS)
_PARAMETERS, _BUFFERS = 0, 1  # places in _DICTS
_NON_PERSISTENT = itemgetter("_non_persistent_buffers_set")


def _dict_version_reader() -> Any:
    """torch's reader of a dict's version tag (PEP 509: a new value from one global counter at
    every change of any dict, so an equal tag means the same dict, unchanged), or None where
    torch has none or the tags do not change as that says."""
    try:
        from torch._C._dynamo.guards import dict_version
    except ImportError:  # pragma: no cover - present in every torch this package supports
        return None
    probe: dict[str, list[int]] = {}
    tags = [dict_version(probe)]
    probe["a"] = []
    tags.append(dict_version(probe))
    probe["a"] = []  # another value under the same key
    tags.append(dict_version(probe))
    probe.clear()
    tags.append(dict_version(probe))
    other = dict_version({})
    return dict_version if len({*tags, other}) == len(tags) + 1 else None


DICT_VERSION: Any = _dict_version_reader()


def state_dict_of(obj: Any) -> Any:
    """``obj.state_dict()``; for a module tree torch's defaults fully describe, the same
    dict built without torch's recursion (see the module docstring)."""
    if isinstance(obj, _MODULE):
        built = module_state_dict(obj)
        if built is not None:
            return built
    return obj.state_dict()


def module_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """``module.state_dict()`` built from the modules' parameter, buffer and child dicts, or
    None when a module of the tree is not one torch's defaults describe exactly."""
    return _walk(module, None, _DETACH)


class ModuleTrees:
    """What the last walk of each root module found, reused while its tree is unchanged (see
    the module docstring). Holds no module, parameter or buffer: modules weakly, dicts by tag.

    Its state dicts hold the modules' own tensors, not detached (a parameter is the
    ``Parameter``): a save only reads them, and detaching 2,500 parameters cost ~1 ms a save.
    Whoever stores them as values detaches them first
    (:meth:`StateDicts.detached_reader`).
    """

    _LIMIT = 16  # root modules remembered; a state holds a few

    def __init__(self) -> None:
        self._memos: dict[int, _TreeMemo] = {}
        self.hits = 0

    def state_dict(self, root: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """:func:`module_state_dict` of ``root`` with the tensors not detached (see the class
        docstring), from the memo while the tree is unchanged; None where torch's defaults do
        not describe the tree."""
        memo = self._memos.get(id(root))
        if memo is not None:
            built = memo.state_dict(root)
            if built is not None:
                self.hits += 1
                return built
        recorder = None if DICT_VERSION is None else _Recorder()
        built = _walk(root, recorder, _own)
        self._memos.pop(id(root), None)
        if built is not None and recorder is not None:
            made = recorder.memo(root, list(built))
            if made is not None:
                if len(self._memos) >= self._LIMIT:
                    self._memos.clear()
                self._memos[id(root)] = made
        return built


def _own(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _walk(
    module: torch.nn.Module, recorder: _Recorder | None, take: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    out: dict[str, torch.Tensor] = {}
    stack: list[tuple[str, int, Any]] = [("", 0, module)]
    pop = stack.pop
    while stack:
        prefix, depth, current = pop()
        if recorder is not None:
            recorder.module(current)  # tags read before the dicts: a change after shows next save
        parts = _plain_parts(current)
        if parts is None or depth > _MAX_DEPTH:
            return None
        parameters, buffers, children, non_persistent = parts
        for name, param in parameters.items():
            if param is not None:
                out[prefix + name] = take(param)
                if recorder is not None:
                    recorder.entry(_PARAMETERS, name)
        if buffers:
            for name, buffer in buffers.items():
                if buffer is not None and name not in non_persistent:
                    out[prefix + name] = take(buffer)
                    if recorder is not None:
                        recorder.entry(_BUFFERS, name)
        if children:
            below = depth + 1
            stack += [
                (f"{prefix}{name}.", below, child)
                for name, child in reversed(children.items())
                if child is not None
            ]
    return out


class _Recorder:
    """Records one walk: the modules in walk order, their dicts' tags and each entry's place."""

    def __init__(self) -> None:
        self.modules: list[Any] = []
        self.tags: list[int] = []  # the modules' __dict__s'
        self.dict_tags: list[int] = []  # their _DICTS', in order
        self.non_persistent: list[frozenset[str]] = []
        self.where: list[int] = []  # per entry: its dict's place among the modules' dicts
        self.names: list[str] = []

    def module(self, module: Any) -> None:
        attributes = getattr(module, "__dict__", None)
        self.modules.append(module)
        if type(attributes) is dict:  # otherwise the walk stops here
            self.tags.append(DICT_VERSION(attributes))
            if all(map(attributes.__contains__, _DICTS)):
                self.dict_tags += map(DICT_VERSION, _DICTS_OF(attributes))
            self.non_persistent.append(frozenset(attributes.get("_non_persistent_buffers_set", ())))

    def entry(self, which: int, name: str) -> None:
        self.where.append((len(self.modules) - 1) * len(_DICTS) + which)
        self.names.append(name)

    def memo(self, root: torch.nn.Module, keys: list[str]) -> _TreeMemo | None:
        if len(self.dict_tags) != len(self.modules) * len(_DICTS) or len(keys) != len(self.names):
            return None  # a module lacked one of the dicts (the walk accepted it anyway)
        try:
            refs = [weakref.ref(m) for m in self.modules]
        except TypeError:  # pragma: no cover - every Module takes weak references
            return None
        classes = list(map(type, self.modules))
        tags = (self.tags, self.dict_tags, self.non_persistent)
        return _TreeMemo(weakref.ref(root), refs, classes, set(classes), *tags, self.where, self.names, keys)


@dataclass
class _TreeMemo:
    """One walk's record (see :class:`ModuleTrees`)."""

    root: weakref.ref[Any]
    modules: list[weakref.ref[Any]]
    classes: list[type]
    distinct: set[type]
    tags: list[int]  # the modules' __dict__s'
    dict_tags: list[int]  # their _DICTS', in order
    non_persistent: list[frozenset[str]]  # their non-persistent buffer names
    where: list[int]
    names: list[str]
    keys: list[str]

    def state_dict(self, root: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The state dict of ``root``'s tree when it is the tree recorded, unchanged; else None."""
        if self.root() is not root:
            return None
        modules = [ref() for ref in self.modules]
        if list(map(type, modules)) != self.classes or not all(map(_plain_class, self.distinct)):
            return None  # a module gone (its ref gives None) or of another class
        attributes = list(map(vars, modules))
        if list(map(DICT_VERSION, attributes)) != self.tags:
            return None  # an attribute set or deleted (a hook dict or a method replaced, ...)
        dicts = list(chain.from_iterable(map(_DICTS_OF, attributes)))
        if list(map(DICT_VERSION, dicts)) != self.dict_tags:
            return None
        if list(map(_NON_PERSISTENT, attributes)) != self.non_persistent:  # a set equals its frozenset copy
            return None
        sources = map(dicts.__getitem__, self.where)
        return dict(zip(self.keys, map(dict.__getitem__, sources, self.names), strict=True))


def _plain_class(cls: type) -> bool:
    """Whether ``cls`` leaves ``state_dict`` to torch's defaults (see :func:`_plain_parts`)."""
    return (
        cls.state_dict is _STATE_DICT  # type: ignore[attr-defined]
        and cls._save_to_state_dict is _SAVE_TO_STATE_DICT  # type: ignore[attr-defined]
        and getattr(cls, "get_extra_state", _GET_EXTRA_STATE) is _GET_EXTRA_STATE
    )


def _plain_parts(module: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Any] | None:
    """The dicts torch's ``state_dict`` reads from ``module``, or None when it would do more
    (an override, a hook, an instance attribute in place of a method, unusual internals)."""
    if not _plain_class(type(module)):
        return None
    attributes = getattr(module, "__dict__", None)
    if type(attributes) is not dict:
        return None
    # A method replaced on the instance (names spelled out: a generator over them costs more
    # than the walk).
    if "state_dict" in attributes or "_save_to_state_dict" in attributes or "get_extra_state" in attributes:
        return None
    get = attributes.get
    parameters = get("_parameters")
    buffers = get("_buffers")
    children = get("_modules")
    non_persistent = get("_non_persistent_buffers_set")
    if type(parameters) is not dict or type(buffers) is not dict or type(children) is not dict:
        return None
    if type(non_persistent) is not set:
        return None
    if get("_state_dict_pre_hooks", True) or get("_state_dict_hooks", True):
        return None
    return parameters, buffers, children, non_persistent


class StateDicts:
    """The ``state_dict()`` of each object a walk meets, called once and replayed to later walks.

    Every walk of one state meets the objects in the same order (depth first, in the containers'
    own order), so the n-th object a later walk meets is the n-th one an earlier walk met.
    With ``trees`` (remembered from one save to the next), a module tree's state dict holds the
    modules' own tensors (see :class:`ModuleTrees`): the
    :meth:`reader` gives them as they are, the :meth:`detached_reader` detached.
    """

    def __init__(self, trees: ModuleTrees | None = None) -> None:
        self.results: list[Any] = []
        self.trees = trees
        self._own: set[int] = set()  # positions of module trees' state dicts (own tensors)
        self._detached: dict[int, dict[str, torch.Tensor]] = {}  # position: its detached copy

    def reader(self) -> Callable[[Any], Any]:
        """A function giving each object's state dict, in meeting order, for one walk that only
        reads the tensors (a module tree's may be its own, not detached)."""
        return self._reader(lambda position: self.results[position])

    def detached_reader(self) -> Callable[[Any], Any]:
        """As :meth:`reader`, every tensor of a module tree's state dict detached (as torch's
        ``state_dict()`` gives it): for a walk that stores them."""
        results, own, copies = self.results, self._own, self._detached

        def detached(position: int) -> Any:
            if position not in own:
                return results[position]
            if position not in copies:
                result = results[position]
                copies[position] = dict(zip(result, map(_DETACH, result.values()), strict=True))
            return copies[position]

        return self._reader(detached)

    def _reader(self, give: Callable[[int], Any]) -> Callable[[Any], Any]:
        position = 0
        results = self.results

        def state_dict_of(obj: Any) -> Any:
            nonlocal position
            if position == len(results):
                results.append(self._take(obj))
            position += 1
            return give(position - 1)

        return state_dict_of

    def _take(self, obj: Any) -> Any:
        trees = self.trees
        if trees is not None and isinstance(obj, _MODULE):
            built = trees.state_dict(obj)
            if built is not None:
                self._own.add(len(self.results))
                return built
        return state_dict_of(obj)  # obj.state_dict(), faster for plain modules
