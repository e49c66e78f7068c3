"""Conformance suite of the format: exact round-trip (C-01) and version refusal (C-03).

C-02 (rollback past broken checkpoints) belongs to the loader's suite.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt.dtypes import DTYPE_BY_NAME

TrainingObjects = tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]


def save_and_load(directory: Path, state: Any, **kwargs: Any) -> asyncckpt.Checkpoint:
    path = asyncckpt.save(directory / "state.ckpt", state, step=kwargs.pop("step", 7), **kwargs)
    return asyncckpt.load(path)


# --------------------------------------------------------------------------- C-01


def test_c01_roundtrip_exact(
    tmp_dir: Path, rich_state: dict[Any, Any], assert_same_state: Callable[[Any, Any], None]
) -> None:
    loaded = save_and_load(tmp_dir, rich_state, step=12, metadata={"run": "c01", "seed": 1})

    assert (loaded.step, loaded.metadata, loaded.version) == (12, {"run": "c01", "seed": 1}, "1.0")
    assert_same_state(rich_state, loaded.state)
    # Every storable dtype, and every shape kind, came back (not just "whatever was there").
    assert set(loaded.state["tensors"]) == set(DTYPE_BY_NAME) >= {
        "bfloat16", "float8_e4m3fn", "float8_e5m2", "bool", "uint16", "uint32", "uint64", "complex64",
    }  # fmt: skip
    for name, kinds in loaded.state["tensors"].items():
        assert kinds["scalar"].dim() == 0, name
        assert kinds["empty"].shape == (0, 3), name
        assert kinds["transposed"].shape == (5, 3) and kinds["stepped"].shape == (3, 3), name
    # Aliasing survives: tied weights are one object, views of one storage share it again.
    assert loaded.state["tied"]["encoder"] is loaded.state["tied"]["decoder"]
    assert loaded.state["model"]["embed.weight"] is loaded.state["model"]["head.weight"]
    views = loaded.state["views"]
    assert len({view.untyped_storage().data_ptr() for view in views.values()}) == 1
    views["slice"][0] = 1234.5  # base[2]
    assert views["whole"][2].item() == 1234.5
    # Objects restore through their state_dict: Adam after one step has per-parameter state.
    assert set(loaded.state["optim"]["state"]) == {0, 1, 2, 3}
    assert loaded.state["sched"]["last_epoch"] == 1


def test_c01_plain_values_keep_their_exact_types(tmp_dir: Path, rich_state: dict[Any, Any]) -> None:
    plain = save_and_load(tmp_dir, rich_state).state["plain"]

    assert list(plain) == [
        "zebra",
        7,
        "alpha",
        -3,
        "ints",
        "floats",
        "text",
        "bytes",
        "nested",
        2**64 - 1,
        -(2**63),
    ]
    assert plain["ints"][5:7] == [2**70, -(2**70)] and all(type(v) is int for v in plain["ints"])
    assert plain[7] is True and plain["alpha"] is False and plain[-3] == 0 and type(plain[-3]) is int
    assert plain["nested"]["tuple"] == (1, (2, ("three",)), [4.0, None])
    assert type(plain["nested"]["tuple"][1]) is tuple and type(plain["nested"]["tuple"][2]) is list
    assert plain["nested"]["empty"] == ({}, [], ())
    floats = plain["floats"]
    assert floats[4] == float("inf") and floats[5] == float("-inf") and floats[6] != floats[6]
    assert struct.pack("<d", floats[1]) == struct.pack("<d", -0.0)


def test_c01_tied_weights_come_back_as_one_object(tmp_dir: Path, rich_state: dict[Any, Any]) -> None:
    state = save_and_load(tmp_dir, rich_state).state

    assert state["tied"]["encoder"] is state["tied"]["decoder"]
    assert state["model"]["embed.weight"] is state["model"]["head.weight"]
    assert state["model"]["embed.weight"] is not state["model"]["mix.weight"]


def test_c01_views_of_one_storage_share_it_again(tmp_dir: Path, rich_state: dict[Any, Any]) -> None:
    views = save_and_load(tmp_dir, rich_state).state["views"]

    pointers = {name: view.untyped_storage().data_ptr() for name, view in views.items()}
    assert len(set(pointers.values())) == 1, pointers
    assert views["grid"].stride() == (6, 2) and views["slice"].storage_offset() == 2
    views["whole"][3] = -1.0  # element 3 of base: slice[1], grid[0][1]
    assert views["slice"][1].item() == -1.0 and views["grid"][0, 1].item() == -1.0
    views["as_int"][0] = 0  # element 4 of base, reinterpreted: 0 is the bit pattern of 0.0
    assert views["whole"][4].item() == 0.0 and views["slice"][2].item() == 0.0


def test_c01_distinct_storages_stay_distinct(tmp_dir: Path, rich_state: dict[Any, Any]) -> None:
    tensors = save_and_load(tmp_dir, rich_state).state["tensors"]["float32"]

    full, transposed = tensors["full"], tensors["transposed"]
    assert full.untyped_storage().data_ptr() != transposed.untyped_storage().data_ptr()
    before = transposed.clone()
    full.fill_(0)
    assert torch.equal(transposed, before)


def test_c01_module_optimizer_and_scheduler_objects_restore(
    tmp_dir: Path, trained: TrainingObjects, untrained: TrainingObjects
) -> None:
    model, optimizer, scheduler = trained
    loaded = save_and_load(tmp_dir, {"model": model, "optim": optimizer, "sched": scheduler}).state

    fresh_model, fresh_optimizer, fresh_scheduler = untrained
    fresh_model.load_state_dict(loaded["model"])
    fresh_optimizer.load_state_dict(loaded["optim"])
    fresh_scheduler.load_state_dict(loaded["sched"])

    for key, value in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[key], value), key
    assert fresh_model["head"].weight is fresh_model["embed"].weight
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr() == [0.01]
    assert fresh_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    expected_state = optimizer.state_dict()["state"]
    assert len(expected_state) == 4
    for index, slots in expected_state.items():
        for name, value in slots.items():
            assert torch.equal(fresh_optimizer.state_dict()["state"][index][name], value), (index, name)


# --------------------------------------------------------------------------- C-03


def patch_prelude(path: Path, version: str, requires: str) -> None:
    """Replace the prelude of the file at ``path`` by a valid one saying ``version``/``requires``."""
    data = bytearray(path.read_bytes())
    data[: fmt.PRELUDE_SIZE] = fmt.encode_prelude(version, requires)
    path.write_bytes(bytes(data))


def rewrite_header(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Decode the header of the file at ``path``, ``change`` it in place, re-encode header and trailer."""
    data = path.read_bytes()
    header_offset, header_len = struct.unpack_from("<QQ", data, len(data) - fmt.TRAILER_SIZE)
    header = fmt.unpack(data[header_offset : header_offset + header_len])
    change(header)
    raw = fmt.pack(header)
    path.write_bytes(data[:header_offset] + raw + fmt.encode_trailer(header_offset, raw))


@pytest.fixture
def saved(tmp_dir: Path) -> Path:
    return asyncckpt.save(tmp_dir / "step-0000000001.ckpt", {"w": torch.arange(4.0), "n": 1}, step=1)


def test_c03_unsupported_version_error_text(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[8:24] = b"2.0".ljust(16, b"\0")  # version field, ASCII, NUL-padded
    data[24:40] = b"2.0.0".ljust(16, b"\0")  # requires field
    saved.write_bytes(bytes(data))  # the prelude CRC is now stale: the major is judged first

    with pytest.raises(asyncckpt.UnsupportedVersionError) as caught:
        asyncckpt.load(saved)

    assert str(caught.value) == (
        f"{saved}: checkpoint format 2.0 is not supported by asyncckpt 0.1.0 (reads 0.x and 1.x); "
        "it requires asyncckpt >= 2.0.0"
    )
    assert isinstance(caught.value, asyncckpt.IncompatibleCheckpointError)


def test_c03_same_text_with_a_valid_prelude_crc(saved: Path) -> None:
    patch_prelude(saved, "2.0", "2.0.0")

    with pytest.raises(asyncckpt.UnsupportedVersionError, match=r"format 2\.0 is not supported") as caught:
        asyncckpt.load(saved)

    assert str(caught.value).endswith("it requires asyncckpt >= 2.0.0")


@pytest.mark.parametrize("version", ["abc", "1", "1.0.0.0", "v1.0", "", "1.x"])
def test_c03_non_semantic_version_is_unsupported(saved: Path, version: str) -> None:
    patch_prelude(saved, version, "0.1.0")

    with pytest.raises(asyncckpt.UnsupportedVersionError, match="is not a semantic version") as caught:
        asyncckpt.load(saved)

    assert f"{version!r}" in str(caught.value) and "reads 0.x and 1.x" in str(caught.value)


def test_c03_newer_minor_version_loads(saved: Path) -> None:
    patch_prelude(saved, "1.7", "0.3.0")

    def as_written_by_1_7(header: dict[str, Any]) -> None:
        header["version"] = "1.7"
        header["added_in_1_7"] = {"readers": "ignore unknown keys"}

    rewrite_header(saved, as_written_by_1_7)

    loaded = asyncckpt.load(saved)

    assert loaded.version == "1.7" and loaded.step == 1
    assert torch.equal(loaded.state["w"], torch.arange(4.0)) and loaded.state["n"] == 1


def test_c03_prelude_and_header_versions_must_agree(saved: Path) -> None:
    patch_prelude(saved, "1.7", "0.3.0")  # the header still says 1.0

    with pytest.raises(asyncckpt.CorruptedCheckpointError, match="differs from the prelude's '1.7'"):
        asyncckpt.load(saved)
