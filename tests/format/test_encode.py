"""format.encode: prelude, trailer, blob offsets, the writer, and limits checked before the first byte."""

from __future__ import annotations

import io
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest.mock import patch

import crc32c
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_files import spec_prelude, spec_trailer

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt.errors import StateTooLargeError, UnsupportedValueError, UsageError
from asyncckpt.format import TensorRef, writing
from asyncckpt.testing import RecordingOps


def test_prelude_bytes() -> None:
    prelude = fmt.encode_prelude("1.0", "0.1.0")

    assert len(prelude) == fmt.PRELUDE_SIZE == 64
    assert prelude == spec_prelude()
    assert prelude[0:8] == b"ASYNCKPT"
    assert prelude[8:24] == b"1.0" + bytes(13)
    assert prelude[24:40] == b"0.1.0" + bytes(11)
    assert prelude[40:60] == bytes(20)
    assert struct.unpack("<I", prelude[60:64])[0] == crc32c.crc32c(prelude[:60])


def test_trailer_bytes() -> None:
    header = b"\x80"  # an empty msgpack map
    trailer = fmt.encode_trailer(8192, header)

    assert trailer == spec_trailer(8192, 1, 8192 + 1 + 64, crc32c.crc32c(header))
    assert len(trailer) == fmt.TRAILER_SIZE and trailer[-8:] == b"ACKPTEND"
    assert struct.unpack_from("<QQQI", trailer) == (8192, 1, 8257, crc32c.crc32c(header))
    assert trailer[28:52] == bytes(24)


def test_crc32c_is_castagnoli() -> None:
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


@pytest.mark.parametrize(
    ("sizes", "offsets", "end"),
    [
        ([], [], 4096),
        ([0], [4096], 4096),
        ([1], [4096], 4097),
        ([4096, 1], [4096, 8192], 8193),
        ([4097, 0, 0, 5], [4096, 12288, 12288, 12288], 12293),
    ],
)
def test_blob_offsets_are_aligned(sizes: list[int], offsets: list[int], end: int) -> None:
    assert fmt.blob_offsets(sizes) == (offsets, end)
    assert all(offset % fmt.ALIGN == 0 for offset in offsets)


def test_written_file_layout() -> None:
    sink = io.BytesIO()
    blobs = [memoryview(b"\x01" * 10), memoryview(b""), memoryview(b"\x02" * 5000)]
    tensors = [fmt.TensorEntry("a", torch.uint8, (10,), (1,), 0, 0)]

    size = fmt.write_checkpoint(
        sink,
        step=9,
        metadata={"m": 1},
        tree=[TensorRef(0)],
        tensors=tensors,
        sizes=[10, 0, 5000],
        blobs=blobs,
    )

    data = sink.getvalue()
    assert size == len(data)
    assert data[:64] == spec_prelude() and data[64:4096] == bytes(4032)
    assert data[4096:4106] == b"\x01" * 10 and data[4106:8192] == bytes(8192 - 4106)
    assert data[8192:13192] == b"\x02" * 5000
    header_offset, header_len, file_size, header_crc = struct.unpack_from("<QQQI", data, size - 64)
    assert (header_offset, file_size) == (13192, size) and header_offset + header_len + 64 == size
    header = fmt.unpack(data[header_offset : header_offset + header_len])
    assert crc32c.crc32c(data[header_offset : header_offset + header_len]) == header_crc
    assert header["blobs"] == [
        [4096, 10, crc32c.crc32c(b"\x01" * 10)],
        [8192, 0, 0],
        [8192, 5000, crc32c.crc32c(b"\x02" * 5000)],
    ]
    assert header["tensors"] == [["a", "uint8", [10], [1], 0, 0]]
    assert (header["format"], header["version"], header["status"], header["step"]) == (
        "asyncckpt",
        "1.0",
        "complete",
        9,
    )
    assert header["writer"] == f"asyncckpt {asyncckpt.__version__}" and header["metadata"] == {"m": 1}
    assert header["tree"] == [TensorRef(0)]
    assert fmt.read_layout(io.BytesIO(data), "mem").blobs[2] == fmt.BlobEntry(
        8192, 5000, header["blobs"][2][2]
    )


def test_empty_state_file_is_prelude_padding_header_trailer() -> None:
    sink = io.BytesIO()
    size = fmt.write_checkpoint(sink, step=0, metadata={}, tree={}, tensors=[], sizes=[], blobs=[])

    layout = fmt.read_layout(io.BytesIO(sink.getvalue()), "mem")

    assert layout.header_offset == 4096 and layout.file_size == size and layout.blobs == ()


def test_blob_of_wrong_length_is_refused_by_the_writer() -> None:
    with pytest.raises(ValueError, match="has 3 bytes, expected 4"):
        fmt.write_checkpoint(
            io.BytesIO(), step=1, metadata={}, tree=[], tensors=[], sizes=[4], blobs=[memoryview(b"abc")]
        )


@pytest.mark.parametrize("step", [0, 1, 2**63 - 1])
def test_check_step_accepts(step: int) -> None:
    fmt.check_step(step)


@pytest.mark.parametrize(
    ("step", "error"),
    [(-1, ValueError), (2**63, ValueError), (True, TypeError), ("3", TypeError), (1.0, TypeError)],
)
def test_check_step_refuses(step: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="step must be") as caught:
        fmt.check_step(step)
    # A usage error (exit code 1), never a bare ValueError/TypeError.
    assert isinstance(caught.value, StateTooLargeError if error is ValueError else UnsupportedValueError)
    with pytest.raises(error, match="step must be"):  # the writer checks before writing a byte
        sink = io.BytesIO()
        try:
            fmt.write_checkpoint(sink, step=step, metadata={}, tree={}, tensors=[], sizes=[], blobs=[])
        finally:
            assert sink.getvalue() == b""


def test_writer_refuses_what_the_reader_would(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = {"step": 1, "metadata": {}, "tensors": [], "blobs": []}
    monkeypatch.setattr(fmt.spec, "MAX_TUPLE_BYTES", 1 << 20)
    deep: Any = bytes(256 << 10)
    for _ in range(4):
        deep = (deep,)
    with pytest.raises(ValueError, match="tuples in the state nest 1048[0-9]+ bytes in total, more than"):
        fmt.encode_header(tree=deep, **fields)
    fmt.encode_header(tree=deep[0], **fields)  # three levels copy less than 1 MiB

    monkeypatch.setattr(fmt.spec, "MAX_HEADER_BYTES", 1000)
    with pytest.raises(ValueError, match="the header would take [0-9]+ bytes, more than the limit of 1000"):
        fmt.encode_header(tree=bytes(1000), **fields)


# --------------------------------------------------------------------------- limits before the first byte


class RecordingSink:
    """A sink that records every write (and can be told to fail on the first one)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: memoryview | bytes) -> None:
        self.writes.append(bytes(data))


def big_header_state() -> dict[str, Any]:
    """A state whose header (2 KiB of bytes in the tree) exceeds a 1000-byte limit."""
    return {
        "step": 1,
        "metadata": {},
        "tree": {"w": TensorRef(0), "notes": bytes(2000)},
        "tensors": [fmt.TensorEntry("w", torch.uint8, (10_000,), (1,), 0, 0)],
        "sizes": [10_000],
    }


def test_a_too_large_header_is_refused_before_any_byte_reaches_the_sink(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fmt.spec, "MAX_HEADER_BYTES", 1000)
    sink = RecordingSink()
    pulled = []

    def blobs() -> Any:
        pulled.append(True)
        yield memoryview(bytes(10_000))

    with pytest.raises(
        StateTooLargeError, match="the header would take [0-9]+ bytes, more than the limit of 1000"
    ) as caught:
        fmt.write_checkpoint(sink, blobs=blobs(), **big_header_state())

    assert sink.writes == [] and pulled == []  # not a byte written, not a blob asked for
    assert isinstance(caught.value, UsageError) and caught.value.exit_code == 1
    with pytest.raises(StateTooLargeError):
        fmt.prepare_header(**big_header_state())


@pytest.mark.parametrize(("limit", "count"), [("MAX_TENSORS", "3 tensors"), ("MAX_BLOBS", "3 blobs")])
def test_too_many_tensors_or_blobs_are_refused_before_writing(
    monkeypatch: pytest.MonkeyPatch, limit: str, count: str
) -> None:
    monkeypatch.setattr(fmt.spec, limit, 2)
    entries = [fmt.TensorEntry(f"t{i}", torch.uint8, (1,), (1,), i, 0) for i in range(3)]
    sink = RecordingSink()

    with pytest.raises(StateTooLargeError, match=f"the state has {count}, more than the limit of 2"):
        fmt.write_checkpoint(
            sink,
            step=1,
            metadata={},
            tree=[TensorRef(i) for i in range(3)],
            tensors=entries,
            sizes=[1, 1, 1],
            blobs=[memoryview(b"x")] * 3,
        )
    assert sink.writes == []


def test_tuples_copying_too_much_are_refused_before_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fmt.spec, "MAX_TUPLE_BYTES", 1 << 20)
    deep: Any = bytes(256 << 10)
    for _ in range(4):
        deep = (deep,)
    sink = RecordingSink()

    with pytest.raises(StateTooLargeError, match="tuples in the state nest"):
        fmt.write_checkpoint(sink, step=1, metadata={}, tree=deep, tensors=[], sizes=[], blobs=[])
    assert sink.writes == []


def test_the_limit_is_judged_with_every_checksum_at_its_widest(monkeypatch: pytest.MonkeyPatch) -> None:
    state = big_header_state()
    widest = len(fmt.prepare_header(**state).finish([fmt.MAX_CRC]))
    monkeypatch.setattr(fmt.spec, "MAX_HEADER_BYTES", widest - 1)
    with pytest.raises(StateTooLargeError, match=f"the header would take {widest} bytes"):
        fmt.prepare_header(**state)

    monkeypatch.setattr(fmt.spec, "MAX_HEADER_BYTES", widest)
    assert fmt.prepare_header(**state).max_bytes == widest  # exact near the limit
    sink = io.BytesIO()
    fmt.write_checkpoint(sink, blobs=[memoryview(bytes(10_000))], **state)

    layout = fmt.read_layout(io.BytesIO(sink.getvalue()), "mem")
    assert layout.tree["notes"] == bytes(2000)
    assert layout.file_size - layout.header_offset - fmt.TRAILER_SIZE <= widest


crcs = st.integers(0, fmt.MAX_CRC)


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3 * fmt.ALIGN), max_size=12),
    data=st.data(),
    tree=st.recursive(
        st.none() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8),
        lambda c: (
            st.lists(c, max_size=3)
            | st.lists(c, max_size=3).map(tuple)
            | st.dictionaries(st.text(max_size=4), c)
        ),
        max_leaves=12,
    ),
)
def test_prepared_header_is_the_whole_map_and_bounds_it(
    sizes: list[int], data: st.DataObject, tree: Any
) -> None:
    checksums = data.draw(st.lists(crcs, min_size=len(sizes), max_size=len(sizes)), label="crcs")
    offsets, _ = fmt.blob_offsets(sizes)
    tensors = [fmt.TensorEntry(f"t{i}", torch.uint8, (n,), (1,), i, 0) for i, n in enumerate(sizes)]
    created = "2026-01-01T00:00:00.000000+00:00"
    fields = {"step": 4, "metadata": {"m": (1, 2)}, "tree": tree, "tensors": tensors, "created": created}

    prepared = fmt.prepare_header(sizes=sizes, **fields)
    header = prepared.finish(checksums)

    blobs = [fmt.BlobEntry(o, n, c) for o, n, c in zip(offsets, sizes, checksums, strict=True)]
    whole = {
        "format": "asyncckpt",
        "version": "1.0",
        "status": "complete",
        "step": 4,
        "created": created,
        "writer": f"asyncckpt {asyncckpt.__version__}",
        "metadata": {"m": (1, 2)},
        "blobs": [[b.offset, b.nbytes, b.crc] for b in blobs],
        "tensors": [[t.key, "uint8", list(t.shape), [1], t.blob, 0] for t in tensors],
        "tree": tree,
    }
    assert header == fmt.pack(whole) == fmt.encode_header(blobs=blobs, **fields)  # byte for byte
    assert len(header) <= len(prepared.finish([fmt.MAX_CRC] * len(sizes))) <= prepared.max_bytes


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 3 << 20), max_size=4), seed=st.integers(0, 2**32 - 1))
def test_checksum_pool_writes_the_same_bytes(sizes: list[int], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    payloads = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator) for n in sizes]
    tensors = [fmt.TensorEntry(f"t{i}", torch.uint8, (n,), (1,), i, 0) for i, n in enumerate(sizes)]
    fields = {
        "step": 2,
        "metadata": {},
        "tree": [TensorRef(i) for i in range(len(sizes))],
        "tensors": tensors,
    }
    header = fmt.prepare_header(sizes=sizes, created="2026-01-01T00:00:00.000000+00:00", **fields)
    inline, pooled = io.BytesIO(), io.BytesIO()

    fmt.write_file(inline, header, [fmt.tensor_bytes(p) for p in payloads])
    with ThreadPoolExecutor(1) as pool:
        fmt.write_file(pooled, header, [fmt.tensor_bytes(p) for p in payloads], checksum_pool=pool)

    assert inline.getvalue() == pooled.getvalue()
    layout = fmt.read_layout(io.BytesIO(pooled.getvalue()), "mem")
    fmt.verify_blobs(io.BytesIO(pooled.getvalue()), layout, path="mem")
    assert [b.nbytes for b in layout.blobs] == sizes


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300) | st.integers(1 << 20, (1 << 20) + 300), max_size=24),
    batch_blobs=st.integers(1, 5),
    batch_bytes=st.integers(1, 1000),
    seed=st.integers(0, 2**32 - 1),
)
def test_small_blob_checksums_in_batches_land_at_their_blobs(
    sizes: list[int], batch_blobs: int, batch_bytes: int, seed: int
) -> None:
    """Small blobs' checksums go to the pool in batches (cut by count or by bytes), between
    large blobs checksummed alone: each lands in the header row of its own blob."""
    generator = torch.Generator().manual_seed(seed)
    payloads = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator) for n in sizes]
    tensors = [fmt.TensorEntry(f"t{i}", torch.uint8, (n,), (1,), i, 0) for i, n in enumerate(sizes)]
    tree = [TensorRef(i) for i in range(len(sizes))]
    header = fmt.prepare_header(step=3, metadata={}, tree=tree, tensors=tensors, sizes=sizes)
    pooled = io.BytesIO()
    with (
        patch.object(writing, "_CRC_BATCH_BLOBS", batch_blobs),
        patch.object(writing, "_CRC_BATCH_BYTES", batch_bytes),
        ThreadPoolExecutor(1) as pool,
    ):
        fmt.write_file(pooled, header, [fmt.tensor_bytes(p) for p in payloads], checksum_pool=pool)

    layout = fmt.read_layout(io.BytesIO(pooled.getvalue()), "mem")
    expected = [crc32c.crc32c(p.numpy().tobytes()) for p in payloads]
    assert [b.crc for b in layout.blobs] == expected


def test_save_refuses_a_too_large_header_before_any_file_operation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fmt.spec, "MAX_HEADER_BYTES", 4096)
    ops = RecordingOps()

    with pytest.raises(
        StateTooLargeError, match="more than the limit of 4096; store large values as tensors"
    ):
        asyncckpt.save(tmp_path / "a.ckpt", {"w": torch.ones(2), "blob": bytes(5000)}, step=2, ops=ops)

    assert ops.calls == [] and list(tmp_path.iterdir()) == []  # not even a temp file


def _parts_state(sizes: list[int]) -> tuple[Any, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(len(sizes))
    payloads = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator) for n in sizes]
    tensors = [fmt.TensorEntry(f"t{i}", torch.uint8, (n,), (1,), i, 0) for i, n in enumerate(sizes)]
    header = fmt.prepare_header(
        step=3,
        metadata={},
        tree=[TensorRef(i) for i in range(len(sizes))],
        tensors=tensors,
        sizes=sizes,
        created="2026-01-01T00:00:00.000000+00:00",
    )
    return header, payloads


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 3 * fmt.ALIGN), max_size=8), cut=st.integers(1, 5000))
def test_the_three_writers_write_the_same_bytes(sizes: list[int], cut: int) -> None:
    header, payloads = _parts_state(sizes)
    whole, parts, region = io.BytesIO(), io.BytesIO(), io.BytesIO()
    fmt.write_file(whole, header, [fmt.tensor_bytes(p) for p in payloads])

    released: list[int] = []

    def pieces() -> Any:
        for blob, payload in enumerate(payloads):
            data = fmt.tensor_bytes(payload)
            for start in range(0, len(data), cut):
                yield blob, data[start : start + cut], lambda b=blob: released.append(b)

    fmt.write_parts(parts, header, pieces())
    staged = bytearray(header.offsets[-1] + header.sizes[-1] - fmt.DATA_OFFSET if sizes else 0)
    for offset, payload in zip(header.offsets, payloads, strict=True):
        start = offset - fmt.DATA_OFFSET
        staged[start : start + payload.numel()] = bytes(payload.numpy())
    fmt.write_region(region, header, memoryview(staged), ready=lambda i: i + 1)
    pooled = io.BytesIO()  # checksums (small blobs' in batches, large ones' alone) in a pool
    with ThreadPoolExecutor(1) as pool:
        fmt.write_region(pooled, header, memoryview(staged), ready=lambda i: i + 2, checksum_pool=pool)

    assert whole.getvalue() == parts.getvalue() == region.getvalue() == pooled.getvalue()
    assert len(released) == sum(-(-n // cut) for n in sizes)  # every part released once written


def test_parts_out_of_order_or_short_are_refused() -> None:
    header, payloads = _parts_state([10, 20])
    a, b = fmt.tensor_bytes(payloads[0]), fmt.tensor_bytes(payloads[1])
    with pytest.raises(ValueError, match="came after"):
        fmt.write_parts(io.BytesIO(), header, [(0, a, None), (1, b, None), (0, a, None)])
    with pytest.raises(ValueError, match="blob 0 got 5 bytes, expected 10"):
        fmt.write_parts(io.BytesIO(), header, [(0, a[:5], None), (1, b, None)])
    with pytest.raises(ValueError, match="blob 1 got no bytes"):
        fmt.write_parts(io.BytesIO(), header, [(0, a, None)])
    with pytest.raises(ValueError, match="there is no blob 2"):
        fmt.write_parts(io.BytesIO(), header, [(2, a, None)])


def test_small_blobs_go_out_in_few_writes() -> None:
    sizes = [100] * 300
    header, payloads = _parts_state(sizes)
    sink = RecordingSink()
    fmt.write_file(sink, header, [fmt.tensor_bytes(p) for p in payloads])
    assert len(sink.writes) <= 5  # joined: the sink has no writev


def test_an_encoded_layout_is_the_same_header(monkeypatch: pytest.MonkeyPatch) -> None:
    state = big_header_state()
    layout = fmt.encode_layout(tree=state["tree"], tensors=state["tensors"], sizes=state["sizes"])
    fields = {"step": state["step"], "metadata": state["metadata"], "created": "2026-01-01T00:00:00+00:00"}
    fresh = fmt.prepare_header(tree=state["tree"], tensors=state["tensors"], sizes=state["sizes"], **fields)
    reused = fmt.prepare_header(layout=layout, **fields)
    assert reused.finish([7]) == fresh.finish([7]) and reused.max_bytes == fresh.max_bytes
    monkeypatch.setattr(fmt.spec, "MAX_BLOBS", 0)  # limits are read at call time, also when reused
    with pytest.raises(StateTooLargeError, match="blobs"):
        fmt.prepare_header(layout=layout, **fields)


def test_a_pool_that_takes_no_more_work_checksums_on_the_writers_thread() -> None:
    # At interpreter exit (a save from an atexit hook) a pool refuses new work with RuntimeError,
    # as a shut-down one does: the checksums are then computed by the writer itself.
    header, payloads = _parts_state([10, 5000, 3 * fmt.ALIGN])
    staged = bytearray(header.offsets[-1] + header.sizes[-1] - fmt.DATA_OFFSET)
    for offset, payload in zip(header.offsets, payloads, strict=True):
        staged[offset - fmt.DATA_OFFSET : offset - fmt.DATA_OFFSET + payload.numel()] = bytes(payload.numpy())
    plain, refused = io.BytesIO(), io.BytesIO()
    fmt.write_region(plain, header, memoryview(staged))
    pool = ThreadPoolExecutor(1)
    pool.shutdown()
    fmt.write_region(refused, header, memoryview(staged), checksum_pool=pool)
    assert refused.getvalue() == plain.getvalue()
    whole = io.BytesIO()
    fmt.write_file(whole, header, [fmt.tensor_bytes(p) for p in payloads], checksum_pool=pool)
    assert whole.getvalue() == plain.getvalue()


@pytest.mark.parametrize("count", [1, fmt.ALIGN - 1, fmt.ALIGN, fmt.ALIGN + 1, 3 * fmt.ALIGN + 5])
def test_padding_of_any_length_is_that_many_zeros(count: int) -> None:
    """The writer's padding before a blob (shorter than a page between blobs of a header it
    prepared; any length is written right)."""
    pieces = writing._padding(count)
    assert b"".join(bytes(p) for p in pieces) == bytes(count) and all(len(p) <= fmt.ALIGN for p in pieces)
