"""format.blobs: reading blobs into memory, checking their CRC32C, tensors as views of blobs."""

from __future__ import annotations

import ctypes
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt.dtypes import DTYPE_BY_NAME, itemsize
from asyncckpt.format import Layout, TensorRef

WEIGHTS = torch.arange(3000, dtype=torch.float32)  # 12000 bytes: blob 0 spans three pages
BIAS = torch.arange(5, dtype=torch.int64)


def two_blob_file() -> tuple[bytes, Layout]:
    tensors = [
        fmt.TensorEntry("model.w", torch.float32, (3000,), (1,), 0, 0),
        fmt.TensorEntry("model.b", torch.int64, (5,), (1,), 1, 0),
    ]
    sink = io.BytesIO()
    fmt.write_checkpoint(
        sink,
        step=1,
        metadata={},
        tree={"w": TensorRef(0), "b": TensorRef(1)},
        tensors=tensors,
        sizes=[12000, 40],
        blobs=[fmt.tensor_bytes(WEIGHTS), fmt.tensor_bytes(BIAS)],
    )
    data = sink.getvalue()
    return data, fmt.read_layout(io.BytesIO(data), "mem")


def test_blobs_read_back_as_the_tensors_they_hold() -> None:
    data, layout = two_blob_file()
    blobs = []
    for index, entry in enumerate(layout.blobs):
        blob = torch.empty(entry.nbytes, dtype=torch.uint8)
        fmt.read_blob_into(io.BytesIO(data), layout, index, fmt.tensor_bytes(blob), verify=True, path="mem")
        fmt.verify_crc(layout, index, fmt.tensor_bytes(blob), path="mem")
        blobs.append(blob)

    assert torch.equal(fmt.view_tensor(layout.tensors[0], blobs[0]), WEIGHTS)
    assert torch.equal(fmt.view_tensor(layout.tensors[1], blobs[1]), BIAS)
    fmt.verify_blobs(io.BytesIO(data), layout, path="mem", scratch_bytes=1000)


def test_a_checksum_mismatch_names_blob_key_and_offset() -> None:
    data, layout = two_blob_file()
    damaged = bytearray(data)
    damaged[layout.blobs[1].offset + 3] ^= 0x10
    scratch = memoryview(bytearray(64))

    with pytest.raises(asyncckpt.CorruptedCheckpointError) as caught:
        fmt.check_blob(io.BytesIO(bytes(damaged)), layout, 1, path="run/x.ckpt", scratch=scratch)

    error = caught.value
    assert (error.path, error.blob, error.key, error.offset) == ("run/x.ckpt", 1, "model.b", 8192 + 8192)
    assert error.reason.startswith("checksum mismatch in model.b (blob 1 at offset 16384, 40 bytes)")
    assert str(error) == f"run/x.ckpt: {error.reason}"
    # The same error, whichever way the blob is read.
    dest = memoryview(bytearray(40))
    with pytest.raises(asyncckpt.CorruptedCheckpointError) as again:
        fmt.read_blob_into(io.BytesIO(bytes(damaged)), layout, 1, dest, verify=True, path="run/x.ckpt")
    assert str(again.value) == str(error)
    with pytest.raises(asyncckpt.CorruptedCheckpointError) as verified:
        fmt.verify_crc(layout, 1, dest, path="run/x.ckpt")
    assert str(verified.value) == str(error)


def test_a_truncated_blob_names_where_it_ends() -> None:
    data, layout = two_blob_file()
    cut = data[: layout.blobs[0].offset + 5000]  # the file as if the write stopped mid-blob

    with pytest.raises(asyncckpt.CorruptedCheckpointError) as caught:
        fmt.verify_blobs(io.BytesIO(cut), layout, path="p", scratch_bytes=4096)

    error = caught.value
    assert (error.blob, error.key, error.offset) == (0, "model.w", 4096 + 4096)
    assert error.reason == "truncated inside model.w at offset 8192"


def test_a_blob_holding_no_tensor_is_named_by_index() -> None:
    layout = Layout("1.0", 1, "", "", {}, {}, (fmt.BlobEntry(4096, 4, 0),), (), 8192, 8256)

    with pytest.raises(asyncckpt.CorruptedCheckpointError) as caught:
        fmt.verify_crc(layout, 0, memoryview(b"abcd"))

    assert caught.value.key is None and caught.value.blob == 0
    assert caught.value.reason.startswith("checksum mismatch in blob 0 (blob 0 at offset 4096, 4 bytes)")


@settings(max_examples=40, deadline=None)
@given(where=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_any_flipped_byte_inside_a_blob_is_caught(where: float, xor: int) -> None:
    data, layout = two_blob_file()
    spans = [range(b.offset, b.offset + b.nbytes) for b in layout.blobs]
    positions = [p for span in spans for p in span]
    position = positions[int(where * len(positions))]
    damaged = bytearray(data)
    damaged[position] ^= xor

    with pytest.raises(asyncckpt.CorruptedCheckpointError) as caught:
        fmt.verify_blobs(io.BytesIO(bytes(damaged)), layout, path="p")

    assert caught.value.blob == next(i for i, span in enumerate(spans) if position in span)


def test_tensor_bytes_is_a_zero_copy_view() -> None:
    tensor = torch.zeros(4, dtype=torch.int32)
    view = fmt.tensor_bytes(tensor)
    view[0] = 7

    assert len(view) == 16 and tensor[0].item() == 7
    assert len(fmt.tensor_bytes(torch.empty(0))) == 0
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        fmt.tensor_bytes(torch.zeros(4, 4).t())


@pytest.mark.parametrize("shape", [(), (3,), (2, 3, 1)])
@pytest.mark.parametrize("name", sorted(DTYPE_BY_NAME))
def test_tensor_bytes_are_the_tensors_memory_for_every_dtype(name: str, shape: tuple[int, ...]) -> None:
    dtype = DTYPE_BY_NAME[name]
    raw = torch.randint(0, 256, (max(1, math.prod(shape)) * itemsize(dtype),), dtype=torch.uint8)
    tensor = raw.view(dtype).view(shape)  # every bit pattern, NaNs included
    view = fmt.tensor_bytes(tensor)
    assert bytes(view) == ctypes.string_at(tensor.data_ptr(), raw.numel()) == bytes(raw.numpy())


def test_tensor_bytes_of_a_negative_or_conjugate_view_are_its_values() -> None:
    real = torch.tensor([1.5, -2.0, 3.25])
    assert bytes(fmt.tensor_bytes(torch._neg_view(real))) == bytes((-real).numpy())
    z = torch.tensor([1 + 2j, -3 - 4j], dtype=torch.complex64)
    assert bytes(fmt.tensor_bytes(z.conj())) == bytes(z.conj().resolve_conj().numpy())


def test_tensors_bytes_are_each_tensors_values_and_only_odd_ones_go_to_the_host() -> None:
    """The one-shot save's loop: the bytes of every kind of tensor (negative and conjugate views,
    one requiring grad, bfloat16, empty, 0-dim) are its values; only a tensor that is not a
    contiguous CPU tensor is passed to ``to_host``."""
    from asyncckpt.format.blobs import tensors_bytes

    real = torch.tensor([1.5, -2.0, 3.25])
    grad = torch.ones(3, requires_grad=True)
    z = torch.tensor([1 + 2j, -3 - 4j], dtype=torch.complex64)
    strided = torch.arange(6.0).view(2, 3).t()
    tensors = [
        real,
        torch._neg_view(real),
        z.conj(),
        grad,
        torch.arange(4).to(torch.bfloat16),
        torch.empty(0, 3),
        torch.tensor(7, dtype=torch.int16),
        strided,
    ]
    hosted: list[torch.Tensor] = []

    def to_host(tensor: torch.Tensor) -> torch.Tensor:
        hosted.append(tensor)
        return tensor.contiguous()

    got = [bytes(view) for view in tensors_bytes(tensors, to_host)]

    values = [t.detach().resolve_neg().resolve_conj().contiguous().reshape(-1) for t in tensors]
    assert got == [bytes(v.view(torch.uint8).numpy()) for v in values]
    assert len(hosted) == 1 and hosted[0] is strided
