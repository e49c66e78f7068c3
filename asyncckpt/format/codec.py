"""msgpack with exact types: tuples, tensor refs, big ints and typed values as extension types.

Tuples stay tuples (:data:`~.spec.EXT_TUPLE`), tensor references stay references
(:data:`~.spec.EXT_TENSOR`), ints beyond 64 bits stay ints (:data:`~.spec.EXT_BIGINT`) and
typed values stay typed (:data:`~.spec.EXT_TYPED`); int keys stay int keys. The decoder bounds
nesting (``MAX_DEPTH``) and the total of all tuple and typed-value payloads
(``MAX_TUPLE_BYTES``), since msgpack copies each extension payload once per level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from ..errors import UnsupportedValueError
from . import spec
from .spec import EXT_BIGINT, EXT_TENSOR, EXT_TUPLE, EXT_TYPED, BigInt, TensorRef, TypedValue


class Encoder:
    """msgpack with exact types; counts the bytes of all tuple payloads (see ``MAX_TUPLE_BYTES``).

    One encoder may pack several values (the pieces of one header); ``tuple_bytes`` adds up.
    """

    def __init__(self) -> None:
        self.tuple_bytes = 0

    def pack(self, value: Any) -> bytes:
        """The msgpack bytes of ``value``; raises :class:`UnsupportedValueError` for other types."""
        packed: bytes = msgpack.packb(value, default=self._default, strict_types=True, use_bin_type=True)
        return packed

    def _default(self, value: Any) -> Any:
        if isinstance(value, tuple):
            payload = self.pack(list(value))
            self.tuple_bytes += len(payload)
            return msgpack.ExtType(EXT_TUPLE, payload)
        if isinstance(value, TensorRef):
            return msgpack.ExtType(EXT_TENSOR, self.pack(value.index))
        if isinstance(value, BigInt):
            length = (value.value.bit_length() + 8) // 8
            return msgpack.ExtType(EXT_BIGINT, value.value.to_bytes(length, "big", signed=True))
        if isinstance(value, TypedValue):
            payload = self.pack([value.kind, value.type, value.payload])
            self.tuple_bytes += len(payload)
            return msgpack.ExtType(EXT_TYPED, payload)
        raise UnsupportedValueError(f"cannot encode {type(value).__qualname__}")


def pack(value: Any) -> bytes:
    """msgpack with exact types: tuples, tensor refs and big ints as extension types."""
    return Encoder().pack(value)


def pack_map_header(length: int) -> bytes:
    """The msgpack bytes that open a map of ``length`` entries (its keys and values follow)."""
    header: bytes = msgpack.Packer().pack_map_header(length)
    return header


def unpack(data: bytes) -> Any:
    """Inverse of :func:`pack`.

    Raises ``ValueError`` for an unknown extension type, a tensor reference that is not an int,
    nesting deeper than ``MAX_DEPTH`` or tuples holding more than ``MAX_TUPLE_BYTES`` in total,
    and msgpack's own exceptions for bytes that are not msgpack; the reader turns them all into
    :class:`~asyncckpt.errors.CorruptedCheckpointError`.
    """
    depth = 0
    tuple_bytes = 0

    def hook(code: int, payload: bytes) -> Any:
        nonlocal depth, tuple_bytes
        if code == EXT_TENSOR:
            index = msgpack.unpackb(payload)
            if not isinstance(index, int) or isinstance(index, bool):
                raise ValueError("tensor reference is not an int")
            return TensorRef(index)
        if code == EXT_BIGINT:
            return BigInt(int.from_bytes(payload, "big", signed=True))
        if code not in (EXT_TUPLE, EXT_TYPED):
            raise ValueError(f"unknown msgpack extension type {code}")
        tuple_bytes += len(payload)
        if tuple_bytes > spec.MAX_TUPLE_BYTES:
            raise ValueError(f"tuples nest more than {spec.MAX_TUPLE_BYTES} bytes in total")
        depth += 1
        # The root of a tree is depth 0, so MAX_DEPTH + 1 tuples may nest (as in flatten).
        if depth > spec.MAX_DEPTH + 1:
            raise ValueError(f"nesting deeper than {spec.MAX_DEPTH} levels")
        try:
            items = _unpack_raw(payload, hook)
        finally:
            depth -= 1
        if not isinstance(items, list):
            raise ValueError("tuple payload is not an array")
        return tuple(items) if code == EXT_TUPLE else _typed(items)

    return _unpack_raw(data, hook)


def _typed(items: list[Any]) -> TypedValue:
    """A typed value's ``[kind, type, payload]``, each length checked before it is trusted."""
    if len(items) != 3:
        raise ValueError(f"typed value has {len(items)} fields, not 3")
    kind, name, payload = items
    if not isinstance(kind, str) or not 0 < len(kind) <= spec.MAX_TYPED_KIND:
        raise ValueError("typed value kind is not a short string")
    if not isinstance(name, str) or len(name) > spec.MAX_TYPED_NAME:
        raise ValueError("typed value type name is not a string of at most MAX_TYPED_NAME characters")
    return TypedValue(kind, name, payload)


def _unpack_raw(data: bytes, hook: Callable[[int, bytes], Any]) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=hook, use_list=True)
