"""Local reads in runs: many small blobs per ``read_pieces`` call, their CRC32Cs in one C-level
loop, big blobs in parts; the lowest broken blob reported whatever the threads' timing."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

# The load side's test helpers (tests/loading/helpers.py; tests/ is on sys.path).
from loading.helpers import assert_same_state, flip_blob_byte, truncate  # noqa: I001

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt import reader as reader_module
from asyncckpt import runs as runs_module
from asyncckpt.catalog import checkpoint_name
from asyncckpt.errors import CorruptedCheckpointError
from asyncckpt.runs import plan_runs
from asyncckpt.storage import PosixStorage, ReadHandle

CPU = torch.device("cpu")
PROBE = runs_module.RunReads.cached  # the real page-cache probe (the fixture below replaces it)


@pytest.fixture(autouse=True, params=["threads", "in_order"])
def reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: the file taken as in the page cache (runs on several threads) and as
    not (runs in file order, each checksummed on a second thread while the next is read)."""
    cached = request.param == "threads"
    monkeypatch.setattr(runs_module.RunReads, "cached", lambda self: cached)
    return str(request.param)


def blobs(*spans: tuple[int, int]) -> tuple[fmt.BlobEntry, ...]:
    return tuple(fmt.BlobEntry(offset, nbytes, 0) for offset, nbytes in spans)


def test_runs_hold_consecutive_blobs_up_to_the_run_size_and_big_blobs_go_in_parts() -> None:
    layout = blobs((4096, 100), (8192, 100), (12288, 10_000), (28672, 0), (28672, 50), (32768, 10))
    assert plan_runs(layout, 4096) == [
        (0, 1, -1),
        (1, 2, -1),
        (2, 3, 0),
        (2, 3, 4096),
        (2, 3, 8192),
        (3, 5, -1),
        (5, 6, -1),  # 4106 bytes from blob 3 on: a run more
    ]
    assert plan_runs(layout, 8192) == [(0, 2, -1), (2, 3, 0), (2, 3, 8192), (3, 6, -1)]
    assert plan_runs(layout, 1 << 20) == [(0, 6, -1)]
    assert plan_runs((), 4096) == []


class Counted(ReadHandle):
    """A local file whose reads are counted (and may be made to see a shorter file)."""

    def __init__(self, inner: ReadHandle) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.calls: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def read_at(self, offset: int, buffer: memoryview) -> int:
        with self.lock:
            self.calls.append(("read_at", len(buffer)))
        return self.inner.read_at(offset, buffer)

    def read_pieces(self, offset: int, length: int, pieces: Sequence[tuple[int, memoryview]]) -> int:
        with self.lock:
            self.calls.append(("read_pieces", len(pieces)))
        return self.inner.read_pieces(offset, length, pieces)

    def close(self) -> None:
        self.inner.close()


def counted(path: Path) -> tuple[Counted, fmt.Layout]:
    handle = Counted(PosixStorage(path.parent).open(path.name))
    return handle, reader_module.read_layout(handle, str(path))


def many_small(count: int = 2000) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {f"t{i}": torch.randn(i % 7 + 1, generator=generator) for i in range(count)}


def test_many_small_blobs_are_read_with_one_call_per_run(tmp_path: Path) -> None:
    state = many_small()
    path = asyncckpt.save(tmp_path / checkpoint_name(1), state, step=1)
    handle, layout = counted(path)
    handle.calls.clear()
    tensors = reader_module.read_tensors(handle, layout, where="w", checksums=True, device=CPU)
    assert_same_state(dict(zip([t.key for t in layout.tensors], tensors, strict=True)), state)
    runs = plan_runs(layout.blobs, runs_module.RUN_BYTES)
    assert len(runs) == 1  # 2,000 blobs of 4 KiB each: one run
    per_slice = runs_module.CHECK_BYTES // 4096  # read (and checked) a slice of the run at a time
    assert handle.calls == [("read_pieces", min(per_slice, 2000 - i)) for i in range(0, 2000, per_slice)]
    handle.calls.clear()
    reader_module.check_blobs(handle, layout, where="w")
    blobs = layout.blobs  # checked alike: a slice of the run at a time, through the scratch buffer
    slices = [(i, min(i + per_slice, 2000)) for i in range(0, 2000, per_slice)]
    assert blobs[0].offset == fmt.DATA_OFFSET
    assert handle.calls == [
        ("read_at", blobs[b - 1].offset + blobs[b - 1].nbytes - blobs[a].offset) for a, b in slices
    ]


def test_loaded_tensors_have_memory_of_their_own(tmp_path: Path) -> None:
    """Tensors are never views of one shared buffer: a later save (or torch.save) of some of them
    holds their own bytes only, and dropping some frees their memory."""
    base = torch.arange(12.0)
    state = {"a": torch.ones(3), "b": torch.zeros(5, dtype=torch.int64), "view": base[2:6], "whole": base}
    loaded = asyncckpt.load(asyncckpt.save(tmp_path / "x.ckpt", state, step=1)).state
    storages = {name: t.untyped_storage().data_ptr() for name, t in loaded.items()}
    assert storages["view"] == storages["whole"]  # saved as views of one storage: so loaded
    assert len({storages["a"], storages["b"], storages["whole"]}) == 3
    assert loaded["a"].untyped_storage().nbytes() == 12
    assert loaded["whole"].untyped_storage().nbytes() == 48


@pytest.fixture
def small_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of at most 16 KiB and several reading threads, even for a small file."""
    monkeypatch.setattr(runs_module, "RUN_BYTES", 16 << 10)
    monkeypatch.setattr(reader_module, "PARALLEL_READ_MIN_BYTES", 0)
    monkeypatch.setattr(reader_module.os, "cpu_count", lambda: 4)


def wide_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    sizes = [3, 5000, 1, 0, 70_000, 12, 4096, 9000]
    return {f"t{i}": torch.randn(n, generator=generator) for i, n in enumerate(sizes)}


@pytest.mark.usefixtures("small_runs")
def test_big_blobs_are_read_in_parts_and_every_value_arrives(tmp_path: Path) -> None:
    state = wide_state()
    path = asyncckpt.save(tmp_path / checkpoint_name(1), state, step=1)
    handle, layout = counted(path)
    handle.calls.clear()
    tensors = reader_module.read_tensors(handle, layout, where="w", checksums=True, device=CPU)
    assert_same_state(dict(zip([t.key for t in layout.tensors], tensors, strict=True)), state)
    run = 16 << 10
    parts = sorted(n for kind, n in handle.calls if kind == "read_at")
    big = [b.nbytes for b in layout.blobs if b.nbytes > run]
    assert len(big) == 3  # t1, t4, t7: each read in parts of at most 16 KiB
    assert parts == sorted(min(run, n - start) for n in big for start in range(0, n, run))


@pytest.mark.usefixtures("small_runs")
@pytest.mark.parametrize("slices", [1 << 20, 4 << 10], ids=["whole-parts", "sliced-parts"])
@pytest.mark.parametrize("checking", [False, True], ids=["read", "check"])
def test_the_lowest_broken_blob_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checking: bool, slices: int
) -> None:
    monkeypatch.setattr(runs_module, "CHECK_BYTES", slices)
    path = asyncckpt.save(tmp_path / checkpoint_name(1), wide_state(), step=1)
    flip_blob_byte(path, "t7", at=9)
    flip_blob_byte(path, "t5", at=1)  # a small blob sharing a run with others
    flip_blob_byte(path, "t4", at=70_000 * 4 - 3)  # in the last part of a big blob
    for _ in range(3):
        handle, layout = counted(path)
        with pytest.raises(CorruptedCheckpointError) as caught:
            if checking:
                reader_module.check_blobs(handle, layout, where="w")
            else:
                reader_module.read_tensors(handle, layout, where="w", checksums=True, device=CPU)
        assert caught.value.reason.startswith("checksum mismatch in t4 ")
        assert (caught.value.path, caught.value.key, caught.value.blob) == ("w", "t4", 4)


def test_a_warm_read_checks_each_slice_as_it_lands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small blobs are read a slice of the run at a time, a big blob in slices whose CRC32C
    carries on from one to the next: each is checked while it is still in the CPU's cache."""
    monkeypatch.setattr(runs_module, "CHECK_BYTES", 8 << 10)
    state = wide_state()
    path = asyncckpt.save(tmp_path / checkpoint_name(1), state, step=1)
    handle, layout = counted(path)
    handle.calls.clear()
    tensors = reader_module.read_tensors(handle, layout, where="w", checksums=True, device=CPU)
    assert_same_state(dict(zip([t.key for t in layout.tensors], tensors, strict=True)), state)
    slices = sorted(n for kind, n in handle.calls if kind == "read_at")
    big = [b.nbytes for b in layout.blobs if b.nbytes > 8 << 10]
    assert len(big) == 4  # t1, t4, t6, t7
    assert slices == sorted(min(8 << 10, n - start) for n in big for start in range(0, n, 8 << 10))
    assert sum(n for kind, n in handle.calls if kind == "read_pieces") == len(layout.blobs) - len(big)
    handle.calls.clear()
    reader_module.read_tensors(handle, layout, where="w", checksums=False, device=CPU)
    assert len(handle.calls) == 1  # unchecked: the one run, as before


def test_a_mismatch_in_a_later_slice_of_a_big_blob_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runs_module, "CHECK_BYTES", 8 << 10)
    path = asyncckpt.save(tmp_path / checkpoint_name(1), wide_state(), step=1)
    flip_blob_byte(path, "t4", at=50_000)  # the 7th slice of 8 KiB
    handle, layout = counted(path)
    with pytest.raises(CorruptedCheckpointError) as caught:
        reader_module.read_tensors(handle, layout, where="w", checksums=True, device=CPU)
    assert caught.value.reason.startswith("checksum mismatch in t4 ")
    assert (caught.value.key, caught.value.blob) == ("t4", 4)


def test_a_mismatch_inside_a_run_names_its_blob(tmp_path: Path) -> None:
    state = many_small(50)
    path = asyncckpt.save(tmp_path / checkpoint_name(1), state, step=1)
    flip_blob_byte(path, "t31", at=2)
    flip_blob_byte(path, "t40", at=0)
    handle, layout = counted(path)
    with pytest.raises(CorruptedCheckpointError) as caught:
        reader_module.read_tensors(handle, layout, where="w", checksums=True, device=CPU)
    assert (caught.value.key, caught.value.blob) == ("t31", 31)
    assert caught.value.offset == layout.blobs[31].offset
    reader_module.read_tensors(handle, layout, where="w", checksums=False, device=CPU)  # not checked


@pytest.mark.parametrize("big", [False, True], ids=["run", "parts"])
def test_a_file_that_shrank_after_its_header_was_read_is_truncated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, big: bool
) -> None:
    if big:
        monkeypatch.setattr(runs_module, "RUN_BYTES", 16 << 10)
    path = asyncckpt.save(tmp_path / checkpoint_name(1), wide_state(), step=1)
    handle, layout = counted(path)
    blob = layout.blobs[4]
    truncate(path, blob.offset + 5000)
    for check in (False, True):
        with pytest.raises(CorruptedCheckpointError) as caught:
            if check:
                reader_module.check_blobs(handle, layout, where="w")
            else:
                reader_module.read_tensors(handle, layout, where="w", checksums=True, device=CPU)
        assert caught.value.reason.startswith("truncated inside t4 at offset ")
        assert (caught.value.offset, caught.value.blob) == (blob.offset + 5000, 4)


@pytest.mark.usefixtures("small_runs")
def test_a_file_not_in_the_page_cache_is_read_in_file_order(tmp_path: Path, reading: str) -> None:
    path = asyncckpt.save(tmp_path / checkpoint_name(1), wide_state(), step=1)
    handle = PosixStorage(path.parent).open(path.name)
    layout = reader_module.read_layout(handle, str(path))
    offsets: list[int] = []
    real_at, real_pieces = handle.read_at, handle.read_pieces

    def read_at(offset: int, buffer: memoryview) -> int:
        offsets.append(offset)
        return real_at(offset, buffer)

    def read_pieces(offset: int, length: int, pieces: Sequence[tuple[int, memoryview]]) -> int:
        offsets.append(offset)
        return real_pieces(offset, length, pieces)

    handle.read_at, handle.read_pieces = read_at, read_pieces  # type: ignore[method-assign]
    tensors = reader_module.read_tensors(handle, layout, where="w", checksums=True, device=CPU)
    assert_same_state(dict(zip([t.key for t in layout.tensors], tensors, strict=True)), wide_state())
    runs = plan_runs(layout.blobs, runs_module.RUN_BYTES)
    assert len(offsets) == len(runs) > 2
    if reading == "in_order":
        assert offsets == sorted(offsets)
    handle.close()


def test_the_page_cache_probe_tells_a_dropped_file_from_a_read_one(tmp_path: Path) -> None:
    import os

    if not hasattr(os, "RWF_NOWAIT") or not hasattr(os, "posix_fadvise"):
        pytest.skip("no RWF_NOWAIT or posix_fadvise here")
    path = asyncckpt.save(tmp_path / checkpoint_name(1), wide_state(), step=1)  # fsynced: clean pages
    handle = PosixStorage(path.parent).open(path.name)
    layout = reader_module.read_layout(handle, str(path))
    assert_probe_sees_the_drop(handle, layout)
    reader_module.read_tensors(handle, layout, where="w", checksums=True, device=CPU)
    assert PROBE(runs_module.RunReads(handle, layout, "w")) is True
    handle.close()


def assert_probe_sees_the_drop(handle: Any, layout: Any) -> None:
    """Drop the file's pages until the probe says it is not cached. The kernel may keep a page
    one drop cannot take at that instant (one a readahead is still reading, one the memory
    manager holds aside), so the drop is repeated, a bounded number of times."""
    import os

    for _ in range(1000):
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if PROBE(runs_module.RunReads(handle, layout, "w")) is False:
            return
    pytest.fail("the probe took a file dropped from the page cache 1000 times for a cached one")


def _cachestat_pages(fd: int) -> int | None:
    """The file's pages in the page cache, by cachestat(2) asked here on its own (the probe is
    judged by other means than its own); None where the kernel cannot say."""
    import ctypes
    import os
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"):
        return None
    span = (ctypes.c_uint64 * 2)(0, os.fstat(fd).st_size)
    found = (ctypes.c_uint64 * 5)()
    if ctypes.CDLL(None, use_errno=True).syscall(451, fd, span, found, 0) != 0:
        return None
    return int(found[0])


def test_the_page_cache_probe_reads_nothing_of_a_dropped_file(tmp_path: Path) -> None:
    """A probe that read (RWF_NOWAIT starts readahead before it fails) brought the file's pages
    in, and a cold file could pass for a cached one once that readahead landed."""
    import os

    path = asyncckpt.save(tmp_path / checkpoint_name(1), wide_state(), step=1)  # fsynced: clean pages
    handle = PosixStorage(path.parent).open(path.name)
    layout = reader_module.read_layout(handle, str(path))
    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if _cachestat_pages(handle.fileno()) != 0:
        handle.close()
        pytest.skip("no cachestat(2) here, or the file's pages cannot be dropped (tmpfs)")
    for _ in range(3):
        assert PROBE(runs_module.RunReads(handle, layout, "w")) is False
    assert _cachestat_pages(handle.fileno()) == 0
    handle.close()


def test_a_file_mostly_out_of_the_page_cache_is_read_in_file_order(tmp_path: Path) -> None:
    import os

    path = asyncckpt.save(tmp_path / checkpoint_name(1), wide_state(), step=1)
    handle = PosixStorage(path.parent).open(path.name)
    layout = reader_module.read_layout(handle, str(path))
    if _cachestat_pages(handle.fileno()) is None:
        handle.close()
        pytest.skip("no cachestat(2) here")
    reads = runs_module.RunReads(handle, layout, "w")
    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    handle.read_at(layout.blobs[0].offset, memoryview(bytearray(4096)))  # its first page only
    pages = _cachestat_pages(handle.fileno()) or 0
    if pages == 0 or pages * 4096 > path.stat().st_size // 2:
        handle.close()
        pytest.skip("the file's pages cannot be dropped here (tmpfs), or readahead took most of it")
    assert PROBE(reads) is False  # the first page is cached, as a header read leaves it
    reader_module.read_tensors(handle, layout, where="w", checksums=True, device=CPU)
    assert PROBE(reads) is True
    handle.close()


def test_without_cachestat_the_probe_reads_one_byte_at_a_few_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    if not hasattr(os, "RWF_NOWAIT") or not hasattr(os, "posix_fadvise"):
        pytest.skip("no RWF_NOWAIT or posix_fadvise here")
    monkeypatch.setattr(runs_module, "cached_share", lambda fd, begin, end: None)
    path = asyncckpt.save(tmp_path / checkpoint_name(1), wide_state(), step=1)
    handle = PosixStorage(path.parent).open(path.name)
    layout = reader_module.read_layout(handle, str(path))
    reader_module.read_tensors(handle, layout, where="w", checksums=True, device=CPU)
    assert PROBE(runs_module.RunReads(handle, layout, "w")) is True
    assert_probe_sees_the_drop(handle, layout)
    handle.close()
