"""format.codec: msgpack with exact types."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spec_files import nested_tuples

from asyncckpt import format as fmt
from asyncckpt.format import BigInt, TensorRef

SameState = Callable[[Any, Any], None]
FIXTURE_OK = [HealthCheck.function_scoped_fixture]


def test_extension_types_bytes() -> None:
    assert fmt.pack((1, 2)) == msgpack.packb(msgpack.ExtType(1, msgpack.packb([1, 2])))
    assert fmt.pack(TensorRef(5)) == msgpack.packb(msgpack.ExtType(2, msgpack.packb(5)))
    assert fmt.pack(BigInt(2**70)) == msgpack.packb(
        msgpack.ExtType(3, (2**70).to_bytes(9, "big", signed=True))
    )
    assert fmt.pack(BigInt(-(2**70))) == msgpack.packb(
        msgpack.ExtType(3, (-(2**70)).to_bytes(9, "big", signed=True))
    )


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 2**64 - 1 + 2**100, -(2**1000)])
def test_big_int_roundtrip(value: int) -> None:
    assert fmt.unpack(fmt.pack(BigInt(value))) == BigInt(value)


def test_pack_refuses_unknown_types() -> None:
    with pytest.raises(TypeError, match="cannot encode set"):
        fmt.pack({1, 2})


def test_unpack_refuses_unknown_extension() -> None:
    with pytest.raises(ValueError, match="unknown msgpack extension type 9"):
        fmt.unpack(msgpack.packb(msgpack.ExtType(9, b"")))


def test_unpack_refuses_a_tensor_ref_that_is_not_an_int() -> None:
    with pytest.raises(ValueError, match="tensor reference is not an int"):
        fmt.unpack(msgpack.packb(msgpack.ExtType(2, msgpack.packb("0"))))


def test_unpack_accepts_as_many_nested_tuples_as_flatten_does() -> None:
    # Regression: flatten allows a container at depth MAX_DEPTH (the root is depth 0), i.e.
    # MAX_DEPTH + 1 nested tuples; unpack used to refuse the last one.
    value = fmt.unpack(nested_tuples(fmt.MAX_DEPTH + 1))
    for _ in range(fmt.MAX_DEPTH):
        assert type(value) is tuple and len(value) == 1
        value = value[0]
    assert value == ()
    with pytest.raises(ValueError, match="nesting deeper than 128 levels"):
        fmt.unpack(nested_tuples(fmt.MAX_DEPTH + 2))


msgpack_keys = st.text(max_size=8) | st.integers(-(2**63), 2**64 - 1)
msgpack_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.integers(-(2**300), 2**300).map(BigInt)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.integers(0, 2**32).map(TensorRef)
)
msgpack_trees = st.recursive(
    msgpack_leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(msgpack_keys, children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(tree=msgpack_trees)
def test_pack_unpack_roundtrip(tree: Any, assert_same_state: SameState) -> None:
    assert_same_state(tree, fmt.unpack(fmt.pack(tree)))
