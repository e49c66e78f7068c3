"""What loads back: exact round trips where the format can, refusals where it cannot.

Tensor references carry whether the saved tensor required grad and whether it was a
``torch.nn.Parameter`` (flags in the reference, docs/FORMAT.md); ``codec.not_exact`` names the
values the format would silently change (namedtuple, IntEnum, defaultdict, ...) so that the
writer refuses them with their key path; the encoder itself never packs a subclass as its base.
"""

from __future__ import annotations

import collections
import enum
import io
import re
import types
from collections import Counter, OrderedDict, UserDict, defaultdict, namedtuple
from typing import Any, NamedTuple

import msgpack
import pytest
import torch
from spec_files import build_file, header_fields

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt.errors import StateTooLargeError, UnsupportedValueError
from asyncckpt.format import BigInt, TensorRef

# --------------------------------------------------------------------------- tensor reference flags


@pytest.mark.parametrize(
    ("ref", "payload"),
    [
        (TensorRef(5), 5),
        (TensorRef(5, requires_grad=True), [5, 1]),
        (TensorRef(5, parameter=True), [5, 2]),
        (TensorRef(5, requires_grad=True, parameter=True), [5, 3]),
        (TensorRef(2**40, requires_grad=True), [2**40, 1]),
    ],
)
def test_tensor_reference_flags_round_trip(ref: TensorRef, payload: Any) -> None:
    packed = fmt.pack(ref)

    assert packed == msgpack.packb(msgpack.ExtType(fmt.EXT_TENSOR, msgpack.packb(payload)))
    assert fmt.unpack(packed) == ref
    assert fmt.unpack(fmt.pack({"w": [ref, (ref,)]})) == {"w": [ref, (ref,)]}


@pytest.mark.parametrize("index", [0, 1, 127, 128, 255, 256, 2**16, 2**32 - 1, 2**32, 2**64 - 1])
def test_plain_references_keep_their_bytes_and_decode_on_the_fast_path(index: int) -> None:
    packed = fmt.pack(TensorRef(index))

    assert packed == msgpack.packb(msgpack.ExtType(fmt.EXT_TENSOR, msgpack.packb(index)))
    assert fmt.unpack(packed) == TensorRef(index)


@pytest.mark.parametrize(
    "payload",
    [
        [5, 0],  # flags 0 are written as a bare index
        [5, 4],
        [5, True],
        [5, 1, 0],
        [5],
        ["5", 1],
        [5.0, 1],
        {"index": 5},
        True,
        None,
    ],
)
def test_malformed_tensor_references_are_refused(payload: Any) -> None:
    with pytest.raises(ValueError, match="tensor reference is not an int"):
        fmt.unpack(msgpack.packb(msgpack.ExtType(fmt.EXT_TENSOR, msgpack.packb(payload))))


def test_a_reference_asking_an_int_tensor_to_require_grad_is_refused() -> None:
    row = ["step", "int64", [], [], 0, 0]
    data = build_file(header_fields(tensors=[row], tree={"step": TensorRef(0, requires_grad=True)}))

    with pytest.raises(asyncckpt.CorruptedCheckpointError) as caught:
        fmt.read_layout(io.BytesIO(data), "mem")

    assert "asks tensor 0 (step) to require grad, which its dtype torch.int64 cannot" in caught.value.reason
    # a Parameter that does not require grad may be of any dtype
    ok = build_file(header_fields(tensors=[row], tree={"step": TensorRef(0, parameter=True)}))
    assert fmt.read_layout(io.BytesIO(ok), "mem").tree == {"step": TensorRef(0, parameter=True)}


def test_every_float_and_complex_dtype_may_require_grad() -> None:
    from asyncckpt.dtypes import DTYPE_BY_NAME

    for name, dtype in DTYPE_BY_NAME.items():
        row = ["w", name, [0], [1], 0, 0]
        data = build_file(header_fields(tensors=[row], tree=[TensorRef(0, requires_grad=True)]))
        differentiable = dtype.is_floating_point or dtype.is_complex
        if differentiable:
            fmt.read_layout(io.BytesIO(data), "mem")
            assert torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=True).requires_grad
        else:
            with pytest.raises(asyncckpt.CorruptedCheckpointError, match="require grad"):
                fmt.read_layout(io.BytesIO(data), "mem")


def test_flagged_references_survive_a_written_file() -> None:
    weight = torch.arange(4, dtype=torch.float32)
    tree = {"w": TensorRef(0, requires_grad=True, parameter=True), "same": TensorRef(0), "b": TensorRef(1)}
    sink = io.BytesIO()
    fmt.write_checkpoint(
        sink,
        step=1,
        metadata={},
        tree=tree,
        tensors=[
            fmt.TensorEntry("w", torch.float32, (4,), (1,), 0, 0),
            fmt.TensorEntry("b", torch.float32, (4,), (1,), 0, 0),
        ],
        sizes=[16],
        blobs=[fmt.tensor_bytes(weight)],
    )

    assert fmt.read_layout(io.BytesIO(sink.getvalue()), "mem").tree == tree


# --------------------------------------------------------------------------- values the format would change


class Color(enum.IntEnum):
    RED = 1


class Flags(enum.IntFlag):
    A = 1


class Name(enum.StrEnum):
    ALICE = "alice"


class Point(NamedTuple):
    x: int
    y: int


class Strs(list[str]):
    pass


class Text(str):
    pass


OldPoint = namedtuple("OldPoint", "x y")  # noqa: PYI024 - the collections kind is the point


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (Color.RED, r"an enum member \(Color.RED\) would load as its plain value"),
        (Flags.A, r"an enum member \(Flags.A\)"),
        (Name.ALICE, r"an enum member \(Name.ALICE\)"),
        (Point(1, 2), r"a namedtuple \(Point\) would load as a plain tuple; store tuple\(value\)"),
        (OldPoint(1, 2), r"a namedtuple \(OldPoint\)"),
        (torch.Size([2, 3]), r"a tuple subclass \(Size\) would load as a plain tuple"),
        (Strs(["a"]), r"a list subclass \(Strs\) would load as a plain list"),
        (defaultdict(int), "a defaultdict would load as a plain dict; store dict"),
        (Counter("aab"), "a Counter would load as a plain dict"),
        (UserDict(a=1), "a UserDict would load as a plain dict"),
        (types.MappingProxyType({"a": 1}), "a mappingproxy would load as a plain dict"),
        (collections.ChainMap({"a": 1}), "a ChainMap would load as a plain dict"),
    ],
)
def test_values_the_format_would_change_are_named(value: Any, reason: str) -> None:
    found = fmt.not_exact(value)

    assert found is not None
    assert re.search(reason, found), found


@pytest.mark.parametrize(
    "value",
    [{}, OrderedDict(a=1), [], (), "", b"", 0, 2**70, 1.5, True, None, Text("x")],
)
def test_values_that_load_back_as_documented_are_accepted(value: Any) -> None:
    assert fmt.not_exact(value) is None


def test_a_float_subclass_is_accepted_as_its_value() -> None:
    numpy = pytest.importorskip("numpy")
    assert fmt.not_exact(numpy.float64(1.5)) is None


@pytest.mark.parametrize(
    "value",
    [Point(1, 2), torch.Size([2]), OrderedDict(a=1), defaultdict(list), Color.RED, Strs(), Text("x")],
)
def test_the_encoder_never_packs_a_subclass_as_its_base(value: Any) -> None:
    with pytest.raises(UnsupportedValueError, match=f"cannot encode {type(value).__qualname__}"):
        fmt.pack({"k": [value]})


def test_the_encoder_says_why_a_namedtuple_is_refused() -> None:
    with pytest.raises(UnsupportedValueError, match=r"a namedtuple \(Point\) would load as a plain tuple"):
        fmt.pack(Point(1, 2))


def test_big_ints_beyond_the_limit_are_refused_before_writing() -> None:
    widest = 2**8192 - 1  # 8192 bits of magnitude (int.bit_length)
    for value in (widest, -widest):
        assert fmt.unpack(fmt.pack(BigInt(value))) == BigInt(value)
    with pytest.raises(StateTooLargeError, match="an int of 8193 bits exceeds the limit of 8192 bits"):
        fmt.pack(BigInt(2**8192))
    with pytest.raises(StateTooLargeError, match="an int of 8193 bits"):
        fmt.pack(BigInt(-(2**8192)))
    with pytest.raises(ValueError, match="an int of more than 8192 bits"):
        fmt.unpack(msgpack.packb(msgpack.ExtType(fmt.EXT_BIGINT, b"\x01" + bytes(1024))))
    with pytest.raises(ValueError, match="an int of more than 8192 bits"):  # too long a payload
        fmt.unpack(msgpack.packb(msgpack.ExtType(fmt.EXT_BIGINT, bytes(1026))))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.tensor([1 + 2j, 3 - 4j]).conj(),
        lambda: torch._neg_view(torch.tensor([1.0, -2.0])),
        lambda: torch._neg_view(torch.tensor([1 + 2j]).conj()),
    ],
)
def test_conjugate_and_negative_views_are_written_with_their_values(make: Any, tmp_dir: Any) -> None:
    # Their memory holds the values before the conjugation or negation: tensor_bytes used to
    # fail (torch refuses the dtype view), and a raw view of the memory would be wrong.
    tensor = make()

    assert bytes(fmt.tensor_bytes(tensor)) == bytes(
        fmt.tensor_bytes(tensor.clone().resolve_conj().resolve_neg())
    )
    path = asyncckpt.save(tmp_dir / "views.ckpt", {"t": tensor}, step=1)
    assert torch.equal(asyncckpt.load(path).state["t"], tensor.resolve_conj().resolve_neg())
