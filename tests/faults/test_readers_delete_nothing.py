"""Read-only use of a run directory removes and changes nothing (issue 17, item 7).

An evaluator that opens ``AsyncCheckpointer(dir)`` only to ``restore()`` must not delete a
trainer's in-flight temp file (the trainer's save would fail), must not remove abandoned temp
files either (that is the first save's job), and must not prune with its ``keep_last``: nothing
is pruned until a process commits a save of its own.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import asyncckpt
from asyncckpt import AsyncCheckpointer
from asyncckpt.catalog import checkpoint_name
from asyncckpt.events import EVENTS_FILE
from asyncckpt.storage.temps import writer_id
from asyncckpt.testing import GatedOps, deterministic_state, temp_files

pytestmark = pytest.mark.timeout(180)

READER = """
import sys
from asyncckpt import AsyncCheckpointer
with AsyncCheckpointer(sys.argv[1], keep_last=1) as ckpt:
    result = ckpt.restore({})
print(result.step)
"""


def files_of(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every file but the event log: name → (size, mtime_ns, sha256)."""
    found = {}
    for path in sorted(directory.iterdir()):
        if path.name != EVENTS_FILE:
            info = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[path.name] = (info.st_size, info.st_mtime_ns, digest)
    return found


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def plant_abandoned_temps(directory: Path) -> list[Path]:
    """A temp file of an older release (no owner in its name) and one of a writer that died."""
    host = writer_id().rpartition("-")[0]
    planted = [
        directory / f".{checkpoint_name(2)}.tmp-deadbeef",
        directory / f".{checkpoint_name(3)}.tmp-{host}-{dead_pid()}-0123abcd",
    ]
    for path in planted:
        path.write_bytes(b"torn")
    return planted


def test_a_restoring_process_deletes_nothing_while_a_trainer_writes(
    tmp_path: Path, faults: Counter[str]
) -> None:
    for step in (1, 2, 3):
        asyncckpt.save(tmp_path / checkpoint_name(step), deterministic_state(step), step=step)
    ops = GatedOps()
    with AsyncCheckpointer(tmp_path, keep_last=1, ops=ops) as trainer:
        try:
            handle = trainer.save(4, deterministic_state(4))
            assert ops.entered.wait(30)  # the trainer's temp file is in flight
            planted = plant_abandoned_temps(tmp_path)
            in_flight = [p for p in temp_files(tmp_path) if p not in planted]
            assert len(in_flight) == 1
            before = files_of(tmp_path)
            reader = subprocess.run(
                [sys.executable, "-c", READER, str(tmp_path)],
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
            assert reader.returncode == 0, reader.stderr
            assert reader.stdout.split() == ["3"]
            assert files_of(tmp_path) == before  # nothing removed, nothing changed
        finally:
            ops.release()
        assert handle.result(timeout=60) == tmp_path / checkpoint_name(4)
    faults["readers: a restoring process beside a trainer with a write in flight"] += 1
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [4]  # the trainer's retention


def test_an_evaluator_with_keep_last_prunes_and_removes_nothing(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        asyncckpt.save(tmp_path / checkpoint_name(step), deterministic_state(step), step=step)
    plant_abandoned_temps(tmp_path)
    before = files_of(tmp_path)
    with AsyncCheckpointer(tmp_path, keep_last=1) as ckpt:
        result = ckpt.restore({})
        ckpt.flush()
    assert result is not None and result.step == 3
    assert files_of(tmp_path) == before


def test_the_first_save_removes_only_abandoned_temp_files(tmp_path: Path) -> None:
    planted = plant_abandoned_temps(tmp_path)
    live = tmp_path / f".{checkpoint_name(5)}.tmp-{writer_id().rpartition('-')[0]}-1-0123abcd"
    live.write_bytes(b"pid 1 is alive: its writer owns it")
    with AsyncCheckpointer(tmp_path) as ckpt:
        assert all(p.exists() for p in planted)
        ckpt.save(1, deterministic_state(1)).result(timeout=30)
        assert not any(p.exists() for p in planted)
    assert live.exists()
