"""PosixFile.read_pieces: many pieces and the gaps between them in few preadv calls."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt.storage.localfile import IOV_MAX, PosixFile

DATA = bytes(range(256)) * 64  # 16 KiB, every byte's value tells its offset modulo 256


@pytest.fixture
def data_file(tmp_path: Path) -> PosixFile:
    path = tmp_path / "f"
    path.write_bytes(DATA)
    with PosixFile(path, "f") as handle:
        yield handle  # type: ignore[misc]


def pieces_of(layout: list[tuple[int, int]]) -> list[tuple[int, memoryview]]:
    return [(at, memoryview(bytearray(n))) for at, n in layout]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(1, 300)), min_size=1, max_size=40))
def test_pieces_get_their_bytes_and_gaps_are_dropped(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[int, int]]
) -> None:
    path = tmp_path_factory.mktemp("r") / "f"
    path.write_bytes(DATA)
    layout, at = [], 100
    for gap, nbytes in steps:
        layout.append((at + gap, nbytes))
        at += gap + nbytes
    pieces = pieces_of(layout)
    length = at - 100
    with PosixFile(path, "f") as handle:
        got = handle.read_pieces(100, length, pieces)
    assert got == min(length, len(DATA) - 100)
    for start, view in pieces:
        want = DATA[start : start + len(view)]
        assert bytes(view[: len(want)]) == want


def test_more_pieces_than_one_call_takes(data_file: PosixFile, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.preadv

    def counting(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(len(buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting)
    count = IOV_MAX * 2 + 5  # one byte each, no gaps
    pieces = pieces_of([(i, 1) for i in range(count)])
    assert data_file.read_pieces(0, count, pieces) == count
    assert [bytes(v) for _, v in pieces] == [DATA[i : i + 1] for i in range(count)]
    assert calls == [IOV_MAX, IOV_MAX, 5]


def test_a_short_read_in_the_middle_continues_where_it_stopped(
    data_file: PosixFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.preadv

    def short(fd: int, buffers: list[memoryview], offset: int) -> int:
        first = buffers[0]
        return real(fd, [first[: max(1, len(first) // 2)]], offset)  # half of the first buffer

    monkeypatch.setattr(os, "preadv", short)
    pieces = pieces_of([(0, 10), (20, 7), (30, 3)])
    assert data_file.read_pieces(0, 33, pieces) == 33
    assert [bytes(v) for _, v in pieces] == [DATA[0:10], DATA[20:27], DATA[30:33]]


def test_a_range_past_the_end_reports_what_exists(data_file: PosixFile) -> None:
    pieces = pieces_of([(len(DATA) - 10, 4), (len(DATA) - 4, 8)])
    assert data_file.read_pieces(len(DATA) - 10, 12, pieces) == 10
    assert bytes(pieces[0][1]) == DATA[-10:-6]
    assert bytes(pieces[1][1])[:4] == DATA[-4:]
