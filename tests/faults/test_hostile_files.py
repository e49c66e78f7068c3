"""Hostile files in a checkpoint directory: nothing in them runs, nothing outside is touched.

A pickle whose ``__reduce__`` runs code, named ``.ckpt`` or ``.pt``, runs nothing through
``asyncckpt.load`` or ``load_latest``; symlinks named like checkpoints or temp files are never
followed by retention, start-up clean-up or the loader; FIFOs, directories and huge sparse files
named like checkpoints neither block, nor crash, nor make the loader allocate their size.
"""

from __future__ import annotations

import io
import os
import pickle
import threading
import tracemalloc
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt import AsyncCheckpointer, CorruptedCheckpointError
from asyncckpt.catalog import checkpoint_name
from asyncckpt.loading import LoadResult, load_latest
from asyncckpt.testing import deterministic_state, states_equal


def load_within_measuring_memory(directory: Path) -> tuple[LoadResult, int]:
    """``load_within(directory, 60)`` and the peak of Python memory it allocated."""
    tracemalloc.start()
    try:
        result = load_within(directory, 60)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def quiet(*_: object, **__: object) -> None:
    """A ``log`` for load_latest that drops the summary."""


class RunsShell:
    """Unpickling this runs a shell command (``os.system``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class RunsPython:
    """Unpickling this runs Python code (``exec``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def raw_pickle(payload: Any) -> bytes:
    return pickle.dumps(payload, protocol=2)


def torch_zip(payload: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


PAYLOADS: dict[str, Callable[[Path], Any]] = {
    "os.system": RunsShell,
    "exec": RunsPython,
    "os.system inside a state dict": lambda marker: {"step": 9, "model": {"w": RunsShell(marker)}},
}
ENCODINGS: dict[str, Callable[[Any], bytes]] = {"raw pickle": raw_pickle, "torch.save zip": torch_zip}
NAMES = [checkpoint_name(9), "model-9.pt", "step_9.pth"]


def hostile_cases() -> list[Any]:
    return [
        pytest.param(p, e, n, id=f"{p}-{e}-{n}")
        for p in PAYLOADS
        for e in ENCODINGS
        for n in NAMES
        if not (e == "raw pickle" and n.endswith(".pth"))  # keep the matrix small
    ]


@pytest.mark.parametrize(("payload", "encoding", "name"), hostile_cases())
def test_a_code_running_pickle_runs_nothing(
    tmp_path: Path, payload: str, encoding: str, name: str, faults: Counter[str]
) -> None:
    marker = tmp_path / "pwned"
    data = ENCODINGS[encoding](PAYLOADS[payload](marker))
    if encoding == "raw pickle":  # the payload is live: plain unpickling would run it
        pickle.loads(data)
        assert marker.exists()
        marker.unlink()
    run = tmp_path / "run"
    run.mkdir()
    asyncckpt.save(run / checkpoint_name(5), deterministic_state(5), step=5)
    hostile = run / name
    hostile.write_bytes(data)
    with pytest.raises(CorruptedCheckpointError):
        asyncckpt.load(hostile)
    result = load_latest(run, log=quiet)
    faults["hostile files: code-running pickles"] += 1
    assert not marker.exists(), "the pickle ran code"
    assert result.step == 5 and states_equal(result.state, deterministic_state(5))
    assert [Path(d.path).name for d in result.diagnostics] == [name]


# --------------------------------------------------------------------------- links and odd files


def outside_checkpoint(tmp_path: Path, step: int) -> tuple[Path, bytes]:
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    path = asyncckpt.save(outside / f"precious-{step}.ckpt", deterministic_state(step), step=step)
    return path, path.read_bytes()


def test_symlinks_named_like_checkpoints_are_not_followed(tmp_path: Path, faults: Counter[str]) -> None:
    old_target, old_bytes = outside_checkpoint(tmp_path, 1)
    new_target, new_bytes = outside_checkpoint(tmp_path, 99)
    run = tmp_path / "run"
    run.mkdir()
    (run / checkpoint_name(1)).symlink_to(old_target)  # older: retention would prune it
    (run / checkpoint_name(99)).symlink_to(new_target)  # newer: the loader would prefer it
    (run / checkpoint_name(50)).symlink_to(tmp_path / "outside", target_is_directory=True)
    with AsyncCheckpointer(run, keep_last=1) as ckpt:
        for step in (2, 3, 4):
            ckpt.save(step, deterministic_state(step)).result(timeout=30)
    faults["hostile files: symlinks named like checkpoints"] += 3
    assert old_target.read_bytes() == old_bytes and new_target.read_bytes() == new_bytes
    assert all((run / checkpoint_name(s)).is_symlink() for s in (1, 50, 99))
    assert [c.step for c in asyncckpt.list_checkpoints(run)] == [4]
    result = load_latest(run, log=quiet)
    assert result.step == 4 and result.path == run / checkpoint_name(4)


def test_a_symlink_named_like_a_temp_file_is_not_followed_at_start(
    tmp_path: Path, faults: Counter[str]
) -> None:
    target, before = outside_checkpoint(tmp_path, 1)
    run = tmp_path / "run"
    run.mkdir()
    link = run / f".{checkpoint_name(7)}.tmp-deadbeef"
    link.symlink_to(target)
    with AsyncCheckpointer(run) as ckpt:
        ckpt.save(8, deterministic_state(8)).result(timeout=30)
    faults["hostile files: symlinks named like temp files"] += 1
    assert target.read_bytes() == before and link.is_symlink()


def load_within(directory: Path, seconds: float) -> LoadResult:
    """load_latest in a thread, failing (not hanging) if it blocks, e.g. opening a FIFO."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(load_latest(directory, log=quiet))
        except BaseException as exc:  # handed to the test thread below
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"load_latest blocked for {seconds} s"
    if isinstance(box[0], BaseException):
        raise box[0]
    assert isinstance(box[0], LoadResult)
    return box[0]


def test_fifos_and_directories_named_like_checkpoints_are_skipped(
    tmp_path: Path, faults: Counter[str]
) -> None:
    asyncckpt.save(tmp_path / checkpoint_name(3), deterministic_state(3), step=3)
    os.mkfifo(tmp_path / checkpoint_name(10))
    os.mkfifo(tmp_path / "model-11.pt")
    os.mkfifo(tmp_path / f".{checkpoint_name(12)}.tmp-0000")
    (tmp_path / checkpoint_name(13)).mkdir()
    result = load_within(tmp_path, 60)
    assert result.step == 3 and not result.diagnostics
    with AsyncCheckpointer(tmp_path, keep_last=1) as ckpt:  # start-up clean-up and retention
        ckpt.save(4, deterministic_state(4)).result(timeout=30)
    faults["hostile files: FIFOs and directories named like checkpoints"] += 4
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [4]
    assert (tmp_path / checkpoint_name(10)).exists() and (tmp_path / checkpoint_name(13)).is_dir()


def test_a_huge_sparse_file_is_refused_without_reading_or_allocating_it(
    tmp_path: Path, faults: Counter[str]
) -> None:
    asyncckpt.save(tmp_path / checkpoint_name(3), deterministic_state(3), step=3)
    huge = tmp_path / checkpoint_name(70)
    with open(huge, "wb") as file:
        file.write(asyncckpt.save(tmp_path / "x.ckpt", {}, step=70).read_bytes()[:4096])
        file.truncate(1 << 40)  # 1 TiB, sparse
    (tmp_path / "x.ckpt").unlink()
    result, peak = load_within_measuring_memory(tmp_path)
    faults["hostile files: 1 TiB sparse file"] += 1
    assert result.step == 3 and [d.path for d in result.diagnostics] == [str(huge)]
    assert peak < 16 << 20


def test_a_zip_bomb_named_pt_is_refused(tmp_path: Path, faults: Counter[str]) -> None:
    asyncckpt.save(tmp_path / checkpoint_name(3), deterministic_state(3), step=3)
    bomb = tmp_path / "model-9.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02" + b"\x00" * (64 << 20))
    result, peak = load_within_measuring_memory(tmp_path)
    faults["hostile files: zip bomb named .pt"] += 1
    assert result.step == 3 and [d.path for d in result.diagnostics] == [str(bomb)]
    assert peak < 16 << 20
