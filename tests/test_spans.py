"""Ranged reads for object stores: spans of several blobs or parts of one, many in flight, every
checksum verified piece by piece (combined), the lowest broken blob reported; CRC32C combine."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import crc32c
import pytest
import torch

# The load side's test helpers (tests/loading/helpers.py; tests/ is on sys.path).
from loading.helpers import assert_same_state, flip_blob_byte, make_state, truncate  # noqa: I001

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt import reader as reader_module
from asyncckpt.catalog import checkpoint_name
from asyncckpt.errors import CorruptedCheckpointError
from asyncckpt.format import crc32c_combine
from asyncckpt.spans import MAX_GAP, Piece, plan_spans
from asyncckpt.storage import ParallelReads, PosixStorage, ReadHandle


@pytest.mark.parametrize(
    ("n1", "n2"), [(0, 0), (0, 7), (7, 0), (1, 1), (100, 37), (1 << 20, 12345), (9, 1 << 16)]
)
def test_crc32c_combine_is_the_crc_of_the_concatenation(n1: int, n2: int) -> None:
    a, b = os.urandom(n1), os.urandom(n2)
    assert crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)


def blobs_layout(*blobs: tuple[int, int]) -> fmt.Layout:
    entries = tuple(fmt.BlobEntry(offset, nbytes, 0) for offset, nbytes in blobs)
    return fmt.Layout("1.0", 1, "", "", {}, {}, entries, (), 0, 0)


def test_spans_hold_several_small_blobs_and_split_big_ones() -> None:
    layout = blobs_layout((4096, 100), (8192, 100), (12288, 10_000), (40960, 0), (200_704, 50))
    spans = plan_spans(layout, 4096)
    pieces = [[(p.blob, p.start, p.nbytes) for p in span.pieces] for span in spans]
    assert pieces == [
        [(0, 0, 100)],  # the next blob would make the request longer than 4096 bytes
        [(1, 0, 100)],
        [(2, 0, 4096)],
        [(2, 4096, 4096)],
        [(2, 8192, 1808)],
        [(4, 0, 50)],  # an empty blob needs no bytes
    ]
    assert [(s.offset, s.length) for s in spans[:3]] == [(4096, 100), (8192, 100), (12288, 4096)]
    wide = plan_spans(layout, 1 << 20)
    assert MAX_GAP < 200_704 - (12288 + 10_000)  # blob 4 is too far to share a request
    assert [[p.blob for p in s.pieces] for s in wide] == [[0, 1, 2], [4]]
    assert (wide[0].offset, wide[0].length) == (4096, 12288 + 10_000 - 4096)  # the gaps are read too


class Ranged(ReadHandle):
    """A local file read the way an object store is: one ``read_pieces`` call per request,
    counted. ``gather``: the first two requests wait for each other (proof that they were in
    flight at once; a reader that sends one at a time fails with ``BrokenBarrierError``)."""

    def __init__(
        self, inner: ReadHandle, request_bytes: int, in_flight: int = 4, gather: bool = False
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.reads = ParallelReads(request_bytes, in_flight)
        self.requests: list[tuple[int, int]] = []
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(2, timeout=10) if gather else None

    @property
    def parallel_reads(self) -> ParallelReads:
        return self.reads

    def read_at(self, offset: int, buffer: memoryview) -> int:
        return self.inner.read_at(offset, buffer)

    def read_pieces(self, offset: int, length: int, pieces: Sequence[tuple[int, memoryview]]) -> int:
        with self.lock:
            self.requests.append((offset, length))
            wait = self.barrier is not None and len(self.requests) <= 2
        if wait and self.barrier is not None:
            self.barrier.wait()
        data = bytearray(length)
        got = self.inner.read_at(offset, memoryview(data))
        for at, view in pieces:
            chunk = memoryview(data)[at - offset : at - offset + len(view)][: max(got - (at - offset), 0)]
            view[: len(chunk)] = chunk
        return got

    def close(self) -> None:
        self.inner.close()


def ranged_file(path: Path, request_bytes: int, *, gather: bool = False) -> tuple[Ranged, fmt.Layout]:
    handle = Ranged(PosixStorage(path.parent).open(path.name), request_bytes, gather=gather)
    return handle, reader_module.read_layout(handle, str(path))


def wide_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    sizes = [3, 5000, 1, 0, 70_000, 12, 4096, 9000]
    return {f"t{i}": torch.randn(n, generator=generator) for i, n in enumerate(sizes)}


@pytest.mark.parametrize("request_bytes", [4096, 64 << 10, 16 << 20])
def test_ranged_reads_fill_every_tensor_and_targets(tmp_path: Path, request_bytes: int) -> None:
    state = wide_state()
    path = asyncckpt.save(tmp_path / checkpoint_name(1), state, step=1)
    handle, layout = ranged_file(path, request_bytes, gather=request_bytes == 4096)
    target = torch.zeros(70_000)
    blob = next(t.blob for t in layout.tensors if t.key == "t4")
    tensors = reader_module.read_tensors(
        handle, layout, where="w", checksums=True, device=torch.device("cpu"), targets={blob: target}
    )
    loaded = dict(zip([t.key for t in layout.tensors], tensors, strict=True))
    assert loaded["t4"] is target
    assert_same_state(loaded, state)
    assert len(handle.requests) == len(plan_spans(layout, request_bytes))
    assert all(length <= request_bytes for _, length in handle.requests)


def test_ranged_reads_check_and_restore_through_the_public_api(tmp_path: Path) -> None:
    state = make_state(3)
    path = asyncckpt.save(tmp_path / checkpoint_name(3), state, step=3)
    handle, layout = ranged_file(path, 4096)
    reader_module.check_blobs(handle, layout, where="w")
    assert handle.requests


@pytest.mark.parametrize("checking", [False, True], ids=["read", "check"])
def test_ranged_reads_report_the_lowest_broken_blob(tmp_path: Path, checking: bool) -> None:
    path = asyncckpt.save(tmp_path / checkpoint_name(1), wide_state(), step=1)
    flip_blob_byte(path, "t7", at=9)
    flip_blob_byte(path, "t4", at=70_000 * 4 - 3)  # in the last part of a blob split in several
    for _ in range(3):
        handle, layout = ranged_file(path, 4096)
        with pytest.raises(CorruptedCheckpointError) as caught:
            if checking:
                reader_module.check_blobs(handle, layout, where="w")
            else:
                reader_module.read_tensors(
                    handle, layout, where="w", checksums=True, device=torch.device("cpu")
                )
        assert caught.value.reason.startswith("checksum mismatch in t4 ")
        assert caught.value.path == "w" and caught.value.key == "t4"


def test_ranged_reads_without_checksums_do_not_check(tmp_path: Path) -> None:
    path = asyncckpt.save(tmp_path / checkpoint_name(1), wide_state(), step=1)
    flip_blob_byte(path, "t1", at=1)
    handle, layout = ranged_file(path, 4096)
    reader_module.read_tensors(handle, layout, where="w", checksums=False, device=torch.device("cpu"))


def test_ranged_reads_report_a_truncated_file(tmp_path: Path) -> None:
    path = asyncckpt.save(tmp_path / checkpoint_name(1), wide_state(), step=1)
    handle, layout = ranged_file(path, 4096)
    blob = layout.blobs[next(t.blob for t in layout.tensors if t.key == "t4")]
    truncate(path, blob.offset + 5000)  # after the layout was read: as if the object shrank
    handle.size = blob.offset + 5000
    with pytest.raises(CorruptedCheckpointError) as caught:
        reader_module.read_tensors(handle, layout, where="w", checksums=True, device=torch.device("cpu"))
    assert caught.value.reason.startswith("truncated inside t4 at offset ")
    assert caught.value.offset == blob.offset + 5000


def test_piece_is_plain_data() -> None:
    assert Piece(1, 2, 3) == Piece(1, 2, 3)
