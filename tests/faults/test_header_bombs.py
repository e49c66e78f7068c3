"""Header bombs: small, checksum-consistent headers that are costly to decode.

Before the pre-scan, a legal header of N empty lists cost about 145 bytes of memory and 3.5 us
of time per header byte (145 MiB and 3.7 s at 1 MiB), and a chain of nested lists each declaring
10,000 items made msgpack reserve 80 KB per level (80 MiB for a 5 KB header). Now every bomb
below is refused with ``CorruptedCheckpointError`` before anything is decoded, and what a
header may legally hold costs less than ``MEMORY_PER_BYTE`` bytes per header byte to decode.

Memory is measured with tracemalloc (Python's heap); there are no wall-clock asserts (time is
bounded by the same one-pass scan; docs/RELIABILITY.md gives measured figures).
"""

from __future__ import annotations

import io
import re
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import msgpack
import pytest

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt import load_latest
from asyncckpt.catalog import checkpoint_name
from asyncckpt.testing import deterministic_state, states_equal

SIZE = 256 << 10  # bytes of the bomb itself
MEMORY_PER_BYTE = 64  # the documented bound on decoding: Python heap per header byte
REFUSED_BEFORE_DECODING = 2  # a refused bomb costs the header's bytes and a little more


def array(n: int) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big")


def repeated(unit: bytes, size: int = SIZE) -> bytes:
    """An array of ``unit`` repeated to about ``size`` bytes."""
    count = size // len(unit)
    return array(count) + unit * count


def ext(code: int, payload: bytes) -> bytes:
    return bytes(msgpack.packb(msgpack.ExtType(code, payload)))


def tuple_chain(levels: int, payload: bytes) -> bytes:
    """``levels`` one-item tuples around ``payload`` (msgpack copies every level's payload)."""
    value = payload
    for _ in range(levels):
        value = ext(fmt.EXT_TUPLE, b"\x91" + value)
    return value


def declared_chain(levels: int, declared: int) -> bytes:
    """``levels`` nested arrays, each declaring ``declared`` items and holding one."""
    head = (b"\xdc" + declared.to_bytes(2, "big")) if declared < 2**16 else array(declared)
    return head * levels + bytes(SIZE)


def header(tree: bytes) -> bytes:
    """A valid header map (no tensors, no blobs) whose ``tree`` is the raw msgpack ``tree``."""
    fields: dict[str, Any] = {
        "format": "asyncckpt",
        "version": fmt.FORMAT_VERSION,
        "status": "complete",
        "step": 7,
        "created": "2026-01-01T00:00:00.000000+00:00",
        "writer": "a bomb",
        "metadata": {},
        "blobs": [],
        "tensors": [],
    }
    out = bytes(msgpack.Packer().pack_map_header(len(fields) + 1))
    for key, value in fields.items():
        out += fmt.pack(key) + fmt.pack(value)
    return out + fmt.pack("tree") + tree


def v1_file(raw_header: bytes) -> bytes:
    """Prelude, padding, no blobs, ``raw_header`` and a trailer whose checksums all agree."""
    body = fmt.encode_prelude() + bytes(fmt.DATA_OFFSET - fmt.PRELUDE_SIZE)
    trailer = fmt.encode_trailer(len(body), raw_header)
    assert crc32c.crc32c(raw_header) == int.from_bytes(trailer[24:28], "little")
    return body + raw_header + trailer


BOMBS: dict[str, tuple[bytes, str]] = {
    # deep nesting
    "10,000 nested lists": (b"\x91" * 10_000 + b"\x90", "nests deeper than 128 levels"),
    "10,000 nested maps": (b"\x81\xa1k" * 10_000 + b"\xc0", "nests deeper than 128 levels"),
    # msgpack reserves room for up to 10,000 items of each open list: 80 KB a level
    "1,000 nested lists declaring 10,000 items": (declared_chain(1_000, 10_000), "nests deeper than 128"),
    "100 nested lists declaring 10,000 items": (declared_chain(100, 10_000), "truncated"),
    "1,000 nested lists declaring 2**32 - 1 items": (declared_chain(1_000, 2**32 - 1), "declares 4294967295"),
    "129 nested tuples around 250 KB": (
        tuple_chain(129, bytes(msgpack.packb(bytes(SIZE)))),
        "tuples nest more",
    ),
    "10,000 nested tuples": (tuple_chain(10_000, b"\x90"), "nests deeper|tuples nest more"),
    # many empty containers
    "empty lists": (repeated(b"\x90"), "more than [0-9]+ lists, tuples, maps"),
    "empty maps": (repeated(b"\x80"), "more than [0-9]+ lists, tuples, maps"),
    "empty tuples": (repeated(ext(fmt.EXT_TUPLE, b"\x90")), "more than [0-9]+ lists, tuples, maps"),
    "one-item lists": (repeated(b"\x91\xf9"), "more than [0-9]+ lists, tuples, maps"),
    "lists of empty lists": (repeated(b"\x93\x90\x90\x90"), "more than [0-9]+ lists, tuples, maps"),
    "maps of empty maps": (repeated(b"\x81\x01\x80"), "more than [0-9]+ lists, tuples, maps"),
    # huge declared lengths
    "array32 of 2**32 - 1 items": (array(2**32 - 1) + bytes(SIZE), "declares 4294967295 values"),
    "map32 of 2**32 - 1 entries": (b"\xdf" + (2**32 - 1).to_bytes(4, "big") + bytes(SIZE), "declares"),
    "array declaring one more item than bytes left": (array(SIZE + 1) + bytes(SIZE), "declares"),
    "str32 of 2**32 - 1 bytes": (b"\xdb" + (2**32 - 1).to_bytes(4, "big") + bytes(SIZE), "truncated"),
    "bin32 of 2**32 - 1 bytes": (b"\xc6" + (2**32 - 1).to_bytes(4, "big") + bytes(SIZE), "truncated"),
    "ext32 of 2**32 - 1 bytes": (
        b"\xc9" + (2**32 - 1).to_bytes(4, "big") + b"\x01" + bytes(SIZE),
        "truncated",
    ),
    "tuple declaring more items than its payload": (
        ext(fmt.EXT_TUPLE, b"\xdd\x00\x10\x00\x00" + bytes(9)),
        "declares",
    ),
    # big ints
    "a big int of 2 Mbit": (ext(fmt.EXT_BIGINT, b"\x7f" + bytes(SIZE)), "an int of more than 8192 bits"),
    "a big int of 8200 bits": (ext(fmt.EXT_BIGINT, b"\x7f" + bytes(1025)), "an int of more than 8192 bits"),
    "many small big ints": (repeated(ext(fmt.EXT_BIGINT, b"\x05")), "more than [0-9]+ lists, tuples, maps"),
    # many extension objects
    "many tensor references": (
        repeated(ext(fmt.EXT_TENSOR, b"\x00")),
        "more than [0-9]+ lists, tuples, maps",
    ),
    "many unknown extensions": (repeated(ext(9, b"\x00")), "unknown msgpack extension type 9"),
    "a tensor reference holding 250 KB of lists": (
        ext(fmt.EXT_TENSOR, repeated(b"\x90")),
        "tensor reference is not",
    ),
    "a tuple whose payload is a map": (ext(fmt.EXT_TUPLE, b"\x80"), "not an array"),
}


@pytest.fixture
def load_measured(tmp_dir: Path) -> Callable[[bytes], tuple[BaseException | None, int]]:
    """Write a v1 file of the given header; load it; return the error (or None) and the peak."""

    def load(raw_header: bytes) -> tuple[BaseException | None, int]:
        path = tmp_dir / "bomb.ckpt"
        path.write_bytes(v1_file(raw_header))
        tracemalloc.start()
        try:
            try:
                asyncckpt.load(path)
            except Exception as exc:  # noqa: BLE001 - the test judges the type
                return exc, tracemalloc.get_traced_memory()[1]
            return None, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    return load


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_header_bomb_is_refused_before_decoding(
    name: str, load_measured: Callable[[bytes], tuple[BaseException | None, int]], faults: Counter[str]
) -> None:
    tree, reason = BOMBS[name]
    raw = header(tree)

    error, peak = load_measured(raw)

    assert type(error) is asyncckpt.CorruptedCheckpointError, f"{name}: {error!r}"
    assert error.reason.startswith(f"header at offset {fmt.DATA_OFFSET} does not decode: "), error.reason
    assert error.offset == fmt.DATA_OFFSET
    assert re.search(reason, error.reason), f"{name}: {error.reason}"
    assert peak < MEMORY_PER_BYTE * len(raw), f"{name}: peak {peak} for {len(raw)} header bytes"
    assert peak < REFUSED_BEFORE_DECODING * len(raw) + (1 << 20), f"{name}: peak {peak} for {len(raw)} bytes"
    faults["header bombs refused"] += 1


# What a header may legally hold at the most objects a byte, and the values that cost the most
# memory per byte: each decodes within MEMORY_PER_BYTE (measured: 57, 42, 21, 30 and 34 bytes).
COSTLY_BUT_LEGAL: dict[str, bytes] = {
    "one-entry maps, one per 4 bytes": repeated(b"\x81\xa1a\xf9"),
    "negative fixints not cached by Python": repeated(b"\xf9"),
    "two-character strings": repeated(b"\xa2ab"),
    "three-item lists of small negative ints": repeated(b"\x93\xf9\xf9\xf9"),
    "one-item tuples of a small negative int": repeated(ext(fmt.EXT_TUPLE, b"\x92\xf9\xf9")),
}


@pytest.mark.parametrize("name", list(COSTLY_BUT_LEGAL))
def test_what_a_header_may_hold_decodes_within_the_bound(name: str, faults: Counter[str]) -> None:
    raw = header(COSTLY_BUT_LEGAL[name])
    data = v1_file(raw)

    tracemalloc.start()
    try:
        layout = fmt.read_layout(io.BytesIO(data), "mem")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert layout.step == 7 and len(layout.tree) > SIZE // 8
    assert peak < MEMORY_PER_BYTE * len(raw), f"{name}: peak {peak} for {len(raw)} header bytes"
    faults["costly but legal headers decoded within the bound"] += 1


def test_the_resume_falls_back_past_a_header_bomb(tmp_dir: Path, faults: Counter[str]) -> None:
    good = deterministic_state(1, tensors=2, numel=64)
    asyncckpt.save(tmp_dir / checkpoint_name(1), good, step=1)
    (tmp_dir / checkpoint_name(2)).write_bytes(v1_file(header(repeated(b"\x90"))))

    result = load_latest(tmp_dir, log=lambda *_, **__: None)

    assert result.step == 1 and states_equal(result.state, good)
    assert [Path(d.path).name for d in result.diagnostics] == [checkpoint_name(2)]
    assert "lists, tuples, maps" in result.diagnostics[0].reason
    faults["header bombs refused"] += 1
