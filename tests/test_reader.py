"""The one reader: blobs read by several threads (the lowest broken blob reported), straight into
targets, on CUDA through bounce buffers; legacy files through a handle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# The load side's test helpers (tests/loading/helpers.py; tests/ is on sys.path).
from loading.helpers import Recorder, assert_same_state, flip_blob_byte, make_state  # noqa: I001

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt import reader as reader_module
from asyncckpt.catalog import checkpoint_name
from asyncckpt.errors import CorruptedCheckpointError, NoValidCheckpointError
from asyncckpt.format import FileKind
from asyncckpt.loading import candidate as candidate_module
from asyncckpt.loading import load_latest, restore
from asyncckpt.loading import rollback as rollback_module
from asyncckpt.storage import PosixFile, PosixStorage, ReadHandle


@pytest.fixture
def parallel_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make even tiny files be read by several threads."""
    monkeypatch.setattr(reader_module, "PARALLEL_READ_MIN_BYTES", 0)
    monkeypatch.setattr(reader_module.os, "cpu_count", lambda: 4)


def deep_mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)])


@pytest.mark.usefixtures("parallel_reads")
def test_parallel_reads_load_every_blob(tmp_path: Path) -> None:
    saved = deep_mlp(0)
    asyncckpt.save(tmp_path / checkpoint_name(3), {"model": saved, "extra": make_state(3)}, step=3)
    loaded = load_latest(tmp_path)
    assert_same_state(loaded.state["model"], saved.state_dict())
    assert_same_state(loaded.state["extra"], make_state(3))
    fresh = deep_mlp(1)
    pointers = [p.data_ptr() for p in fresh.parameters()]
    restore(tmp_path, {"model": fresh})
    assert [p.data_ptr() for p in fresh.parameters()] == pointers
    assert_same_state(fresh.state_dict(), saved.state_dict())


@pytest.mark.usefixtures("parallel_reads")
def test_parallel_reads_report_the_lowest_broken_blob(tmp_path: Path) -> None:
    path = asyncckpt.save(tmp_path / checkpoint_name(3), {"model": deep_mlp(0)}, step=3)
    for key in ("model.4.weight", "model.1.bias", "model.5.bias"):
        flip_blob_byte(path, key, at=2)
    for _ in range(5):
        with pytest.raises(NoValidCheckpointError) as caught:
            restore(tmp_path, {"model": deep_mlp(1)}, log=Recorder())
        assert "checksum mismatch in model.1.bias " in caught.value.diagnostics[0].reason


# --------------------------------------------------------------------------- one file, one handle


def open_v1(path: Path) -> tuple[PosixFile, fmt.Layout]:
    handle = PosixStorage(path.parent).open(path.name)
    return handle, reader_module.read_layout(handle, str(path))


@pytest.mark.parametrize("threads", [1, 4])
def test_read_tensors_reads_straight_into_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    monkeypatch.setattr(reader_module, "PARALLEL_READ_MIN_BYTES", 0)
    monkeypatch.setattr(reader_module.os, "cpu_count", lambda: threads)
    state = make_state(7)
    path = asyncckpt.save(tmp_path / checkpoint_name(7), state, step=7)
    handle, layout = open_v1(path)
    with handle:
        index = next(i for i, t in enumerate(layout.tensors) if t.key == "model.layers.0.weight")
        target = torch.zeros(8, 4)
        tensors = reader_module.read_tensors(
            handle,
            layout,
            where=str(path),
            checksums=True,
            device=torch.device("cpu"),
            targets={layout.tensors[index].blob: target},
        )
    assert tensors[index] is target and torch.equal(target, state["model"]["layers.0.weight"])
    others = [t for i, t in enumerate(tensors) if i != index]
    assert all(t.data_ptr() != target.data_ptr() for t in others)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_cpu_targets_are_read_through_their_own_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """A CPU target's memory is viewed as it is (one call per blob), not first reshaped and
    re-viewed as a uint8 tensor: three torch calls per tensor that a restore of 10,000
    tensors paid on its one thread before the first byte was read."""

    def refused(target: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a CPU target went through a uint8 view")

    monkeypatch.setattr(reader_module, "_bytes_of", refused)
    state = {"a": (torch.randn(6, 5) * 100).to(dtype), "b": torch.arange(3)}
    path = asyncckpt.save(tmp_path / checkpoint_name(7), state, step=7)
    handle, layout = open_v1(path)
    with handle:
        index = next(i for i, t in enumerate(layout.tensors) if t.key == "a")
        target = torch.zeros(6, 5, dtype=dtype)
        tensors = reader_module.read_tensors(
            handle,
            layout,
            where=str(path),
            checksums=True,
            device=torch.device("cpu"),
            targets={layout.tensors[index].blob: target},
        )
    assert tensors[index] is target and torch.equal(target, state["a"])


def test_errors_carry_their_location_as_fields(tmp_path: Path) -> None:
    path = asyncckpt.save(tmp_path / checkpoint_name(7), make_state(7), step=7)
    offset = flip_blob_byte(path, "model.layers.1.weight")
    handle, layout = open_v1(path)
    with handle, pytest.raises(CorruptedCheckpointError) as caught:
        reader_module.check_blobs(handle, layout, where=str(path))
    error = caught.value
    assert error.path == str(path) and str(path) not in error.reason
    assert str(error) == f"{path}: {error.reason}"
    assert error.reason.startswith("checksum mismatch in model.layers.1.weight")
    assert f"at offset {offset - 5}" in error.reason
    handle, layout = open_v1(path)
    with handle, pytest.raises(CorruptedCheckpointError) as caught:
        reader_module.read_tensors(handle, layout, where="w", checksums=True, device=torch.device("cpu"))
    assert (caught.value.path, caught.value.reason) == ("w", error.reason)


@pytest.mark.parametrize(
    ("content", "reason", "offset"),
    [
        (b"", "truncated: 0 bytes, not a checkpoint", 0),
        (b"ASYNC", "truncated: 5 bytes, not a checkpoint", 5),
        (b"hello world", "not a checkpoint (bad magic b'hello wo')", 0),
    ],
)
def test_file_kind_refuses_what_is_no_checkpoint(
    tmp_path: Path, content: bytes, reason: str, offset: int
) -> None:
    (tmp_path / "x.ckpt").write_bytes(content)
    with PosixStorage(tmp_path).open("x.ckpt") as handle, pytest.raises(CorruptedCheckpointError) as caught:
        reader_module.file_kind(handle, "where")
    assert (caught.value.reason, caught.value.path, caught.value.offset) == (reason, "where", offset)


def test_file_kinds(tmp_path: Path) -> None:
    asyncckpt.save(tmp_path / "a.ckpt", {}, step=1)
    torch.save({}, tmp_path / "b.pt")
    torch.save({}, tmp_path / "c.pt", _use_new_zipfile_serialization=False)
    storage = PosixStorage(tmp_path)
    kinds = []
    for name in ("a.ckpt", "b.pt", "c.pt"):
        with storage.open(name) as handle:
            kinds.append(reader_module.file_kind(handle, name))
    assert kinds == [FileKind.V1, FileKind.ZIP_TORCH_SAVE, FileKind.PICKLE_TORCH_SAVE]


# --------------------------------------------------------------------------- storage without local files


class Unmapped(ReadHandle):
    """A handle with positional reads only (no local file): as an object store's would be."""

    def __init__(self, inner: ReadHandle) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size

    def read_at(self, offset: int, buffer: memoryview) -> int:
        return self.inner.read_at(offset, buffer)

    def close(self) -> None:
        self.inner.close()


class RemoteLike(PosixStorage):
    def open(self, name: str) -> Unmapped:  # type: ignore[override]
        return Unmapped(super().open(name))


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "pickle"])
def test_legacy_and_v1_files_load_through_a_handle_without_a_local_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zipped: bool
) -> None:
    write_steps = [asyncckpt.save(tmp_path / checkpoint_name(s), make_state(s), step=s) for s in (1, 2)]
    legacy = {**make_state(3), "step": 3}
    torch.save(legacy, tmp_path / "model.pt", _use_new_zipfile_serialization=zipped)
    monkeypatch.setattr(rollback_module, "open_storage", lambda _, **__: RemoteLike(tmp_path))
    result = load_latest(tmp_path, log=Recorder())
    assert (result.step, result.version) == (3, "0.x")
    assert_same_state(result.state, legacy)
    (tmp_path / "model.pt").unlink()
    result = load_latest(tmp_path, log=Recorder())
    assert (result.step, result.path) == (2, write_steps[1])
    assert_same_state(result.state, make_state(2))


def test_a_legacy_file_removed_after_it_was_opened_is_file_not_found(tmp_path: Path) -> None:
    torch.save({"step": 3}, tmp_path / "model.pt")
    with PosixStorage(tmp_path).open("model.pt") as handle:
        (tmp_path / "model.pt").unlink()  # torch.load reads the local path: the race retention makes
        with pytest.raises(FileNotFoundError):
            reader_module.read_legacy(handle, FileKind.ZIP_TORCH_SAVE, where="model.pt")


def test_a_refused_legacy_pickle_is_corrupted_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"\x80\x02garbage")
    with PosixStorage(tmp_path).open("model.pt") as handle, pytest.raises(CorruptedCheckpointError) as caught:
        reader_module.read_legacy(handle, FileKind.PICKLE_TORCH_SAVE, where="w")
    assert caught.value.path == "w"
    assert caught.value.reason.startswith("legacy torch.save file refused (weights_only=True): ")


# --------------------------------------------------------------------------- one reader for load and restore


def test_load_and_restore_read_through_the_same_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = asyncckpt.save(tmp_path / checkpoint_name(3), {"model": deep_mlp(0)}, step=3)
    calls: list[str] = []
    original = reader_module.read_tensors

    def counted(*args: Any, **kwargs: Any) -> list[torch.Tensor]:
        calls.append(kwargs["where"])
        return original(*args, **kwargs)

    monkeypatch.setattr(reader_module, "read_tensors", counted)
    monkeypatch.setattr(candidate_module, "read_tensors", counted)
    asyncckpt.load(path)
    restore(tmp_path, {"model": deep_mlp(1)}, log=Recorder())
    load_latest(tmp_path, log=Recorder())
    assert calls == [str(path)] * 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("parallel_reads")
def test_cuda_loads_go_through_pinned_bounce_buffers(tmp_path: Path) -> None:
    saved = deep_mlp(0)
    path = asyncckpt.save(tmp_path / checkpoint_name(3), {"model": saved, "extra": make_state(3)}, step=3)
    loaded = asyncckpt.load(path, map_location="cuda")
    latest = load_latest(tmp_path, map_location="cuda", log=Recorder())
    for state in (loaded.state, latest.state):
        assert all(t.is_cuda for t in state["model"].values())
        assert_same_state({k: v.cpu() for k, v in state["model"].items()}, saved.state_dict())
    flip_blob_byte(path, "model.3.weight", at=2)
    with pytest.raises(CorruptedCheckpointError, match="checksum mismatch in model.3.weight"):
        asyncckpt.load(path, map_location="cuda")


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 16 << 20), max_size=40),
    cpus=st.integers(1, 12),
)
def test_the_reading_thread_count_is_the_number_of_groups(sizes: list[int], cpus: int) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reader_module.os, "cpu_count", lambda: cpus)
        groups = reader_module._groups(sizes)
        assert reader_module._thread_count(sizes) == len(groups)
    assert sorted(i for group in groups for i in group) == list(range(len(sizes)))
    assert all(group == sorted(group) for group in groups)
