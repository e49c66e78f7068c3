"""A state's structural fingerprint, and the structure of the last save, reused while it matches.

Laying out a state (checking every value, building the skeleton and the tensor table, finding
shared storages) costs tens of microseconds a tensor, but a training state keeps its shape from
one save to the next. :func:`scan` walks the state once, calling ``state_dict()`` as flattening
would, and records everything the layout depends on, exactly: container kinds and keys (with
their types; a namedtuple or dict subclass by its class), every plain value (floats by their
bits), and per tensor its type (Parameter or not), whether it requires grad, dtype, shape,
strides, storage offset, data pointer, device, layout and conjugate and negative bits. A
state holding a conjugate or negative view is never reused: flattening stores a copy of its
values, made afresh. The common containers are read a whole container at a time (all
tensors, all ints, an optimizer's per-parameter dicts of tensors), and each tensor's fields in
one pass.
:class:`StructureCache` lays the state out afresh only when that fingerprint differs from the
last one; otherwise the new snapshot is the cached
:class:`~asyncckpt.saving.snapshot.Structure` with this save's tensors. Once a structure is
cached, a save compares its tensors' fields without reading them into Python tuples
(:class:`~asyncckpt.saving.tensors_check.TensorsCheck`, which also reads the version counters
the staging step watches); only when that check fails are the fields read one by one.

Equal fingerprints mean equal layouts: every value the layout reads is in the fingerprint. A
storage freed and another allocated at the same address with the same shapes lays out the same
way; the copies always read the tensors found in this save, never the cached ones.
"""

from __future__ import annotations

import enum
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch

from .._values import NotSafeError, container_items, container_kind
from ..errors import UnsupportedValueError
from ..format import MAX_DEPTH
from .snapshot import Snapshot, Structure, flatten, skeleton_of
from .state_dicts import DICT_VERSION, ModuleTrees
from .tensors_check import TensorsCheck
from .walker import INT64_MIN, UINT64_MAX, StateDicts, walk_state


class _Token:
    """A marker in a fingerprint; equal only to itself."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_DICT, _LIST, _TUPLE, _TENSOR = _Token("dict"), _Token("list"), _Token("tuple"), _Token("tensor")
_TENSORS = _Token("tensors")  # a container whose values are all tensors
_INT, _FLOAT, _BYTES, _STR = _Token("int"), _Token("float"), _Token("bytes"), _Token("str")
_TYPED = _Token("typed")  # a container stored as a typed value: its class follows
_DOUBLE = struct.Struct("<d").pack  # floats by their bits: 0.0 and -0.0 differ, NaN equals NaN
_TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
_TENSOR_DICTS = _Token("tensor dicts")  # dicts whose values are all dicts of tensors
_INTS = _Token("ints")  # a container whose values are all exact ints
_JUST_DICT = frozenset({dict})
_JUST_INT = frozenset({int})
_PLAIN_KEYS = frozenset({str, int})  # key types whose values tell them apart
_STRIDE = torch.Tensor.stride
_OFFSET = torch.Tensor.storage_offset
_POINTER = torch.Tensor.data_ptr
_IS_CONJ = torch.Tensor.is_conj
_IS_NEG = torch.Tensor.is_neg
_STRIDED = torch.strided


_DICT_VERSION: Any = DICT_VERSION  # see state_dicts.py


def _fields(t: torch.Tensor) -> tuple[Any, ...]:
    """What the layout reads of a tensor; see :func:`reusable` for the positions it checks.

    One pass over the tensors, each read once while it is in the cache: eight C loops over
    10,000 tensors (one per field) cost twice as much. The unbound methods skip the lookup and
    bound method of ``t.stride()``.
    """
    return (
        t.dtype,
        t.shape,
        t.device,
        t.layout,
        _STRIDE(t),
        _OFFSET(t),
        _POINTER(t),
        type(t),
        t.requires_grad,
        _IS_CONJ(t),
        _IS_NEG(t),
    )


class _Unscannable(Exception):
    """The state holds a value the fingerprint does not cover (flattening decides about it)."""


@dataclass(frozen=True)
class Scan:
    """A state's fingerprint, its tensors in the order found, and its top-level objects.

    ``objects`` are the objects with ``state_dict()`` met outside any state dict (the modules
    and optimizers the overlap rule looks at).
    """

    signature: list[Any]
    found: list[torch.Tensor]
    objects: list[Any]
    values: list[int | bytes | tuple[int, ...]]  # the numbers (floats by bits), apart from the signature


def scan(state: Any, state_dicts: StateDicts) -> Scan | None:
    """Fingerprint ``state`` (see the module docstring); None when it holds a value outside
    what flattening accepts, or nests too deep. ``state_dicts`` records each ``state_dict()``."""
    scanned = _scan_unchecked(state, state_dicts)
    if scanned is None:
        return None
    fields = fields_of(scanned.found)
    if fields is None:
        return None
    scanned = Scan([*scanned.signature, fields], scanned.found, scanned.objects, scanned.values)
    return scanned if reusable(scanned) else None


def fields_of(tensors: list[torch.Tensor]) -> list[tuple[Any, ...]] | None:
    """:func:`_fields` of each tensor; None when one has no strides or storage (sparse, a
    wrapper subclass)."""
    try:
        return list(map(_fields, tensors))
    except Exception:
        return None


def reusable(scanned: Scan) -> bool:
    """Whether a layout made from the state ``scanned`` may be reused for an equal fingerprint:
    every tensor strided, none a conjugate or negative view (flattening stores a copy of those).

    An equal fingerprint has equal layouts and view flags, so a scan equal to one that passed
    needs no check of its own.
    """
    return _reusable_fields(scanned.signature[-1])


def _reusable_fields(fields: list[tuple[Any, ...]]) -> bool:
    return all(f[3] is _STRIDED and not f[9] and not f[10] for f in fields)


def _scan_unchecked(state: Any, state_dicts: StateDicts, memo: list[_DictsSeen] | None = None) -> Scan | None:
    """The tree part of :func:`scan`: the fingerprint without the tensors' fields (the
    tensors are in ``found``), and without :func:`reusable`'s check. ``memo``: what the last
    scan of this state learnt of its dicts of tensors (see :class:`_DictsSeen`), updated."""
    scanner = _Scanner(state_dicts, memo)
    try:
        scanner.visit(state, 0, False)
        return scanner.finish()
    except _Unscannable:
        return None


class _Scanner:
    """The walk records the tree's shape and plain values, and marks where tensors stand; the
    tensors' own fields are left to the caller, for all of them at once."""

    def __init__(self, state_dicts: StateDicts, memo: list[_DictsSeen] | None = None) -> None:
        self.memo = memo
        self.dict_rows = 0  # containers of dicts of tensors met so far (their place in memo)
        self.signature: list[Any] = []
        self.values: list[int | bytes | tuple[int, ...]] = []  # the numbers, in order (see number())
        self.found: list[torch.Tensor] = []
        self.objects: list[Any] = []
        self.state_dict_of = state_dicts.reader()

    def finish(self) -> Scan:
        """The tree's fingerprint, the tensors found and the objects met."""
        return Scan(self.signature, self.found, self.objects, self.values)

    def number(self, kind: _Token, value: int | bytes) -> None:
        """A number: its kind in the signature, its value (a float by its bits) among the
        values. An int beyond 64 bits is stored differently (a big int): kept in the signature."""
        if kind is _INT and not INT64_MIN <= value <= UINT64_MAX:  # type: ignore[operator]
            self.signature += (kind, value)
            return
        self.signature.append(kind)
        self.values.append(value)

    def ints(self, values: tuple[int, ...]) -> None:
        """A container of ints (a parameter group's ids, ``{"epoch": e, "step": s}``): its
        length in the signature and the ints among the values, as :meth:`number` does; with an
        int beyond 64 bits (stored as a big int), the ints in the signature."""
        if all(INT64_MIN <= value <= UINT64_MAX for value in values):
            self.signature += (_INTS, len(values))
            self.values.append(values)
        else:
            self.signature += (_INTS, values)

    def items(self, values: Any, depth: int, inside: bool) -> None:
        """The values of one container: all tensors, all ints or all dicts of tensors at
        once; otherwise one by one."""
        values = values if type(values) is list else list(values)
        kinds = set(map(type, values))
        if values and kinds <= _TENSOR_TYPES:
            self.signature.append(_TENSORS)
            self.found += values
            return
        if kinds == _JUST_INT:
            self.ints(tuple(values))  # a copy: the caller's list may change
            return
        if kinds == _JUST_DICT and self.tensor_dicts(values, depth + 1):
            return
        put = self.signature.append
        for value in values:
            kind = type(value)
            if kind is str or kind is bool or value is None:
                put(value)
            elif kind is int:
                self.number(_INT, value)
            elif kind in _TENSOR_TYPES:
                put(_TENSOR)
                self.found.append(value)
            elif kind is float:
                self.number(_FLOAT, _DOUBLE(value))
            else:
                self.visit(value, depth + 1, inside)

    def tensor_dicts(self, dicts: list[dict[Any, Any]], depth: int) -> bool:
        """Dicts (at ``depth``) whose values are all tensors and keys all str or int, as an
        optimizer's per-parameter state is, in a few C loops; False (nothing recorded) when
        they are not all like that."""
        seen = self._seen(dicts)
        tensors = list(chain.from_iterable(map(dict.values, dicts)))  # no list per dict
        if seen is not None and seen.same(dicts):
            keys = seen.keys  # the same dicts, unchanged: keys, tensors and their types were fine
        else:
            if not set(map(type, tensors)) <= _TENSOR_TYPES:
                return False
            keys = list(map(tuple, dicts))
            if not set(map(type, chain.from_iterable(keys))) <= _PLAIN_KEYS:
                return False  # a str or int by its value alone: no subclass, no bool
            self._remember(dicts, keys)
        if depth > MAX_DEPTH:
            raise _Unscannable
        self.signature += (_TENSOR_DICTS, keys)
        self.found += tensors
        return True

    def _seen(self, dicts: list[dict[Any, Any]]) -> _DictsSeen | None:
        """What the last scan learnt at this place, if anything; counts the place."""
        position, self.dict_rows = self.dict_rows, self.dict_rows + 1
        memo = self.memo
        return memo[position] if memo is not None and position < len(memo) else None

    def _remember(self, dicts: list[dict[Any, Any]], keys: list[tuple[Any, ...]]) -> None:
        memo = self.memo
        if memo is None or _DICT_VERSION is None:
            return
        seen = _DictsSeen(list(map(id, dicts)), list(map(_DICT_VERSION, dicts)), keys)
        position = self.dict_rows - 1
        if position < len(memo):
            memo[position] = seen
        elif position == len(memo):
            memo.append(seen)

    def visit(self, value: Any, depth: int, inside: bool) -> None:
        if depth > MAX_DEPTH:  # also ends a cycle
            raise _Unscannable
        kind = type(value)
        if kind is dict or kind is OrderedDict:
            keys = tuple(value)
            self.signature += (_DICT, keys, tuple(map(type, keys)))
            self.items(value.values(), depth, inside)
        elif kind is list:
            self.signature += (_LIST, len(value))
            self.items(value, depth, inside)
        elif kind is tuple:
            self.signature += (_TUPLE, len(value))
            self.items(value, depth, inside)
        else:
            self.other(value, depth, inside)

    def other(self, value: Any, depth: int, inside: bool) -> None:
        """Everything but the exact container types, in the order flattening looks at them."""
        if isinstance(value, torch.Tensor):
            self.signature.append(_TENSOR)
            self.found.append(value)
        elif isinstance(value, enum.Enum):  # a typed value, not its int or str: never reused
            raise _Unscannable
        elif isinstance(value, str):
            self.signature += (_STR, str(value))
        elif value is None or isinstance(value, bool):
            self.signature.append(value)
        elif isinstance(value, bytes):
            self.signature += (_BYTES, bytes(value))
        elif isinstance(value, int):
            self.number(_INT, int(value))
        elif isinstance(value, float):
            self.number(_FLOAT, _DOUBLE(float(value)))
        elif isinstance(value, Mapping | list | tuple):
            self.typed_container(value, depth, inside)
        elif callable(getattr(value, "state_dict", None)):
            if not inside:
                self.objects.append(value)
            self.visit(self.state_dict_of(value), depth, True)
        else:
            raise _Unscannable

    def typed_container(self, value: Any, depth: int, inside: bool) -> None:
        """A namedtuple, ``torch.Size`` or dict subclass, by its class (flattening stores it as a
        typed value); any other container type is left to flattening, which refuses it."""
        try:
            kind = container_kind(value)
        except NotSafeError:
            raise _Unscannable from None
        if kind == "dict":
            items = container_items(value)
            keys = tuple(k for k, _ in items)
            self.signature += (_TYPED, type(value), keys, tuple(map(type, keys)))
            self.items([v for _, v in items], depth, inside)
        else:
            self.signature += (_TYPED, type(value), len(value))
            self.items(value, depth, inside)


@dataclass(frozen=True)
class _DictsSeen:
    """Dicts of tensors a scan accepted (an optimizer's per-parameter state): their ids, their
    version tags and their keys. The same dicts with the same tags hold the same keys and the
    same tensor objects, so the next scan takes the keys from here and checks no type; the
    tensors themselves are taken from the dicts (a memo holds no tensor)."""

    ids: list[int]
    tags: list[int]
    keys: list[tuple[Any, ...]]

    def same(self, dicts: list[dict[Any, Any]]) -> bool:
        """Whether ``dicts`` are these dicts, none changed since."""
        return list(map(id, dicts)) == self.ids and list(map(_DICT_VERSION, dicts)) == self.tags


@dataclass
class _Cached:
    """The last structure laid out, the fingerprint it was laid out from (tree and tensor
    fields apart) and the check of its tensors' fields."""

    signature: list[Any]
    values: list[int | bytes | tuple[int, ...]]  # the numbers of the state the structure's tree holds
    fields: list[tuple[Any, ...]]
    structure: Structure
    check: TensorsCheck | None


def _tree_of(state: Any, state_dicts: StateDicts, structure: Structure) -> Any:
    """The skeleton of ``state``, whose fingerprint equals that of ``structure``'s state but
    for its numbers: walked again (the tensor table and the blobs stay); False when the walk
    does not find the structure's tensors (flattening then lays it out afresh)."""
    try:
        walked = walk_state(state, state_dicts)  # replays the state dicts the scan took
    except UnsupportedValueError:
        return False
    return skeleton_of(walked, structure) if len(walked.tensors) == structure.found else False


class StructureCache:
    """The fingerprint and structure of the last state laid out; see the module docstring."""

    def __init__(self) -> None:
        self._last: _Cached | None = None
        self._dicts: list[_DictsSeen] = []  # see _DictsSeen
        self._trees = ModuleTrees()
        self.hits = 0
        self.misses = 0

    def snapshot(self, state: Any) -> tuple[Snapshot, list[Any] | None]:
        """Flatten ``state``, reusing the last structure when the fingerprint matches.

        Returns the snapshot and the top-level objects with ``state_dict()`` (None when the
        state could not be fingerprinted; the caller then finds them itself). Raises what
        :func:`~asyncckpt.saving.snapshot.flatten` raises.
        """
        state_dicts = StateDicts(self._trees)
        scanned = _scan_unchecked(state, state_dicts, self._dicts)
        last = self._last
        fields = None
        if scanned is not None and last is not None and scanned.signature == last.signature:
            versions = None if last.check is None else last.check.versions(scanned.found)
            same_tensors = versions is not None
            if not same_tensors:
                fields = fields_of(scanned.found)
                same_tensors = fields is not None and fields == last.fields
                if same_tensors:
                    last.check = TensorsCheck.of(scanned.found)  # made under this thread's modes
            if same_tensors:
                tree = None if scanned.values == last.values else _tree_of(state, state_dicts, last.structure)
                if tree is not False:
                    self.hits += 1
                    snapshot = Snapshot(last.structure, scanned.found, versions=versions, tree=tree)
                    return snapshot, scanned.objects
        self.misses += 1
        snapshot = flatten(state, state_dicts)  # replays the state dicts the scan took
        self._last = None
        if scanned is not None:
            fields = fields if fields is not None else fields_of(scanned.found)
            if fields is not None and _reusable_fields(fields):
                check = TensorsCheck.of(scanned.found)
                self._last = _Cached(scanned.signature, scanned.values, fields, snapshot.structure, check)
        return snapshot, None if scanned is None else scanned.objects
