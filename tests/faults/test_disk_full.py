"""Disk full: ENOSPC on write or on fsync, injected at the OS-call boundary and on a real tmpfs.

The failure reaches the trainer as ``CheckpointWriteError`` at its next call, training goes on,
older checkpoints stay intact byte for byte, the partial temp file is gone, and the first save
after space is freed succeeds.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import asyncckpt
from asyncckpt import AsyncCheckpointer, CheckpointWriteError
from asyncckpt.catalog import checkpoint_name
from asyncckpt.testing import FaultyOps, deterministic_state, states_equal, temp_files


def state(step: int) -> dict[str, object]:
    return deterministic_state(step, tensors=4, numel=2048)


def snapshot_files(directory: Path) -> dict[str, bytes]:
    return {c.path.name: c.path.read_bytes() for c in asyncckpt.list_checkpoints(directory)}


def events(directory: Path) -> list[dict[str, object]]:
    found = []
    for line in (directory / "events.jsonl").read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by the full disk itself
            continue
    return found


# The writer writes this state in three calls: the prelude's page, the staged blobs (32 KiB, one
# piece) and the header with the trailer.
@pytest.mark.parametrize(
    ("op", "nth"),
    [("open_exclusive", 1), ("write", 1), ("write", 2), ("write", 3), ("fsync", 1), ("rename", 1)],
    ids=["create", "write-prelude", "write-blob", "write-late", "fsync", "rename"],
)
def test_enospc_fails_the_save_and_the_next_one_after_space_is_freed_succeeds(
    tmp_path: Path, op: str, nth: int, faults: Counter[str]
) -> None:
    disk = FaultyOps(op, err=errno.ENOSPC, nth=nth, sticky=True)
    disk.enabled = False
    with AsyncCheckpointer(tmp_path, keep_last=3, ops=disk) as ckpt:
        for step in (1, 2):
            ckpt.save(step, state(step)).result(timeout=30)
        before = snapshot_files(tmp_path)
        disk.enabled = True  # the disk is full from the nth call on
        first = ckpt.save(3, state(3))
        assert first.wait(timeout=30)
        with pytest.raises(CheckpointWriteError, match="No space left") as info:
            ckpt.save(4, state(4))  # the trainer hears of it at its next call
        assert info.value.step == 3
        assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
        still_full = ckpt.save(5, state(5))  # training goes on; this one fails too
        with pytest.raises(CheckpointWriteError, match="No space left"):
            still_full.result(timeout=30)
        assert snapshot_files(tmp_path) == before
        assert temp_files(tmp_path) == []
        disk.enabled = False  # space freed
        assert ckpt.save(6, state(6)).result(timeout=30) == tmp_path / checkpoint_name(6)
        stats = ckpt.stats()
    faults[f"disk full: ENOSPC injected in {op}"] += disk.failures
    assert disk.failures >= 2 and (stats.committed, stats.failed) == (3, 2)
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [1, 2, 6]
    assert all(before[name] == (tmp_path / name).read_bytes() for name in before)
    assert states_equal(asyncckpt.load(tmp_path / checkpoint_name(6)).state, state(6))
    failed = [e["step"] for e in events(tmp_path) if e["event"] == "checkpoint.save.failed"]
    assert failed == [3, 5]


def test_enospc_in_the_synchronous_save_leaves_the_old_file(tmp_path: Path, faults: Counter[str]) -> None:
    path = tmp_path / checkpoint_name(1)
    asyncckpt.save(path, state(1), step=1)
    before = path.read_bytes()
    disk = FaultyOps("write", err=errno.ENOSPC, nth=2)
    with pytest.raises(CheckpointWriteError, match="No space left"):
        asyncckpt.save(path, state(2), step=1, ops=disk)
    faults["disk full: ENOSPC injected in write"] += disk.failures
    assert path.read_bytes() == before and temp_files(tmp_path) == []


# --------------------------------------------------------------------------- a real full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, where the machine lets us mount one (root, CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True, timeout=30)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; return the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"x" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def end_events_on_a_page_boundary(log: Path) -> None:
    """Pad the event log so that its next line needs a new page, which a full disk refuses."""
    pad = -log.stat().st_size % 4096
    with open(log, "a", encoding="utf-8") as file:
        file.write(" " * (pad - 1) + "\n" if pad else "")


def test_a_real_full_disk_fails_the_save_not_the_trainer(small_disk: Path, faults: Counter[str]) -> None:
    # close_timeout: should the writer die, leaving the context fails instead of hanging.
    with AsyncCheckpointer(small_disk, keep_last=2, close_timeout=60) as ckpt:
        ckpt.save(1, state(1)).result(timeout=30)
        before = snapshot_files(small_disk)
        end_events_on_a_page_boundary(small_disk / "events.jsonl")
        filler = fill(small_disk)
        failed = 0
        for step in (2, 3):
            handle = ckpt.save(step, state(step))  # the event log cannot grow either: no error here
            with pytest.raises(CheckpointWriteError, match="No space left") as info:
                handle.result(timeout=30)
            assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
            failed += 1
        assert snapshot_files(small_disk) == before and temp_files(small_disk) == []
        filler.unlink()
        assert ckpt.save(4, state(4)).result(timeout=30) == small_disk / checkpoint_name(4)
    faults["disk full: real ENOSPC on a 1 MiB tmpfs"] += failed
    assert [c.step for c in asyncckpt.list_checkpoints(small_disk)] == [1, 4]
    assert states_equal(asyncckpt.load(small_disk / checkpoint_name(4)).state, state(4))
    assert states_equal(asyncckpt.load(small_disk / checkpoint_name(1)).state, state(1))
