"""format.sniff: the one answer to "what kind of file is this", from its first bytes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt.cli.inspection import inspect_file, read_prelude
from asyncckpt.format import SNIFF_BYTES, FileKind, sniff


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"ASYNCKPT", FileKind.V1),
        (b"ASYNCKPT" + bytes(56), FileKind.V1),
        (b"PK\x03\x04rest", FileKind.ZIP_TORCH_SAVE),
        (b"PK\x03\x04", FileKind.ZIP_TORCH_SAVE),  # short, but a zip: torch.load says what is wrong
        (b"\x80\x02}q\x00", FileKind.PICKLE_TORCH_SAVE),
        (b"\x80", FileKind.PICKLE_TORCH_SAVE),
    ],
)
def test_kinds(head: bytes, kind: FileKind) -> None:
    assert sniff(head) is kind
    assert kind.legacy is (kind is not FileKind.V1)


@pytest.mark.parametrize(
    ("head", "reason", "offset"),
    [
        (b"", "truncated: 0 bytes, not a checkpoint", 0),
        (b"ASYNC", "truncated: 5 bytes, not a checkpoint", 5),
        (b"garbage", "truncated: 7 bytes, not a checkpoint", 7),
        (b"hello world, not a checkpoint", "not a checkpoint (bad magic b'hello wo')", 0),
        (b"ASYNCKPX", "not a checkpoint (bad magic b'ASYNCKPX')", 0),
    ],
)
def test_refusals_carry_fields(head: bytes, reason: str, offset: int) -> None:
    with pytest.raises(asyncckpt.CorruptedCheckpointError) as caught:
        sniff(head, path=Path("run/x.ckpt"))

    error = caught.value
    assert type(error) is asyncckpt.CorruptedCheckpointError
    assert (error.reason, error.path, error.offset) == (reason, "run/x.ckpt", offset)
    assert str(error) == f"run/x.ckpt: {reason}"


def test_sniff_bytes_is_the_magic_length() -> None:
    assert SNIFF_BYTES == len(fmt.MAGIC) == 8


@given(head=st.binary(max_size=80))
def test_every_head_has_exactly_one_answer(head: bytes) -> None:
    try:
        kind = sniff(head)
    except asyncckpt.CorruptedCheckpointError as exc:
        assert not head.startswith((b"ASYNCKPT", b"PK\x03\x04", b"\x80"))
        assert ("truncated" in exc.reason) is (len(head) < SNIFF_BYTES)
        return
    expected = {b"A": FileKind.V1, b"P": FileKind.ZIP_TORCH_SAVE, b"\x80": FileKind.PICKLE_TORCH_SAVE}
    assert kind is expected[head[:1]]
    assert sniff(head[:SNIFF_BYTES]) is kind  # the first 8 bytes decide


def test_real_files(tmp_path: Path) -> None:
    v1 = asyncckpt.save(tmp_path / "a.ckpt", {"w": torch.ones(3)}, step=1)
    zipped, pickled = io.BytesIO(), io.BytesIO()
    torch.save({"w": torch.ones(3)}, zipped)
    torch.save({"w": torch.ones(3)}, pickled, _use_new_zipfile_serialization=False)

    assert sniff(v1.read_bytes()[:SNIFF_BYTES]) is FileKind.V1 and FileKind.V1.verifiable
    assert sniff(zipped.getvalue()[:SNIFF_BYTES]) is FileKind.ZIP_TORCH_SAVE
    assert sniff(pickled.getvalue()[:SNIFF_BYTES]) is FileKind.PICKLE_TORCH_SAVE


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"", "truncated: 0 bytes, not a checkpoint"),
        (b"garbage", "truncated: 7 bytes, not a checkpoint"),
        (b"hello world, not a checkpoint", r"not a checkpoint \(bad magic b'hello wo'\)"),
    ],
)
def test_load_and_inspect_give_the_same_answer(tmp_path: Path, content: bytes, pattern: str) -> None:
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)

    with pytest.raises(asyncckpt.CorruptedCheckpointError, match=pattern) as loaded:
        asyncckpt.load(path)
    with pytest.raises(asyncckpt.CorruptedCheckpointError) as inspected:
        inspect_file(path)
    _, from_prelude = read_prelude(path)

    assert str(loaded.value) == str(inspected.value) == str(from_prelude)
    assert loaded.value.path == inspected.value.path == str(path)
