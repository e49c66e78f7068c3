"""Shared rendering: sizes, steps, plurals, consoles and the tree of plain values."""

from __future__ import annotations

import pytest
from rich.console import Console

from asyncckpt import format as fmt
from asyncckpt.cli.render import PIPE_WIDTH, console, human_bytes, plain_tree, plural, step_text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (14342161, "14.3 MB"),
        (2 * 10**12, "2.0 TB"),
        (10**16, "10000.0 TB"),
    ],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


def test_step_text_and_plural() -> None:
    assert step_text(None) == "-" and step_text(0) == "0"
    assert plural(1, "checkpoint") == "1 checkpoint" and plural(3, "temp file") == "3 temp files"


def test_console_is_wide_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert console(stderr=False).width == PIPE_WIDTH


def test_plain_tree_collapses_tensors_and_shortens_values() -> None:
    tree = {
        "model": {"w": fmt.TensorRef(0), "b": fmt.TensorRef(1)},
        "opt": {"lr": 0.5, "moments": [fmt.TensorRef(2)], "big": fmt.BigInt(2**70)},
        "pair": (1, 2),
        "long": list(range(20)),
        "text": "x" * 200,
    }
    out = Console(width=200, no_color=True, record=True)
    out.print(plain_tree(tree, label="state"))
    text = out.export_text()
    assert "model: 2 tensors" in text
    assert "lr: 0.5" in text and f"big: {2**70}" in text and "moments: 1 tensor" in text
    assert "pair: (1, 2)" in text
    assert "long (list of 20)" in text
    assert "text: 'xxx" in text and "…" in text
