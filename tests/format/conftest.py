"""Fixtures of the format tests: a small v1 file, and a loader of crafted bytes that must be refused."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt import reader


@pytest.fixture
def small_file(tmp_dir: Path) -> tuple[Path, dict[str, Any]]:
    """A small v1 file with two blobs (so with padding between them), and its state."""
    state = {
        "a": torch.arange(6, dtype=torch.float32),
        "b": torch.tensor([[1, 2], [3, 4]], dtype=torch.int16),
        "n": (1, "x"),
    }
    return asyncckpt.save(tmp_dir / "small.ckpt", state, step=5), state


@pytest.fixture
def refused(tmp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[bytes, str], str]]:
    """Load crafted bytes; assert a CorruptedCheckpointError matching ``pattern`` that came before
    any blob was read (so nothing of a declared size was allocated) and with a small peak of
    Python memory (under 16 MiB; the most is decoding 10,000 nested tuples, which stops at
    depth 129 after copying each level's payload). Returns the message."""

    def no_blob_reads(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a blob was read from a file that should have been refused")

    monkeypatch.setattr(reader, "read_tensors", no_blob_reads)

    def load(data: bytes, pattern: str) -> str:
        path = tmp_dir / "hostile.ckpt"
        path.write_bytes(data)
        tracemalloc.start()
        try:
            with pytest.raises(asyncckpt.CorruptedCheckpointError, match=pattern) as caught:
                asyncckpt.load(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert type(caught.value) is asyncckpt.CorruptedCheckpointError
        assert str(caught.value).startswith(f"{path}: ")
        assert peak < 16 << 20, f"peak Python allocation {peak} bytes"
        return str(caught.value)

    yield load
