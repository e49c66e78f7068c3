"""Walking an application state into an encodable skeleton and the tensors it holds.

:func:`walk_state` checks every value, replaces objects with ``state_dict()`` by their state
dicts and each tensor by a :class:`~asyncckpt.format.TensorRef`, and returns the skeleton with
the tensors in the order found and their dotted keys. It runs a fast pass over the exact types a
state almost always holds (dict, list, tuple, str, int, float, bool, None, bytes, plain tensors
and Parameters) and, when that pass meets anything else, the careful pass that stores typed
values (enums, namedtuples, dict subclasses, ...; :mod:`asyncckpt._values`), resolves
conjugate and negative views into their values, and names the key path of a value that cannot
be stored exactly. Each object's ``state_dict()`` is called once per save: :class:`StateDicts`
replays the results to a later pass.
"""

from __future__ import annotations

import enum
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._tree import KeyPath, dotted_key, key_path
from .._values import SAFE_TYPES_TEXT, NotSafeError, container_items, container_kind, encode, typed_kind
from ..dtypes import NAME_BY_DTYPE
from ..errors import UnsupportedValueError
from ..format import MAX_DEPTH, MAX_NDIM, BigInt, TensorRef, TypedValue
from .state_dicts import StateDicts as StateDicts  # where the walks and their callers look for it

# Python ints outside this range are stored as big ints (a msgpack extension type).
INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1

_STRIDED = torch.strided
_TENSOR = torch.Tensor
_PARAMETER = torch.nn.Parameter
_REFS: list[TensorRef] = []  # TensorRef(i) for every i used so far: immutable, so shared
_REFS_LOCK = threading.Lock()


def tensor_ref(index: int) -> TensorRef:
    """``TensorRef(index)``, one shared instance per index (a skeleton holds thousands)."""
    if len(_REFS) <= index:
        with _REFS_LOCK:
            while len(_REFS) <= index:
                _REFS.append(TensorRef(len(_REFS)))
    return _REFS[index]


@dataclass(frozen=True)
class Walked:
    """A state's encodable skeleton, its tensors in the order found and their dotted keys."""

    tree: Any
    tensors: list[torch.Tensor]  # detached (plain tensors), conjugate and negative views resolved
    keys: list[str]


def walk_state(state: Any, state_dicts: StateDicts | None = None) -> Walked:
    """Check ``state`` and replace each tensor by its ref; see the module docstring.

    Raises :class:`asyncckpt.errors.UnsupportedValueError` (a ``TypeError``) for the first value
    that cannot be stored; its ``key`` is the value's key path, which the message names too.
    """
    state_dicts = state_dicts if state_dicts is not None else StateDicts()
    try:
        return _FastWalk(state_dicts.detached_reader()).run(state)
    except _Unusual:
        walker = _CarefulWalk(state_dicts.detached_reader())
        tree = walker.walk(state, ())
        return Walked(tree, [t for t, _ in walker.found], [dotted_key(p) for _, p in walker.found])


class _Unusual(Exception):
    """The fast walk met a value that only the careful walk handles (or refuses)."""


_PLAIN = (str, int, float, bool, type(None), bytes)


class _FastWalk:
    """Exact types only; anything else raises :class:`_Unusual`. Builds the same skeleton as
    :class:`_CarefulWalk` for the states it accepts."""

    def __init__(self, state_dict_of: Callable[[Any], Any]) -> None:
        self.state_dict_of = state_dict_of
        self.tensors: list[torch.Tensor] = []
        self.keys: list[str] = []

    def run(self, state: Any) -> Walked:
        tree = self.value(state, None, 0)
        return Walked(tree, self.tensors, self.keys)

    def value(self, value: Any, key: str | None, depth: int) -> Any:
        """``key`` is the dotted key so far (None at the root, where no key was taken yet)."""
        if depth > MAX_DEPTH:
            raise _Unusual
        kind = type(value)
        if kind in _PLAIN:
            return _plain(value)
        if kind is dict or kind is OrderedDict:
            return self.mapping(value, key, depth)
        if kind is list:
            return [self.item(v, key, i, depth) for i, v in enumerate(value)]
        if kind is tuple:
            return tuple([self.item(v, key, i, depth) for i, v in enumerate(value)])
        if isinstance(value, torch.Tensor):
            return self.tensor(value, key)
        if isinstance(value, Mapping | list | tuple | str | int | float | bytes):
            raise _Unusual  # subclasses: the careful walk converts them
        if callable(getattr(value, "state_dict", None)):
            return self.value(self.state_dict_of(value), key, depth)
        raise _Unusual

    def item(self, value: Any, key: str | None, index: int, depth: int) -> Any:
        if type(value) in _PLAIN and depth < MAX_DEPTH:
            return _plain(value)
        return self.value(value, str(index) if key is None else f"{key}.{index}", depth + 1)

    def mapping(self, value: Mapping[Any, Any], key: str | None, depth: int) -> dict[Any, Any]:
        out = {}
        for k, v in value.items():
            kind = type(k)
            if kind is str:
                if not k.isascii():
                    _check_utf8(k)
                name = k
            elif kind is int and INT64_MIN <= k <= UINT64_MAX:
                name = str(k)
            else:
                raise _Unusual
            if type(v) in _PLAIN and depth < MAX_DEPTH:
                out[k] = _plain(v)
            else:
                out[k] = self.value(v, name if key is None else f"{key}.{name}", depth + 1)
        return out

    def tensor(self, tensor: torch.Tensor, key: str | None) -> TensorRef:
        kind = type(tensor)
        if (
            (kind is not _TENSOR and kind is not _PARAMETER)
            or tensor.layout is not _STRIDED
            or tensor.dtype not in NAME_BY_DTYPE
            or tensor.dim() > MAX_NDIM
            or tensor.is_meta
            or tensor.is_nested
            or tensor.is_conj()
            or tensor.is_neg()
        ):
            raise _Unusual
        index = len(self.tensors)
        self.keys.append(key or "<root>")
        if kind is _TENSOR and not tensor.requires_grad:
            self.tensors.append(tensor)
            return tensor_ref(index)
        self.tensors.append(tensor.detach())
        return TensorRef(index, requires_grad=tensor.requires_grad, parameter=kind is _PARAMETER)


def tensor_problem(tensor: torch.Tensor) -> str | None:
    """Why the format cannot store ``tensor`` (its dtype, layout, kind, rank), or None."""
    if tensor.dtype not in NAME_BY_DTYPE:
        return f"tensors of dtype {tensor.dtype} cannot be stored"
    if tensor.layout is not _STRIDED:  # sparse, sparse_csr, mkldnn, jagged, ...
        return "only dense (strided) tensors can be stored; store t.to_dense() or its parts"
    if tensor.is_nested:
        return "nested tensors cannot be stored; store t.unbind() (a list of tensors)"
    if tensor.is_meta:
        return "meta tensors hold no data to store; materialize it (e.g. t.to_empty(device='cpu'))"
    if type(tensor) is not _TENSOR and type(tensor) is not _PARAMETER:
        try:
            tensor.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError, TypeError):
            return (
                f"a {type(tensor).__qualname__} has no storage of its own (a wrapper tensor subclass); "
                "store a plain tensor of its data"
            )
    if tensor.dim() > MAX_NDIM:
        return f"tensors of more than {MAX_NDIM} dimensions cannot be stored"
    return None


def _plain(value: Any) -> Any:
    """An exact plain value as stored (strings checked, wide ints as :class:`BigInt`)."""
    kind = type(value)
    if kind is str:
        if not value.isascii():
            _check_utf8(value)
    elif kind is int and not INT64_MIN <= value <= UINT64_MAX:
        return BigInt(value)
    return value


def _check_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Unusual from None


def _unsupported(path: KeyPath, reason: str) -> UnsupportedValueError:
    """The error for a value at ``path`` that cannot be stored; the message starts with the key path."""
    where = key_path(path)
    return UnsupportedValueError(f"{where}: {reason}", key=where)


_EXACT_CONTAINERS = (dict, OrderedDict, list, tuple)


class _CarefulWalk:
    """Every type the format stores exactly (or as documented), and the error for any other."""

    def __init__(self, state_dict_of: Callable[[Any], Any]) -> None:
        self.state_dict_of = state_dict_of
        self.found: list[tuple[torch.Tensor, KeyPath]] = []
        self._active: set[int] = set()
        self._in_typed = 0  # > 0 while walking the fields of a typed value
        # Conjugate and negative views, resolved once each: a view met twice stays one tensor.
        self._resolved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def walk(self, value: Any, path: KeyPath) -> Any:
        if len(path) > MAX_DEPTH:
            raise _unsupported(path, f"nesting deeper than {MAX_DEPTH} levels")
        if isinstance(value, torch.Tensor):  # first: the most common leaf of a big state
            return self._tensor(value, path)
        if isinstance(value, enum.Enum):  # before str and int: IntEnum and StrEnum keep their type
            return self._typed(value, "enum", path)
        if isinstance(value, str):
            return _text(value, path, "string")
        if value is None or isinstance(value, bool | bytes):
            return _exact(value)
        if isinstance(value, int):
            return _int(int(value))
        if isinstance(value, float):
            return float(value)
        if isinstance(value, Mapping | list | tuple):
            if type(value) in _EXACT_CONTAINERS:
                return self._container(value, path)
            return self._other_container(value, path)
        if callable(getattr(value, "state_dict", None)) and not self._in_typed:
            return self.walk(self.state_dict_of(value), path)
        kind = typed_kind(value)
        if kind is not None:
            return self._typed(value, kind, path)
        raise _unsupported(
            path,
            f"cannot store a value of type {type(value).__qualname__}; checkpoints hold dicts, lists, "
            f"tuples, None, bool, int, float, str, bytes, tensors, objects with state_dict() and "
            f"{SAFE_TYPES_TEXT}: convert it to one of those (e.g. str(value)) or leave it out",
        )

    def _other_container(self, value: Any, path: KeyPath) -> Any:
        """A namedtuple, ``torch.Size`` or dict subclass as a typed value; any other container
        type is refused (an object with ``state_dict()`` is walked as its state dict)."""
        try:
            kind = container_kind(value)
        except NotSafeError as exc:
            if callable(getattr(value, "state_dict", None)) and not self._in_typed:
                return self.walk(self.state_dict_of(value), path)
            raise _unsupported(path, str(exc)) from None
        if kind == "dict":
            for key, _ in container_items(value):
                self._key(key, path)
        if id(value) in self._active:
            raise _unsupported(path, "the state refers to itself (a cycle)")
        self._active.add(id(value))
        try:
            return self._typed(value, kind, path)
        finally:
            self._active.discard(id(value))

    def _typed(self, value: Any, kind: str, path: KeyPath) -> TypedValue:
        """A safe typed value; its fields are walked as plain values (no tensors, no state dicts)."""
        self._in_typed += 1
        try:
            return encode(value, kind, lambda child, key: self.walk(child, (*path, key)))
        except NotSafeError as exc:
            raise _unsupported(path, str(exc)) from None
        finally:
            self._in_typed -= 1

    def _tensor(self, tensor: torch.Tensor, path: KeyPath) -> TensorRef:
        if self._in_typed:
            raise _unsupported(
                path,
                "a tensor inside a typed value (an enum, dataclass, namedtuple, dict subclass or "
                "Namespace) cannot be stored: typed values hold plain values only; put the tensor in "
                "a plain dict, list or tuple (e.g. dict(value), value._asdict())",
            )
        problem = tensor_problem(tensor)
        if problem is not None:
            raise _unsupported(path, problem)
        parameter = isinstance(tensor, _PARAMETER)
        self.found.append((self._resolve(tensor), path))
        if not tensor.requires_grad and not parameter:
            return tensor_ref(len(self.found) - 1)
        return TensorRef(len(self.found) - 1, requires_grad=tensor.requires_grad, parameter=parameter)

    def _resolve(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` detached, a conjugate or negative view as a copy of its values.

        Such a view shares its base's memory but not its values: stored as a view into its
        base's bytes it would load without the conjugation or negation.
        """
        data = tensor.detach()
        if not data.is_conj() and not data.is_neg():
            return data
        cached = self._resolved.get(id(tensor))
        if cached is None:  # keeps the view alive with its copy, so that its id stays its own
            cached = self._resolved[id(tensor)] = (tensor, data.resolve_conj().resolve_neg())
        return cached[1]

    def _container(self, value: Any, path: KeyPath) -> Any:
        if id(value) in self._active:
            raise _unsupported(path, "the state refers to itself (a cycle)")
        self._active.add(id(value))
        try:
            if isinstance(value, Mapping):
                return {self._key(k, path): self.walk(v, (*path, k)) for k, v in value.items()}
            items = [self.walk(v, (*path, i)) for i, v in enumerate(value)]
            return tuple(items) if isinstance(value, tuple) else items
        finally:
            self._active.discard(id(value))

    @staticmethod
    def _key(key: Any, path: KeyPath) -> str | int:
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise _unsupported(
                path,
                f"dict key {key!r} of type {type(key).__qualname__} "
                "cannot be stored (keys must be str or int)",
            )
        if isinstance(key, int) and not INT64_MIN <= key <= UINT64_MAX:
            raise _unsupported(path, f"dict key {key} does not fit 64 bits")
        return _text(key, path, "dict key") if isinstance(key, str) else int(key)


def _text(value: str, path: KeyPath, what: str) -> str:
    """``value`` as an exact ``str``; lone surrogates have no UTF-8 form, so msgpack cannot store them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _unsupported(
            path, f"{what} {value!r} cannot be stored: it is not valid UTF-8 ({exc.reason})"
        ) from None
    return str(value)


def _exact(value: Any) -> Any:
    if isinstance(value, bytes) and type(value) is not bytes:
        return bytes(value)
    return value


def _int(value: int) -> int | BigInt:
    return value if INT64_MIN <= value <= UINT64_MAX else BigInt(value)
