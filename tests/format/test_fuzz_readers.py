"""Every reader entry point of the format, fed hostile bytes: a result or a documented error.

``read_layout``, ``verify_blobs``, ``read_blob_into``, ``check_blob``, ``sniff`` and
``legacy.verify_zip_members`` may raise only :class:`CorruptedCheckpointError` or
:class:`UnsupportedVersionError` (both :class:`CheckpointError`); a layout they accept views
every tensor without error. Inputs: random bytes; valid files with random damage; and, most
searching, headers of random content whose checksums all agree, so that every check behind the
checksums is reached.
"""

from __future__ import annotations

import functools
import io
import struct
import zipfile
from typing import Any

import crc32c
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_files import build_file, header_fields, spec_prelude, spec_trailer

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt.dtypes import DTYPE_BY_NAME
from asyncckpt.format import BigInt, TensorRef
from asyncckpt.format.legacy import verify_zip_members

DOCUMENTED = (asyncckpt.CorruptedCheckpointError, asyncckpt.UnsupportedVersionError)
CI = settings(max_examples=300, deadline=None, derandomize=True, database=None)
STRESS = settings(CI, max_examples=5000)


def judged(call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, or None when it raised a documented error; any other fails."""
    try:
        result = call(*args, **kwargs)
    except DOCUMENTED as exc:
        assert exc.reason and str(exc).endswith(exc.reason)
        return None
    return result


def check_layout_file(data: bytes) -> None:
    """read_layout, then (if accepted) every blob check and every tensor view."""
    layout = judged(fmt.read_layout, io.BytesIO(data), "fuzz")
    if layout is None:
        return
    judged(fmt.verify_blobs, io.BytesIO(data), layout, path="fuzz", scratch_bytes=512)
    blobs = []
    for index, entry in enumerate(layout.blobs):
        blob = torch.zeros(entry.nbytes, dtype=torch.uint8)
        judged(fmt.read_blob_into, io.BytesIO(data), layout, index, fmt.tensor_bytes(blob), verify=True)
        judged(fmt.check_blob, io.BytesIO(data), layout, index, scratch=memoryview(bytearray(64)))
        blobs.append(blob)
    for entry in layout.tensors:
        view = fmt.view_tensor(entry, blobs[entry.blob])  # a checked layout always views
        assert view.nbytes <= fmt.MAX_INDEX and list(view.shape) == list(entry.shape)


# --------------------------------------------------------------------------- random bytes


@CI
@given(data=st.binary(max_size=9000))
def test_random_bytes(data: bytes) -> None:
    check_layout_file(data)
    judged(fmt.sniff, data[:8], path="fuzz")
    judged(verify_zip_members, io.BytesIO(data), path="fuzz")


@CI
@given(body=st.binary(max_size=6000), header=st.binary(max_size=600))
def test_random_bytes_behind_a_valid_prelude_and_consistent_trailer(body: bytes, header: bytes) -> None:
    start = spec_prelude() + bytes(4096 - 64) + body
    size = len(start) + len(header) + 64
    check_layout_file(start + header + spec_trailer(len(start), len(header), size, crc32c.crc32c(header)))


# --------------------------------------------------------------------------- damaged valid files


def damaged(data: bytes, draw: st.DrawFn) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and out:
            out[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del out[at:]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del out[at : at + draw(st.integers(1, 64))]
    return bytes(out)


@functools.cache
def valid_file() -> bytes:
    sink = io.BytesIO()
    weights = torch.arange(1000, dtype=torch.float32)
    fmt.write_checkpoint(
        sink,
        step=9,
        metadata={"note": ("x", 1)},
        tree={"w": TensorRef(0, requires_grad=True), "b": TensorRef(1), "n": [BigInt(2**70), None]},
        tensors=[
            fmt.TensorEntry("w", torch.float32, (10, 100), (100, 1), 0, 0),
            fmt.TensorEntry("b", torch.int64, (5,), (1,), 1, 0),
        ],
        sizes=[4000, 40],
        blobs=[fmt.tensor_bytes(weights), fmt.tensor_bytes(torch.arange(5))],
    )
    return sink.getvalue()


@CI
@given(data=st.data())
def test_damaged_valid_files(data: st.DataObject) -> None:
    check_layout_file(damaged(valid_file(), data.draw))


@CI
@given(data=st.data())
def test_damaged_blobs_behind_a_valid_layout(data: st.DataObject) -> None:
    good = valid_file()
    layout = fmt.read_layout(io.BytesIO(good), "fuzz")
    bad = damaged(good, data.draw)
    judged(fmt.verify_blobs, io.BytesIO(bad), layout, path="fuzz")
    for index, entry in enumerate(layout.blobs):
        blob = torch.empty(entry.nbytes, dtype=torch.uint8)
        judged(fmt.read_blob_into, io.BytesIO(bad), layout, index, fmt.tensor_bytes(blob), verify=True)


# --------------------------------------------------------------------------- consistent hostile headers

ints = st.one_of(
    st.integers(-3, 300),
    st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]),
    st.integers(-(2**63), 2**64 - 1),
)
leaves = st.one_of(
    ints,
    st.none(),
    st.booleans(),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.integers(-(2**100), 2**100).map(BigInt),
    st.builds(TensorRef, st.integers(0, 3), st.booleans(), st.booleans()),
)
values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=6)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4) | st.integers(-2, 9) | st.booleans(), children, max_size=4)
    ),
    max_leaves=12,
)
dims = st.lists(ints, max_size=5)
tensor_rows = st.one_of(
    st.tuples(
        st.text(max_size=6),
        st.sampled_from([*DTYPE_BY_NAME, "float128", ""]),
        dims,
        dims,
        st.integers(-1, 2),
        ints,
    ).map(list),
    values,
)
blob_rows = st.one_of(
    st.tuples(st.sampled_from([4096, 8192, 4100, 0]) | ints, st.integers(0, 20) | ints, ints).map(list),
    values,
)
FIELDS = ["format", "version", "status", "step", "created", "writer", "metadata", "blobs", "tensors", "tree"]


@st.composite
def hostile_headers(draw: st.DrawFn) -> bytes:
    fields = header_fields(
        blobs=draw(st.lists(blob_rows, max_size=3)),
        tensors=draw(st.lists(tensor_rows, max_size=4)),
        tree=draw(values),
    )
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        if draw(st.booleans()):
            fields[name] = draw(values)
        else:
            fields.pop(name, None)
    if draw(st.booleans()):
        return build_file(fields)
    raw = bytearray(fmt.pack(fields))  # damage the msgpack itself, then checksum it
    if raw:
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return build_file(bytes(raw))


@CI
@given(data=hostile_headers())
def test_hostile_headers_with_consistent_checksums(data: bytes) -> None:
    check_layout_file(data)


@pytest.mark.stress
@STRESS
@given(data=hostile_headers())
def test_hostile_headers_with_consistent_checksums_stress(data: bytes) -> None:
    check_layout_file(data)


# --------------------------------------------------------------------------- legacy zip files


@functools.cache
def zip_file() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(300, dtype=torch.float32), "step": 3}, buffer)
    return buffer.getvalue()


@CI
@given(data=st.data())
def test_damaged_zip_torch_save_files(data: st.DataObject) -> None:
    judged(verify_zip_members, io.BytesIO(damaged(zip_file(), data.draw)), path="fuzz")


@CI
@given(
    names=st.lists(
        st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), min_size=1, max_size=10),
        min_size=1,
        max_size=4,
        unique=True,
    ),
    payload=st.binary(max_size=200),
    method=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]),
    data=st.data(),
)
def test_hostile_zip_archives(names: list[str], payload: bytes, method: int, data: st.DataObject) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name in names:
            archive.writestr(name, payload)
    judged(verify_zip_members, io.BytesIO(buffer.getvalue()), path="fuzz")
    judged(verify_zip_members, io.BytesIO(damaged(buffer.getvalue(), data.draw)), path="fuzz")


def test_sniff_answers_every_first_byte() -> None:
    for first in range(256):
        for head in (bytes([first]), bytes([first]) + b"SYNCKPT", bytes([first]) * 8):
            judged(fmt.sniff, head, path="fuzz")


def test_a_zip64_directory_offset_beyond_seek_is_refused() -> None:
    # Found by fuzzing: header offsets below -2**63 made zipfile's seek raise OverflowError.
    data = bytearray(zip_file())
    record = data.rfind(b"PK\x06\x06")  # torch.save writes a zip64 end of central directory
    struct.pack_into("<Q", data, record + 48, 2**64 - 1)  # its offset of the central directory

    with pytest.raises(asyncckpt.CorruptedCheckpointError, match="cannot be read"):
        verify_zip_members(io.BytesIO(bytes(data)), path="fuzz")


def test_a_broken_lzma_member_is_refused() -> None:
    # Found by fuzzing: zipfile lets lzma.LZMAError out of a member's read.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_LZMA) as archive:
        archive.writestr("data.pkl", bytes(range(256)) * 8)
    data = bytearray(buffer.getvalue())
    data[45:60] = bytes(15)  # inside the member's compressed stream

    with pytest.raises(asyncckpt.CorruptedCheckpointError, match="data.pkl"):
        verify_zip_members(io.BytesIO(bytes(data)), path="fuzz")
