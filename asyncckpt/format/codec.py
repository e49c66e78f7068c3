"""msgpack with exact types: tuples, tensor refs, big ints and typed values as extension types.

Tuples stay tuples (:data:`~.spec.EXT_TUPLE`), tensor references stay references
(:data:`~.spec.EXT_TENSOR`, with their grad and Parameter flags), ints beyond 64 bits stay ints
(:data:`~.spec.EXT_BIGINT`) and typed values stay typed (:data:`~.spec.EXT_TYPED`); int keys stay
int keys. Decoding costs a bounded amount per byte:
:func:`unpack` runs :func:`~.scan.scan` first, which checks the objects a value would build
(``spec.max_header_objects``), the bytes nested tuples copy (``spec.max_tuple_bytes``) and the
nesting (``MAX_DEPTH``) without building anything.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import msgpack

from .._gc import gc_paused
from ..errors import StateTooLargeError, UnsupportedValueError
from . import spec
from .scan import scan
from .spec import EXT_BIGINT, EXT_TENSOR, EXT_TUPLE, EXT_TYPED, BigInt, TensorRef, TypedValue

_TENSOR_REF_MAX_PAYLOAD = 16  # [uint64 index, flags] packs to at most 11 bytes
_FLAGS = (1, 2, 3)  # bit 0: requires_grad, bit 1: a Parameter; 0 is written as a bare index
_UINT_SIZES = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}  # msgpack uint 8/16/32/64: bytes after the tag
_COUNTED = frozenset({list, tuple, dict, TensorRef, BigInt, TypedValue})


class Encoder:
    """msgpack with exact types; counts the bytes of all tuple payloads (see ``max_tuple_bytes``).

    One encoder may pack several values (the pieces of one header); ``tuple_bytes`` adds up.
    """

    def __init__(self) -> None:
        self.tuple_bytes = 0

    def pack(self, value: Any) -> bytes:
        """The msgpack bytes of ``value``.

        Raises :class:`UnsupportedValueError` for a type the format does not store exactly (a
        tuple, dict or list subclass among them) and :class:`StateTooLargeError` for an int of
        more than ``MAX_BIGINT_BITS`` bits.
        """
        packed: bytes = msgpack.packb(value, default=self._default, strict_types=True, use_bin_type=True)
        return packed

    def _default(self, value: Any) -> Any:
        if type(value) is tuple:
            payload = self.pack(list(value))
            self.tuple_bytes += len(payload)
            return msgpack.ExtType(EXT_TUPLE, payload)
        if isinstance(value, TensorRef):
            index = value.index if not value.flags else [value.index, value.flags]
            return msgpack.ExtType(EXT_TENSOR, self.pack(index))
        if isinstance(value, BigInt):
            bits = value.value.bit_length()
            if bits > spec.MAX_BIGINT_BITS:
                raise StateTooLargeError(
                    f"an int of {bits} bits exceeds the limit of {spec.MAX_BIGINT_BITS} bits; "
                    "store it as a str or bytes"
                )
            return msgpack.ExtType(EXT_BIGINT, value.value.to_bytes((bits + 8) // 8, "big", signed=True))
        if isinstance(value, TypedValue):  # its [kind, type, payload] array counts as its copies
            payload = self.pack([value.kind, value.type, value.payload])
            self.tuple_bytes += len(payload)
            return msgpack.ExtType(EXT_TYPED, payload)
        reason = not_exact(value)
        raise UnsupportedValueError(
            f"cannot encode {type(value).__qualname__}" + (f": {reason}" if reason else "")
        )


def pack(value: Any) -> bytes:
    """msgpack with exact types: tuples, tensor refs and big ints as extension types."""
    return Encoder().pack(value)


def pack_map_header(length: int) -> bytes:
    """The msgpack bytes that open a map of ``length`` entries (its keys and values follow)."""
    header: bytes = msgpack.Packer().pack_map_header(length)
    return header


def count_objects(value: Any) -> int:
    """How many objects :func:`unpack` counts for the msgpack of ``value``.

    Lists, tuples, dicts (keys included), tensor references, big ints and typed values (their
    payload's objects too) count one each; the writer checks the total against
    ``spec.max_header_objects`` before it writes a byte.
    """
    count = 0
    pending = [value]
    while pending:
        node = pending.pop()
        kind = type(node)
        if kind not in _COUNTED:
            continue
        count += 1
        if kind is dict:
            pending.extend([k for k in node if type(k) in _COUNTED])
            pending.extend([v for v in node.values() if type(v) in _COUNTED])
        elif kind is list or kind is tuple:
            pending.extend([v for v in node if type(v) in _COUNTED])
        elif kind is TypedValue:
            pending.append(node.payload)
    return count


def not_exact(value: Any) -> str | None:
    """Why a non-tensor value would not load back as the type it is; None when it would.

    The format stores ``dict``, ``list``, ``tuple``, ``str``, ``bytes``, ``int``, ``float``,
    ``bool`` and ``None`` exactly. ``OrderedDict`` (what ``state_dict()`` returns) loads as a
    ``dict`` with the same items in the same order, and other subclasses of ``int``, ``float``,
    ``str`` and ``bytes`` (``numpy.float64``) as their plain value: both are documented
    (docs/FORMAT.md, "What loads back") and None here. Refused, with the reason returned: enum
    members (an ``IntEnum`` would load as an int), tuple subclasses (a namedtuple, ``torch.Size``),
    list subclasses and every mapping other than ``dict`` and ``OrderedDict`` (``defaultdict``
    would lose its default factory, ``Counter`` its missing-key zero).
    """
    kind = type(value)
    if kind in _PLAIN:
        return None
    if isinstance(value, enum.Enum):
        return (
            f"an enum member ({kind.__qualname__}.{value.name}) would load as its plain value; "
            "store its .value or .name"
        )
    if isinstance(value, tuple):
        what = "a namedtuple" if hasattr(value, "_fields") else "a tuple subclass"
        return f"{what} ({kind.__qualname__}) would load as a plain tuple; store tuple(value)"
    if isinstance(value, list):
        return f"a list subclass ({kind.__qualname__}) would load as a plain list; store list(value)"
    if isinstance(value, Mapping):
        return f"a {kind.__qualname__} would load as a plain dict; store dict(value)"
    return None


_PLAIN = frozenset({dict, OrderedDict, list, tuple, str, bytes, int, float, bool, type(None)})


def unpack(data: bytes) -> Any:
    """Inverse of :func:`pack`, at a cost bounded by ``len(data)``.

    The bytes are checked by :func:`~.scan.scan` before anything is decoded (structure, lengths,
    nesting, object count, tuple copies). Raises ``ValueError`` for what the scan refuses, an
    unknown extension type, a malformed tensor reference or big int, and msgpack's own exceptions
    (invalid UTF-8, an unhashable key); the reader turns them all into
    :class:`~asyncckpt.errors.CorruptedCheckpointError`.
    """
    scan(data)
    with gc_paused():
        return _Decoder(len(data)).decode(data)


class _Decoder:
    """One header's decoding: the extension hook msgpack calls, with the nesting and copies of
    tuples checked again as it goes."""

    def __init__(self, size: int) -> None:
        self.max_tuple_bytes = spec.max_tuple_bytes(size)
        self.tuple_bytes = 0
        self.depth = 0

    def decode(self, data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True, ext_hook=self.ext)

    def ext(self, code: int, payload: bytes) -> Any:
        if code == EXT_TUPLE:
            return self.tuple(payload)
        if code == EXT_TENSOR:
            return _tensor_ref(payload)
        if code == EXT_BIGINT:
            return _big_int(payload)
        if code == EXT_TYPED:
            return _typed(self.tuple(payload))
        raise ValueError(f"unknown msgpack extension type {code}")

    def tuple(self, payload: bytes) -> tuple[Any, ...]:
        self.tuple_bytes += len(payload)
        if self.tuple_bytes > self.max_tuple_bytes:
            raise ValueError(f"tuples nest more than {self.max_tuple_bytes} bytes in total")
        self.depth += 1
        # The root of a tree is depth 0, so MAX_DEPTH + 1 tuples may nest (as in flatten).
        if self.depth > spec.MAX_DEPTH + 1:
            raise ValueError(f"nesting deeper than {spec.MAX_DEPTH} levels")
        try:
            items = self.decode(payload)
        finally:
            self.depth -= 1
        if not isinstance(items, list):
            raise ValueError("tuple payload is not an array")
        return tuple(items)


def _tensor_ref(payload: bytes) -> TensorRef:
    # The common payloads, a positive fixint or a uint 8/16/32, without a nested msgpack call.
    if len(payload) == 1 and payload[0] < 0x80:
        return TensorRef(payload[0])
    if payload and len(payload) == 1 + _UINT_SIZES.get(payload[0], -1):
        return TensorRef(int.from_bytes(payload[1:], "big"))
    if len(payload) > _TENSOR_REF_MAX_PAYLOAD:
        raise ValueError("tensor reference is not an int")
    value = msgpack.unpackb(payload)
    if _is_int(value):
        return TensorRef(value)
    if isinstance(value, list) and len(value) == 2 and all(map(_is_int, value)) and value[1] in _FLAGS:
        index, flags = value
        return TensorRef(index, requires_grad=bool(flags & 1), parameter=bool(flags & 2))
    raise ValueError("tensor reference is not an int or [int, flags 1-3]")


def _big_int(payload: bytes) -> BigInt:
    if len(payload) > (spec.MAX_BIGINT_BITS + 8) // 8:
        raise ValueError(f"an int of more than {spec.MAX_BIGINT_BITS} bits")
    value = int.from_bytes(payload, "big", signed=True)
    if value.bit_length() > spec.MAX_BIGINT_BITS:
        raise ValueError(f"an int of more than {spec.MAX_BIGINT_BITS} bits")
    return BigInt(value)


def _typed(items: tuple[Any, ...]) -> TypedValue:
    """A typed value's ``[kind, type, payload]``, each length checked before it is trusted."""
    if len(items) != 3:
        raise ValueError(f"typed value has {len(items)} fields, not 3")
    kind, name, payload = items
    if not isinstance(kind, str) or not 0 < len(kind) <= spec.MAX_TYPED_KIND:
        raise ValueError("typed value kind is not a short string")
    if not isinstance(name, str) or len(name) > spec.MAX_TYPED_NAME:
        raise ValueError("typed value type name is not a string of at most MAX_TYPED_NAME characters")
    return TypedValue(kind, name, payload)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
