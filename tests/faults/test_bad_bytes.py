"""Bad bytes, end to end: damage the newest checkpoint an AsyncCheckpointer wrote, then load.

Truncations, bit flips, zeroed 4 KiB pages, swapped blocks, garbage appended and random files,
in every region (magic, prelude, padding, blobs, header, trailer). ``asyncckpt.load`` raises
``CorruptedCheckpointError`` or ``IncompatibleCheckpointError`` or returns exactly the original
data (a flip in padding no checksum covers); ``load_latest`` agrees and falls back to the previous
checkpoint, exact. Never wrong data, never another exception. Headers declaring huge lengths or
deep nesting get a clear error within bounded memory. (tests/test_format.py checks the reader at
the format level; this is the trainer's view.)
"""

from __future__ import annotations

import struct
import tempfile
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt import AsyncCheckpointer, CorruptedCheckpointError, IncompatibleCheckpointError
from asyncckpt import format as fmt
from asyncckpt.catalog import checkpoint_name
from asyncckpt.loading import load_latest
from asyncckpt.testing import deterministic_state, states_equal

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")

CI = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
STRESS = settings(CI, max_examples=2000)
REFUSED = (CorruptedCheckpointError, IncompatibleCheckpointError)
MEMORY_BOUND = 16 << 20  # bytes of Python memory a hostile header may make the reader allocate
# ... plus, for nested tuples, the copies msgpack makes of each level (bounded by the format)
TUPLE_COPIES_BOUND = fmt.MAX_TUPLE_BYTES


def state(step: int) -> dict[str, Any]:
    saved = deterministic_state(step, tensors=3, numel=1500)  # 6000-byte blobs: 2 pages each
    saved["extra"]["notes"] = ["padding", b"\x00\x01", {"nested": (1, 2.5, None)}]
    return saved


@dataclass(frozen=True)
class Pristine:
    """Two checkpoints written by AsyncCheckpointer; the newest one is the victim."""

    directory: Path
    fallback: bytes  # the older checkpoint, step 1
    victim: bytes  # the newest, step 2
    regions: dict[str, tuple[int, int]]  # name -> [start, end) in the victim


def regions_of(path: Path) -> dict[str, tuple[int, int]]:
    with open(path, "rb") as file:
        layout = fmt.read_layout(file, str(path))
    regions = {
        "magic": (0, 8),
        "prelude": (8, fmt.PRELUDE_SIZE),
        "padding": (fmt.PRELUDE_SIZE, fmt.DATA_OFFSET),
    }
    for i, blob in enumerate(layout.blobs):
        regions[f"blob {i}"] = (blob.offset, blob.offset + blob.nbytes)
        following = layout.blobs[i + 1].offset if i + 1 < len(layout.blobs) else layout.header_offset
        if following > blob.offset + blob.nbytes:
            regions[f"padding after blob {i}"] = (blob.offset + blob.nbytes, following)
    trailer = layout.file_size - fmt.TRAILER_SIZE
    regions["header"] = (layout.header_offset, trailer)
    regions["trailer"] = (trailer, layout.file_size)
    return regions


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    directory = tmp_path_factory.mktemp("pristine")
    with AsyncCheckpointer(directory) as ckpt:  # default retention: the fallback must be kept
        for step in (1, 2):
            ckpt.save(step, state(step)).result(timeout=30)
    victim = directory / checkpoint_name(2)
    assert [c.step for c in asyncckpt.list_checkpoints(directory)] == [1, 2]
    fallback = (directory / checkpoint_name(1)).read_bytes()
    return Pristine(directory, fallback, victim.read_bytes(), regions_of(victim))


def quiet(*_: object, **__: object) -> None:
    """A ``log`` for load_latest that drops the summary."""


def judge(pristine: Pristine, damaged: bytes, kind: str, faults: Counter[str]) -> str:
    """Load ``damaged`` in place of the newest checkpoint; check the promise; return the outcome."""
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        (directory / checkpoint_name(1)).write_bytes(pristine.fallback)
        victim = directory / checkpoint_name(2)
        victim.write_bytes(damaged)
        try:
            loaded = asyncckpt.load(victim)
        except REFUSED:
            outcome = "refused"
        else:
            assert loaded.step == 2 and states_equal(loaded.state, state(2)), "wrong data loaded"
            outcome = "harmless"
        result = load_latest(directory, log=quiet)
    if outcome == "refused":
        assert result.step == 1 and states_equal(result.state, state(1))
        assert [Path(d.path).name for d in result.diagnostics] == [victim.name]
    else:
        assert result.step == 2 and states_equal(result.state, state(2)) and not result.diagnostics
    faults[f"bad bytes: {kind}"] += 1
    faults[f"bad bytes: outcome {outcome}"] += 1
    return outcome


def region_offset(pristine: Pristine, data: st.DataObject) -> tuple[str, int]:
    name = data.draw(st.sampled_from(sorted(pristine.regions)))
    start, end = pristine.regions[name]
    return name, data.draw(st.integers(start, end - 1))


# --------------------------------------------------------------------------- damage kinds


def flips(pristine: Pristine, data: st.DataObject, faults: Counter[str]) -> None:
    damaged = bytearray(pristine.victim)
    flipped: dict[int, str] = {}
    for _ in range(data.draw(st.integers(1, 4))):
        name, offset = region_offset(pristine, data)
        damaged[offset] ^= 1 << data.draw(st.integers(0, 7))
        flipped[offset] = name
    names = {name for offset, name in flipped.items() if damaged[offset] != pristine.victim[offset]}
    kind = f"bit flips in {min(names)}" if len(names) == 1 else "bit flips in several regions"
    outcome = judge(pristine, bytes(damaged), kind if names else "bit flips that cancel out", faults)
    if outcome == "harmless":  # only padding is not covered by a checksum
        assert all(name.startswith("padding") for name in names), names


def truncation(pristine: Pristine, data: st.DataObject, faults: Counter[str]) -> None:
    name, offset = region_offset(pristine, data)
    assert judge(pristine, pristine.victim[:offset], f"truncated in {name}", faults) == "refused"


def zeroed_page(pristine: Pristine, data: st.DataObject, faults: Counter[str]) -> None:
    pages = -(-len(pristine.victim) // 4096)
    page = data.draw(st.integers(0, pages - 1))
    damaged = bytearray(pristine.victim)
    damaged[page * 4096 : (page + 1) * 4096] = bytes(len(damaged[page * 4096 : (page + 1) * 4096]))
    judge(pristine, bytes(damaged), "zeroed 4 KiB page", faults)


def swapped_blocks(pristine: Pristine, data: st.DataObject, faults: Counter[str]) -> None:
    size = data.draw(st.sampled_from([512, 4096]))
    blocks = len(pristine.victim) // size
    a, b = data.draw(st.lists(st.integers(0, blocks - 1), min_size=2, max_size=2, unique=True))
    damaged = bytearray(pristine.victim)
    first, second = damaged[a * size : (a + 1) * size], damaged[b * size : (b + 1) * size]
    damaged[a * size : (a + 1) * size], damaged[b * size : (b + 1) * size] = second, first
    judge(pristine, bytes(damaged), f"swapped {size}-byte blocks", faults)


def appended(pristine: Pristine, data: st.DataObject, faults: Counter[str]) -> None:
    tail = data.draw(st.binary(min_size=1, max_size=5000))
    assert judge(pristine, pristine.victim + tail, "garbage appended", faults) == "refused"


def random_file(pristine: Pristine, data: st.DataObject, faults: Counter[str]) -> None:
    start = data.draw(
        st.sampled_from([b"", fmt.MAGIC, pristine.victim[: fmt.PRELUDE_SIZE], b"PK\x03\x04", b"\x80"])
    )
    body = data.draw(st.binary(max_size=20000))
    assert judge(pristine, start + body, "random file", faults) == "refused"


DAMAGE: dict[str, Callable[[Pristine, st.DataObject, Counter[str]], None]] = {
    "flips": flips,
    "truncation": truncation,
    "zeroed_page": zeroed_page,
    "swapped_blocks": swapped_blocks,
    "appended": appended,
    "random_file": random_file,
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damage_is_refused_or_harmless_and_the_loader_falls_back(
    pristine: Pristine, kind: str, faults: Counter[str]
) -> None:
    @CI
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        DAMAGE[kind](pristine, data, faults)

    run()


@pytest.mark.stress
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damage_stress(pristine: Pristine, kind: str, faults: Counter[str]) -> None:
    @STRESS
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        DAMAGE[kind](pristine, data, faults)

    run()


def test_every_single_bit_of_the_prelude_header_and_trailer_is_checked(
    pristine: Pristine, faults: Counter[str]
) -> None:
    """Exhaustive over the checked metadata regions, one flipped bit at a time (one bit per byte)."""
    for name in ("magic", "prelude", "header", "trailer"):
        start, end = pristine.regions[name]
        for offset in range(start, end):
            damaged = bytearray(pristine.victim)
            damaged[offset] ^= 1 << (offset % 8)
            assert judge(pristine, bytes(damaged), f"exhaustive flips in {name}", faults) == "refused"


def test_default_retention_keeps_a_fallback(pristine: Pristine) -> None:
    """Regression: keep_last larger than the number of files once deleted all but the newest."""
    assert [c.step for c in asyncckpt.list_checkpoints(pristine.directory)] == [1, 2]


# --------------------------------------------------------------------------- hostile headers


def with_header(pristine: Pristine, header: bytes) -> bytes:
    """The victim with its header replaced by ``header``, checksums and trailer made consistent,
    so that only the reader's limits can catch what the header declares."""
    start, _ = pristine.regions["header"]
    return pristine.victim[:start] + header + fmt.encode_trailer(start, header)


def original_header(pristine: Pristine) -> dict[str, Any]:
    start, end = pristine.regions["header"]
    header = fmt.unpack(pristine.victim[start:end])
    assert isinstance(header, dict)
    return header


def packed_map(entries: dict[str, bytes]) -> bytes:
    """A msgpack map whose values are given as raw msgpack bytes."""
    assert len(entries) < 16
    return bytes([0x80 | len(entries)]) + b"".join(msgpack.packb(k) + v for k, v in entries.items())


def header_with(pristine: Pristine, **raw_values: bytes) -> bytes:
    header = original_header(pristine)
    entries = {key: fmt.pack(value) for key, value in header.items()}
    entries.update(raw_values)
    return packed_map(entries)


HOSTILE_HEADERS: dict[str, Callable[[Pristine], bytes]] = {
    "blob of 2**50 bytes": lambda p: fmt.pack({**original_header(p), "blobs": [[4096, 2**50, 0]]}),
    "tensor of 2**40 x 2**40": lambda p: fmt.pack(
        {**original_header(p), "tensors": [["w", "float32", [2**40, 2**40], [2**40, 1], 0, 0]]}
    ),
    "array of 2**32-1 items": lambda p: header_with(p, tree=b"\xdd\xff\xff\xff\xff"),
    "string of 2**32-1 bytes": lambda p: header_with(p, writer=b"\xdb\xff\xff\xff\xff"),
    "map of 2**32-1 entries": lambda p: header_with(p, metadata=b"\xdf\xff\xff\xff\xff"),
    "100000 nested lists": lambda p: header_with(p, tree=b"\x91" * 100_000 + b"\xc0"),
    "10000 nested tuples": lambda p: header_with(p, tree=nested_tuples(10_000)),
    "1000 nested maps": lambda p: header_with(p, metadata=b"\x81\xa1k" * 1000 + b"\xc0"),
}


def nested_tuples(depth: int) -> bytes:
    packed = fmt.pack(None)
    for _ in range(depth):
        array = b"\x91" + packed
        packed = (
            b"\xc9" + struct.pack(">I", len(array)) if len(array) > 255 else b"\xc7" + bytes([len(array)])
        )
        packed += bytes([fmt.EXT_TUPLE]) + array
    return packed


@pytest.mark.parametrize("name", sorted(HOSTILE_HEADERS))
def test_hostile_headers_get_a_clear_error_in_bounded_memory(
    pristine: Pristine, name: str, faults: Counter[str]
) -> None:
    damaged = with_header(pristine, HOSTILE_HEADERS[name](pristine))
    tracemalloc.start()
    try:
        outcome = judge(pristine, damaged, f"hostile header: {name}", faults)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome == "refused"
    bound = MEMORY_BOUND + 2 * len(damaged) + (TUPLE_COPIES_BOUND if "tuples" in name else 0)
    assert peak < bound, f"{name}: peak {peak} bytes"


def test_a_hostile_header_is_diagnosed_clearly(pristine: Pristine, tmp_path: Path) -> None:
    victim = tmp_path / checkpoint_name(2)
    victim.write_bytes(with_header(pristine, HOSTILE_HEADERS["blob of 2**50 bytes"](pristine)))
    with pytest.raises(CorruptedCheckpointError, match=r"blob 0 at offset 4096 \(\+1125899906842624\)"):
        asyncckpt.load(victim)
