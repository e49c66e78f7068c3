"""_memory.prefault: fresh load buffers backed by populated huge pages, only where they span them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt import _memory


def test_advice_covers_only_the_whole_huge_pages_inside_a_large_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(
        _memory, "_madvise_call", lambda start, length, advice: calls.append((start, length, advice)) or 0
    )
    buffer = torch.empty(_memory.PREFAULT_MIN + 12345, dtype=torch.uint8)

    _memory.prefault([buffer])

    assert [advice for _, _, advice in calls] == [_memory._MADV_HUGEPAGE, _memory._MADV_POPULATE_WRITE]
    start, length, _ = calls[0]
    assert all((s, n) == (start, length) for s, n, _ in calls)
    begin, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    assert start % _memory.HUGE_PAGE == 0 and length % _memory.HUGE_PAGE == 0
    assert begin <= start and start + length <= end
    assert start - begin < _memory.HUGE_PAGE and end - (start + length) < _memory.HUGE_PAGE


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.empty(_memory.PREFAULT_MIN - 1, dtype=torch.uint8),  # may be reused heap memory
        lambda: torch.empty(0, dtype=torch.uint8),
        lambda: torch.empty(_memory.PREFAULT_MIN, dtype=torch.uint8, device="meta"),
    ],
)
def test_small_empty_or_non_cpu_buffers_get_no_advice(monkeypatch: pytest.MonkeyPatch, make: Any) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(_memory, "_madvise_call", lambda *args: calls.append(args) or 0)
    _memory.prefault([make()])
    assert calls == []


def test_a_kernel_that_refuses_the_advice_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_memory, "_madvise_call", lambda *args: -1)
    buffer = torch.zeros(_memory.PREFAULT_MIN + 1, dtype=torch.uint8)
    _memory.prefault([buffer])
    assert not buffer.any()


def test_tensors_larger_than_the_threshold_load_exactly(tmp_path: Path) -> None:
    """The real advice (or its refusal) on the loader's own buffers: the bytes read are the ones saved."""
    generator = torch.Generator().manual_seed(7)
    state = {
        "big": torch.randn((_memory.PREFAULT_MIN // 4) + 1001, generator=generator),
        "bf16": torch.randn(_memory.PREFAULT_MIN // 2 + 3, generator=generator).to(torch.bfloat16),
        "small": torch.arange(10),
    }
    path = asyncckpt.save(tmp_path / "big.ckpt", state, step=1)
    for _ in range(2):  # the second load's buffers may be fresh mappings again
        loaded = asyncckpt.load(path).state
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
