"""Fixtures of the command-line tests: a run directory with three checkpoints and events."""

from __future__ import annotations

from pathlib import Path

import pytest

import asyncckpt
from asyncckpt.events import EventLog

from .helpers import STEPS, state


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Three valid checkpoints (steps 10, 20, 30) and an events file."""
    directory = tmp_path / "run"
    directory.mkdir()
    for step in STEPS:
        asyncckpt.save(directory / f"step-{step:010d}.ckpt", state(step), step=step, metadata={"run": "t"})
    log = EventLog(directory / "events.jsonl")
    log.info("checkpoint.writer.started", directory=str(directory))
    log.info("checkpoint.save.committed", step=10, bytes=1234, write_ms=1.5)
    log.warning("checkpoint.save.skipped", step=15, reason="all 1 staging slots busy")
    log.error("checkpoint.save.failed", step=20, error="disk full")
    log.close()
    return directory
