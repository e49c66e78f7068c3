"""FIFOs and symlinks planted under the names of the files asyncckpt writes or reads in a run
directory (``events.jsonl``, ``failed_checkpoints.txt``): nothing hangs, nothing is written
through a link. Each test is bounded by a timeout, so a hang fails instead of stalling the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import structlog

import asyncckpt
from asyncckpt import AsyncCheckpointer, load_latest
from asyncckpt.catalog import FAILED_LOG_NAME, checkpoint_name
from asyncckpt.errors import EXIT_FAILURE
from asyncckpt.events import EVENT_LOG_UNAVAILABLE, EVENTS_FILE
from asyncckpt.tail import LineFollower, read_lines
from asyncckpt.testing import deterministic_state, states_equal

pytestmark = pytest.mark.timeout(120)


def quiet(event: str, **fields: object) -> None:
    """A load's summary, dropped."""


def flip_blob_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8192] ^= 0xFF  # inside the last blob: the structure reads, a checksum does not match
    path.write_bytes(bytes(data))


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m asyncckpt`` in a child, killed (and the test failed) if it blocks."""
    return subprocess.run(
        [sys.executable, "-m", "asyncckpt", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )


def test_a_fifo_named_events_jsonl_neither_hangs_nor_stops_the_checkpointer(
    tmp_path: Path, faults: Counter[str]
) -> None:
    asyncckpt.save(tmp_path / checkpoint_name(1), deterministic_state(1), step=1)
    os.mkfifo(tmp_path / EVENTS_FILE)
    with structlog.testing.capture_logs() as logs, AsyncCheckpointer(tmp_path) as ckpt:
        restored = ckpt.restore({})
        ckpt.save(2, deterministic_state(2)).result(timeout=30)
    faults["FIFOs: events.jsonl opened by the checkpointer"] += 1
    assert restored is not None and restored.step == 1
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [1, 2]
    unavailable = [e for e in logs if e["event"] == EVENT_LOG_UNAVAILABLE]
    assert unavailable and unavailable[0]["path"] == str(tmp_path / EVENTS_FILE)
    assert "checkpoint.save.committed" in [e["event"] for e in logs]  # the events went to structlog


def test_a_symlink_named_events_jsonl_is_not_written_through(tmp_path: Path, faults: Counter[str]) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not a log\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / EVENTS_FILE).symlink_to(outside)
    with AsyncCheckpointer(run) as ckpt:
        ckpt.save(1, deterministic_state(1)).result(timeout=30)
    faults["symlinks: events.jsonl opened by the checkpointer"] += 1
    assert outside.read_text() == "not a log\n" and (run / EVENTS_FILE).is_symlink()
    assert [c.step for c in asyncckpt.list_checkpoints(run)] == [1]


@pytest.mark.parametrize("follow", [False, True], ids=["logs", "logs --follow"])
def test_asyncckpt_logs_refuses_a_fifo_at_once(tmp_path: Path, follow: bool, faults: Counter[str]) -> None:
    os.mkfifo(tmp_path / EVENTS_FILE)
    extra = ["--follow", "--idle-timeout", "5"] if follow else []
    result = run_cli("logs", tmp_path, *extra)
    faults["FIFOs: events.jsonl read by asyncckpt logs"] += 1
    assert result.returncode == EXIT_FAILURE, result.stderr
    assert "not a regular file" in result.stderr


def test_the_event_reader_refuses_fifos_and_symlinks(tmp_path: Path) -> None:
    real = tmp_path / "real.jsonl"
    real.write_text('{"event": "x"}\n')
    (tmp_path / "link.jsonl").symlink_to(real)
    os.mkfifo(tmp_path / "fifo.jsonl")
    for name in ("link.jsonl", "fifo.jsonl"):
        with pytest.raises(OSError), LineFollower(tmp_path / name) as follower:
            follower.poll()
    assert read_lines(real) == ['{"event": "x"}']


def test_a_fifo_named_failed_checkpoints_txt_does_not_hang_the_fallback(
    tmp_path: Path, faults: Counter[str]
) -> None:
    asyncckpt.save(tmp_path / checkpoint_name(1), deterministic_state(1), step=1)
    flip_blob_byte(asyncckpt.save(tmp_path / checkpoint_name(2), deterministic_state(2), step=2))
    os.mkfifo(tmp_path / FAILED_LOG_NAME)
    with pytest.warns(RuntimeWarning, match="cannot record failed checkpoints"):
        result = load_latest(tmp_path, log=quiet)
    with (
        pytest.warns(RuntimeWarning, match="cannot record failed checkpoints"),
        AsyncCheckpointer(tmp_path) as ckpt,
    ):
        restored = ckpt.restore({})
    faults["FIFOs: failed_checkpoints.txt appended by the fallback"] += 2
    assert result.step == 1 and result.source == "fallback"
    assert restored is not None and restored.step == 1
    assert states_equal(restored.state, deterministic_state(1))


def test_a_symlink_named_failed_checkpoints_txt_is_not_written_through(
    tmp_path: Path, faults: Counter[str]
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    asyncckpt.save(run / checkpoint_name(1), deterministic_state(1), step=1)
    flip_blob_byte(asyncckpt.save(run / checkpoint_name(2), deterministic_state(2), step=2))
    (run / FAILED_LOG_NAME).symlink_to(outside)
    with pytest.warns(RuntimeWarning, match="cannot record failed checkpoints"):
        result = load_latest(run, log=quiet)
    faults["symlinks: failed_checkpoints.txt appended by the fallback"] += 1
    assert result.step == 1 and outside.read_text() == "precious\n"
