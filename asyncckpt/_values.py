"""Safe typed values: common Python types a checkpoint stores exactly, without pickle.

Configuration travels with checkpoints (Lightning's hyper-parameters, a run's arguments), and it
is full of ``pathlib.Path``, ``torch.dtype``, ``torch.device``, enums, small dataclasses and
``argparse.Namespace``. Each becomes a :class:`~asyncckpt.format.TypedValue` (``kind``, the
class's name, a payload of plain values) and comes back as the same type:

==============  =====================================  ==========================================
kind            type name                              payload
==============  =====================================  ==========================================
``path``        ``PosixPath``, ``PureWindowsPath``...  the path as a string
``dtype``       ``torch.dtype``                        ``"float32"``, ``"bfloat16"``...
``device``      ``torch.device``                       ``"cpu"``, ``"cuda:1"``...
``enum``        ``module:Qualname``                    the member's name (a ``Flag``: its value)
``dataclass``   ``module:Qualname``                    ``{field: value}`` for every field
``namespace``   ``argparse.Namespace``                 ``{attribute: value}``
``namedtuple``  ``module:Qualname``                    ``{field: value}`` in the fields' order
``size``        ``torch.Size``                         the sizes, a list of ints
``dict``        ``module:Qualname`` (a dict subclass)  the items, a map
==============  =====================================  ==========================================

Rebuilding never imports a module and never runs the class's code: an enum, dataclass,
namedtuple or dict subclass is looked up among the modules the program has already imported, a
dataclass is filled in field by field without calling ``__init__`` (as ``copy.copy`` does), a
namedtuple is made by ``tuple.__new__`` and a dict subclass by its builtin base's ``__new__``
and ``__setitem__``. A class that cannot be found (not imported, renamed, fields changed) gives
an :class:`UnresolvedValue` holding the exact data, which saves back unchanged.

Containers whose type the format does not store (:func:`container_kind`): a namedtuple,
``torch.Size`` or a dict subclass with no state beyond its items is a typed value; any other
subclass of ``dict``, ``list`` or ``tuple`` and any other mapping is refused (a ``defaultdict``
would lose its factory, a list subclass its type).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import pathlib
import sys
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

import torch

from .format import TypedValue

_PATH_TYPES: dict[str, type[pathlib.PurePath]] = {
    "PurePosixPath": pathlib.PurePosixPath,
    "PureWindowsPath": pathlib.PureWindowsPath,
    "PosixPath": pathlib.PurePosixPath,  # concrete classes below, where this platform has them
    "WindowsPath": pathlib.PureWindowsPath,
}
_CONCRETE_PATH = {pathlib.Path().__class__.__name__: pathlib.Path}
SAFE_TYPES_TEXT = (
    "pathlib paths, torch.dtype, torch.device, torch.Size, enums, and dataclasses, namedtuples, "
    "dict subclasses and argparse.Namespace of such values"
)


@dataclasses.dataclass(frozen=True)
class UnresolvedValue:
    """A typed value whose class this program cannot find (not imported, renamed or changed).

    ``kind`` and ``type`` say what it was (``"enum"``, ``"mypkg.config:Mode"``); ``payload`` is
    its exact data. Saving it again writes the same typed value.
    """

    kind: str
    type: str
    payload: Any


class NotSafeError(Exception):
    """``value`` is of no safe type (internal: the snapshot turns it into its own error)."""


def typed_kind(value: Any) -> str | None:
    """The kind ``value`` is stored as, or None when it is none of the safe types."""
    if isinstance(value, enum.Enum):
        return "enum"
    if isinstance(value, pathlib.PurePath):
        return "path"
    if isinstance(value, torch.dtype):
        return "dtype"
    if isinstance(value, torch.device):
        return "device"
    if isinstance(value, argparse.Namespace):
        return "namespace"
    if isinstance(value, UnresolvedValue):  # before dataclasses: it is one
        return "unresolved"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "dataclass"
    return None


def container_kind(value: Any) -> str:
    """The kind a mapping, list or tuple of a type the format does not store is saved as.

    ``"namedtuple"``, ``"size"`` (``torch.Size``) or ``"dict"`` (a dict subclass whose items are
    all its state). Raises :class:`NotSafeError` with the reason, and what to store instead, for
    one that could not load back as what it is: other tuple and list subclasses, a
    ``defaultdict``, a dict subclass with attributes or ``__slots__``, a class no later program
    can find, and mappings that are not dicts.
    """
    cls = type(value)
    if cls is torch.Size:
        return "size"
    if isinstance(value, tuple):
        if not _is_namedtuple(cls, len(value)):
            raise NotSafeError(
                f"a tuple subclass ({cls.__qualname__}) would load as a plain tuple; store tuple(value)"
            )
        _reachable_name(cls)
        return "namedtuple"
    if isinstance(value, list):
        raise NotSafeError(
            f"a list subclass ({cls.__qualname__}) would load as a plain list; store list(value)"
        )
    if isinstance(value, defaultdict):
        raise NotSafeError(
            f"a {cls.__qualname__} would load without its default_factory (it cannot be stored); "
            "store dict(value)"
        )
    if not isinstance(value, dict):
        raise NotSafeError(f"a {cls.__qualname__} would load as a plain dict; store dict(value)")
    extra = _extra_state(value)
    if extra is not None:
        raise NotSafeError(
            f"a {cls.__qualname__} keeps {extra}, which would not load back; store dict(value)"
        )
    _reachable_name(cls)
    return "dict"


def container_items(value: Any) -> list[tuple[Any, Any]]:
    """A container's items as a dict subclass's base class orders them (never its own code)."""
    return list(_dict_base(type(value)).items(value))


def encode(value: Any, kind: str, encode_plain: Callable[[Any, Any], Any]) -> TypedValue:
    """``value`` (of ``kind``, from :func:`typed_kind`) as a typed value.

    ``encode_plain(child, key)`` encodes a field or attribute (the snapshot's walk, which
    refuses tensors and objects there). Raises :class:`NotSafeError` with the reason for a
    value of a safe type that still cannot be rebuilt (a class defined inside a function).
    """
    if kind == "path":
        return TypedValue("path", _path_type(type(value)), str(value))
    if kind == "dtype":
        return TypedValue("dtype", "torch.dtype", str(value).removeprefix("torch."))
    if kind == "device":
        return TypedValue("device", "torch.device", str(value))
    if kind == "namespace":
        return TypedValue("namespace", "argparse.Namespace", _fields(vars(value), encode_plain))
    if kind == "unresolved":
        return TypedValue(value.kind, value.type, value.payload)
    if kind == "size":
        return TypedValue("size", "torch.Size", [int(size) for size in value])
    name = _class_name(type(value))
    if kind == "namedtuple":
        fields = dict(zip(type(value)._fields, tuple.__iter__(value), strict=True))
        return TypedValue("namedtuple", name, _fields(fields, encode_plain))
    if kind == "dict":
        return TypedValue(
            "dict", name, {key: encode_plain(item, key) for key, item in container_items(value)}
        )
    if kind == "enum":  # a Flag combination has no single name: its value rebuilds it
        payload = encode_plain(value.value, "value") if isinstance(value, enum.Flag) else value.name
        return TypedValue("enum", name, payload)
    fields = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    return TypedValue("dataclass", name, _fields(fields, encode_plain))


def decode(typed: TypedValue, decode_plain: Callable[[Any], Any]) -> Any:
    """The value ``typed`` stands for, or an :class:`UnresolvedValue` when it cannot be rebuilt.

    ``decode_plain`` decodes a payload (big ints, nested typed values). Never imports, never
    calls a class's ``__init__``.
    """
    try:
        rebuilt = _REBUILD[typed.kind](typed.type, decode_plain(typed.payload))
    except (KeyError, LookupError, TypeError, ValueError, AttributeError, RuntimeError):
        rebuilt = None
    if rebuilt is None:
        return UnresolvedValue(typed.kind, typed.type, typed.payload)
    return rebuilt


# --------------------------------------------------------------------------- encoding


def _path_type(cls: type[pathlib.PurePath]) -> str:
    for base in cls.__mro__:
        if base.__module__ == "pathlib" and base.__name__ in _PATH_TYPES:
            return base.__name__
    raise NotSafeError(f"{cls.__qualname__} is not a pathlib path type")


def _class_name(cls: type) -> str:
    if "<locals>" in cls.__qualname__:
        raise NotSafeError(
            f"{cls.__qualname__} is defined inside a function, so no later program can find it; "
            "define it at module level"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def _fields(fields: dict[str, Any], encode_plain: Callable[[Any, Any], Any]) -> dict[str, Any]:
    return {name: encode_plain(value, name) for name, value in fields.items()}


def _is_namedtuple(cls: type, length: int) -> bool:
    fields = getattr(cls, "_fields", None)
    return isinstance(fields, tuple) and len(fields) == length and all(type(f) is str for f in fields)


def _reachable_name(cls: type) -> str:
    """``module:Qualname`` of ``cls``, checked to lead back to ``cls`` (else no loader finds it)."""
    name = _class_name(cls)
    if _find_class(name) is not cls:
        raise NotSafeError(
            f"{cls.__qualname__} cannot be found as {name} (made by a function, or renamed), so no "
            "later program can find it; define it at module level under its own name"
        )
    return name


def _extra_state(value: Any) -> str | None:
    """What of a container's state is not its items (attributes, slots), or None."""
    try:
        attributes = object.__getattribute__(value, "__dict__")
    except AttributeError:
        attributes = None
    if attributes:
        return f"attributes ({', '.join(sorted(map(str, attributes)))})"
    for klass in type(value).__mro__:
        if klass.__module__ != "builtins" and klass.__dict__.get("__slots__"):
            return f"state in __slots__ ({klass.__qualname__})"
    return None


def _dict_base(cls: type) -> type[dict[Any, Any]]:
    """The builtin class a dict subclass's items live in (an OrderedDict keeps its own order)."""
    return OrderedDict if issubclass(cls, OrderedDict) else dict


# --------------------------------------------------------------------------- decoding


def _find_class(name: str) -> type | None:
    """The class ``module:Qualname`` among the modules already imported (never imports)."""
    module_name, _, qualname = name.partition(":")
    found: Any = sys.modules.get(module_name)
    for part in qualname.split(".") if found is not None and qualname else ():
        found = getattr(found, part, None)
    return found if isinstance(found, type) else None


def _path(name: str, payload: Any) -> Any:
    if not isinstance(payload, str):
        return None
    cls = _CONCRETE_PATH.get(name) or _PATH_TYPES.get(name)
    return None if cls is None else cls(payload)


def _dtype(name: str, payload: Any) -> Any:
    dtype = getattr(torch, payload, None) if isinstance(payload, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _device(name: str, payload: Any) -> Any:
    return torch.device(payload) if isinstance(payload, str) else None


def _enum(name: str, payload: Any) -> Any:
    cls = _find_class(name)
    if cls is None or not issubclass(cls, enum.Enum):
        return None
    if issubclass(cls, enum.Flag):
        return cls(payload)
    return cls[payload] if isinstance(payload, str) else None


def _dataclass(name: str, payload: Any) -> Any:
    cls = _find_class(name)
    if cls is None or not dataclasses.is_dataclass(cls) or not isinstance(payload, dict):
        return None
    if {field.name for field in dataclasses.fields(cls)} != set(payload):
        return None  # the class changed since: keep the data as it was
    obj = object.__new__(cls)
    for field, value in payload.items():
        object.__setattr__(obj, field, value)  # frozen dataclasses too; __init__ never runs
    return obj


def _size(name: str, payload: Any) -> Any:
    if not isinstance(payload, list) or not all(type(n) is int and n >= 0 for n in payload):
        return None
    return torch.Size(payload)


def _namedtuple(name: str, payload: Any) -> Any:
    cls = _find_class(name)
    if cls is None or not issubclass(cls, tuple) or not isinstance(payload, dict):
        return None
    if not _is_namedtuple(cls, len(payload)) or tuple(payload) != cls._fields:  # type: ignore[attr-defined]
        return None  # the class changed since: keep the data as it was
    return tuple.__new__(cls, payload.values())  # the class's own __new__ never runs


def _dict(name: str, payload: Any) -> Any:
    cls = _find_class(name)
    if (
        cls is None
        or not issubclass(cls, dict)
        or issubclass(cls, defaultdict)
        or not isinstance(payload, dict)
    ):
        return None
    base = _dict_base(cls)
    rebuilt = base.__new__(cls)  # neither the class's __new__ nor its __init__ runs
    for key, value in payload.items():
        base.__setitem__(rebuilt, key, value)
    return rebuilt


def _namespace(name: str, payload: Any) -> Any:
    if not isinstance(payload, dict) or not all(isinstance(key, str) for key in payload):
        return None
    return argparse.Namespace(**payload)


_REBUILD: dict[str, Callable[[str, Any], Any]] = {
    "path": _path,
    "dtype": _dtype,
    "device": _device,
    "enum": _enum,
    "dataclass": _dataclass,
    "namespace": _namespace,
    "namedtuple": _namedtuple,
    "size": _size,
    "dict": _dict,
}
