"""format.legacy: recognising, verifying and loading pre-versioned ``torch.save`` files.

Zip ``torch.save`` files carry a CRC32 per member: :func:`verify_zip_members` checks every one
of them without unpickling anything, so a flipped byte in tensor data is caught. Raw-pickle
files carry no checksum and are reported as not verifiable.
"""

from __future__ import annotations

import functools
import io
import pickle
import struct
import zipfile
from pathlib import Path, PurePath
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt.format import FileKind, sniff
from asyncckpt.format.legacy import (
    is_zip_torch_save,
    legacy_step,
    load_legacy,
    looks_like_torch_save,
    verifiable,
    verify_zip_members,
)


def legacy_state() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(7)
    return {
        "step": 12,
        "model": {"w": torch.randn(64, 32, generator=generator), "b": torch.arange(10)},
        "empty": torch.empty(0),
        "note": "hello",
    }


@functools.cache
def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(legacy_state(), buffer)
    return buffer.getvalue()


@functools.cache
def pickle_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(legacy_state(), buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def member_spans(data: bytes) -> dict[str, range]:
    """Each non-empty member's data bytes (after its local header), by member name."""
    spans = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
            start = info.header_offset + 30 + name_len + extra_len
            if info.compress_size:
                spans[info.filename] = range(start, start + info.compress_size)
    return spans


# --------------------------------------------------------------------------- recognising


def test_kinds_of_torch_save_files() -> None:
    zipped, pickled = zip_bytes(), pickle_bytes()

    assert is_zip_torch_save(zipped) and looks_like_torch_save(zipped) and verifiable(zipped)
    assert not is_zip_torch_save(pickled) and looks_like_torch_save(pickled) and not verifiable(pickled)
    assert sniff(zipped[:8]) is FileKind.ZIP_TORCH_SAVE and FileKind.ZIP_TORCH_SAVE.verifiable
    assert sniff(pickled[:8]) is FileKind.PICKLE_TORCH_SAVE and not FileKind.PICKLE_TORCH_SAVE.verifiable
    assert not looks_like_torch_save(b"ASYNCKPT") and not verifiable(b"ASYNCKPT")


# --------------------------------------------------------------------------- verifying


def test_an_intact_zip_file_verifies_every_member() -> None:
    data = zip_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = len(archive.infolist())

    assert verify_zip_members(io.BytesIO(data), path="m.pt") == members
    assert members >= 4  # data.pkl, byteorder, version, the tensors' storages, ...
    assert {name.rsplit("/", 1)[-1] for name in member_spans(data)} >= {"data.pkl", "0", "1"}


def test_verification_never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("verification unpickled something")

    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)

    assert verify_zip_members(io.BytesIO(zip_bytes())) > 0


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_a_flipped_byte_in_any_member_is_detected(data: st.DataObject) -> None:
    original = zip_bytes()
    spans = member_spans(original)
    member = data.draw(st.sampled_from(sorted(spans)), label="member")
    position = data.draw(st.sampled_from(spans[member]), label="position")
    flip = data.draw(st.integers(1, 255), label="xor")
    damaged = bytearray(original)
    damaged[position] ^= flip

    with pytest.raises(asyncckpt.CorruptedCheckpointError) as caught:
        verify_zip_members(io.BytesIO(bytes(damaged)), path="run/model.pt")

    error = caught.value
    assert type(error) is asyncckpt.CorruptedCheckpointError
    assert f"checksum mismatch in legacy torch.save member {member!r}" in error.reason
    assert error.path == "run/model.pt" and str(error).startswith("run/model.pt: ")
    with zipfile.ZipFile(io.BytesIO(original)) as archive:
        assert error.offset == archive.getinfo(member).header_offset


def test_a_flip_in_tensor_data_loads_silently_but_fails_verification(tmp_path: Path) -> None:
    # The reason verification exists: torch.load itself does not check the CRCs.
    data = bytearray(zip_bytes())
    name = next(n for n in member_spans(bytes(data)) if n.endswith("/data/0"))
    data[member_spans(bytes(data))[name][5]] ^= 0x40
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(data))

    loaded = load_legacy(path)
    assert not torch.equal(loaded["model"]["w"], legacy_state()["model"]["w"])
    with open(path, "rb") as file, pytest.raises(asyncckpt.CorruptedCheckpointError, match=name):
        verify_zip_members(file, path=path)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.99])
def test_a_truncated_zip_file_is_refused(cut: float) -> None:
    data = zip_bytes()

    with pytest.raises(asyncckpt.CorruptedCheckpointError, match="legacy torch.save") as caught:
        verify_zip_members(io.BytesIO(data[: int(len(data) * cut)]), path="t.pt")

    assert caught.value.path == "t.pt"


def test_a_file_that_is_not_a_zip_is_refused() -> None:
    with pytest.raises(asyncckpt.CorruptedCheckpointError, match="not a readable zip archive"):
        verify_zip_members(io.BytesIO(pickle_bytes()))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_damage_anywhere_never_escapes_as_another_error(data: st.DataObject) -> None:
    original = zip_bytes()
    start = data.draw(st.integers(0, len(original) - 1), label="start")
    junk = data.draw(st.binary(min_size=1, max_size=32), label="junk")
    damaged = (original[:start] + junk + original[start + len(junk) :])[: len(original)]
    try:
        verify_zip_members(io.BytesIO(damaged))
    except asyncckpt.CorruptedCheckpointError:
        return  # detected (any other exception fails the test)
    # Passed: then no byte of any member's data changed (headers and padding carry no CRC).
    changed = [i for i in range(start, min(start + len(junk), len(original))) if damaged[i] != original[i]]
    assert not any(i in span for span in member_spans(original).values() for i in changed)


# --------------------------------------------------------------------------- loading


def test_load_legacy_refusal_carries_the_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(zip_bytes()[:100])

    with pytest.raises(asyncckpt.CorruptedCheckpointError) as caught:
        load_legacy(path)

    assert caught.value.path == str(path)
    assert caught.value.reason.startswith("legacy torch.save file refused (weights_only=True): ")
    assert str(caught.value) == f"{path}: {caught.value.reason}"


@pytest.mark.parametrize(
    ("state", "name", "step"),
    [
        ({"step": 5}, "x_9.pt", 5),
        ({"global_step": torch.tensor(6)}, "x_9.pt", 6),
        ({"step": -1}, "x_9.pt", 9),
        ({"step": True}, "run-3-x_9.pt", 9),
        ({"step": torch.tensor(1.5)}, "nothing.pt", None),
        (None, "ckpt_500.pth", 500),
    ],
)
def test_legacy_step(state: Any, name: str, step: int | None) -> None:
    assert legacy_step(state, PurePath(name)) == step
