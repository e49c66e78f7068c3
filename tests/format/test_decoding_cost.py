"""format.scan and the writer's side of the decoding-cost limits: one count, both directions.

The scan counts every list, tuple, map, tensor reference and big int of a header; the writer
counts the same objects before it writes a byte, so that it never writes a header readers
refuse. (tests/faults/test_header_bombs.py is the reader's side, end to end.)
"""

from __future__ import annotations

import io
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt import format as fmt
from asyncckpt.errors import StateTooLargeError
from asyncckpt.format import BigInt, TensorRef

keys = st.text(max_size=6) | st.integers(-(2**63), 2**64 - 1)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.integers(-(2**200), 2**200).map(BigInt)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.builds(TensorRef, st.integers(0, 2**40), st.booleans(), st.booleans())
)
trees = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=20)
        | st.lists(children, max_size=5).map(tuple)
        | st.dictionaries(keys, children, max_size=5)
    ),
    max_leaves=60,
)


@settings(max_examples=300, deadline=None)
@given(tree=trees)
def test_the_writer_counts_what_the_scan_counts(tree: Any) -> None:
    packed = fmt.pack(tree)

    assert fmt.scan.scan(packed) == fmt.count_objects(tree)
    assert fmt.pack(fmt.unpack(packed)) == packed  # bytes, since NaN != NaN


def test_the_scan_counts_objects_not_values() -> None:
    value = {"a": [1, 2, (3, [4])], "b": TensorRef(0), "c": BigInt(2**70), "d": {}, "e": "text"}
    # the map, the list, the tuple, the inner list, the reference, the big int, the empty map
    assert fmt.scan.scan(fmt.pack(value)) == 7


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated: a value is missing at byte 0"),
        (b"\x92\x01", "a container at byte 1 declares 2 values, more than the bytes left"),
        (b"\x93\xa1a\xa1", "truncated: a value runs past byte 4"),
        (b"\x91\x91\x91", "a container at byte 3 declares 1 values, more than the bytes left"),
        (b"\xc1", "byte 0 is 0xc1, which msgpack never uses"),
        (b"\x01\x02", "1 bytes follow the header's value"),
        (b"\xa5abc", "truncated: a value runs past byte 4"),
        (b"\xcd\x01", "truncated: a value runs past byte 2"),
        (b"\xdc\x00\x05\x01", "declares 5 values, more than the bytes left"),
        (b"\x8f" + b"\x01" * 20, "declares 30 values, more than the bytes left"),
        (b"\xd4\x02", "truncated: an extension value at byte 1 runs past byte 2"),
        (b"\xd5\x01\x91\x01\x02", "1 bytes follow"),  # a 2-byte tuple payload [1], then 0x02
        (b"\xd6\x01\x92\x01\x02\x03", "tuple payload ending at byte 6 holds more than one value"),
        (b"\xd5\x01\x90\x00", "tuple payload ending at byte 4 holds more than one value"),
        (b"\xd4\x01\x01", "tuple payload is not an array"),
        (b"\xd5\x01\x92\x01", "declares 2 items, more than its payload holds"),
        (b"\xd4\x07\x00", "unknown msgpack extension type 7"),
        (b"\xc7\x00\x01", "tuple payload is not an array"),  # an empty payload
    ],
)
def test_the_scan_refuses_malformed_msgpack(data: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        fmt.scan.scan(data)


def test_the_scan_skips_long_runs_of_one_byte_values() -> None:
    data = msgpack.packb([[0, 1, -1, None, True, False, ""] * 1000, [1.5, 2**40, "ab"] * 100])

    assert fmt.scan.scan(data) == 3
    with pytest.raises(ValueError, match="truncated"):
        fmt.scan.scan(data[:-1])


@pytest.mark.parametrize("limit", [5, 100])
def test_the_limit_applies_to_the_whole_header(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    monkeypatch.setattr(fmt.spec, "HEADER_FREE_OBJECTS", limit)
    monkeypatch.setattr(fmt.spec, "HEADER_BYTES_PER_OBJECT", 10**9)  # no allowance per byte
    ok = msgpack.packb([[]] * (limit - 1))  # the outer list and limit - 1 inner ones
    fmt.scan.scan(ok)

    with pytest.raises(ValueError, match=f"more than {limit} lists, tuples, maps"):
        fmt.scan.scan(msgpack.packb([[]] * limit))


# --------------------------------------------------------------------------- the writer refuses the same


def write(tree: Any, metadata: Any = None) -> bytes:
    sink = io.BytesIO()
    fmt.write_checkpoint(sink, step=1, metadata=metadata or {}, tree=tree, tensors=[], sizes=[], blobs=[])
    return sink.getvalue()


def test_a_state_of_too_many_small_containers_is_refused_before_writing() -> None:
    sink = io.BytesIO()
    many = [[] for _ in range(2 * fmt.HEADER_FREE_OBJECTS)]  # 8,192 lists in about 8 KB

    with pytest.raises(StateTooLargeError, match="lists, tuples, dicts, tensors and big ints") as caught:
        fmt.write_checkpoint(sink, step=1, metadata={}, tree=many, tensors=[], sizes=[], blobs=[])

    assert sink.getvalue() == b""
    assert "store large collections of small values as tensors" in caught.value.reason
    with pytest.raises(StateTooLargeError, match="lists, tuples, dicts"):  # metadata counts too
        write({}, metadata={"many": many})


def test_what_the_writer_accepts_at_the_limit_the_reader_reads() -> None:
    # Find the most one-item lists the writer accepts: the file it writes must read back.
    low, high = 1, 10 * fmt.HEADER_FREE_OBJECTS
    while low < high:
        middle = (low + high + 1) // 2
        try:
            fmt.prepare_header(step=1, metadata={}, tree=[[0]] * middle, tensors=[], sizes=[])
        except StateTooLargeError:
            high = middle - 1
        else:
            low = middle
    assert low > fmt.HEADER_FREE_OBJECTS  # one per 4 bytes: a 2-byte list fits beyond the free ones

    layout = fmt.read_layout(io.BytesIO(write([[0]] * low)), "mem")
    assert layout.tree == [[0]] * low
    with pytest.raises(StateTooLargeError):
        write([[0]] * (low + 1))


def test_nested_tuples_may_copy_a_bounded_multiple_of_the_header() -> None:
    payload = bytes(256 << 10)
    deep: Any = payload
    for _ in range(40):  # 40 levels around 256 KiB copy 10 MiB: more than 1 MiB + 8 x 256 KiB
        deep = (deep,)
    with pytest.raises(StateTooLargeError, match="tuples in the state nest [0-9]+ bytes in total"):
        write(deep)

    shallow: Any = payload
    for _ in range(8):
        shallow = (shallow,)
    assert fmt.read_layout(io.BytesIO(write(shallow)), "mem").tree == shallow
