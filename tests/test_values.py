"""Safe typed values: paths, dtypes, devices, enums, dataclasses and Namespaces, exactly, without pickle."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import pathlib
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt._values import UnresolvedValue
from asyncckpt.errors import CorruptedCheckpointError, UnsupportedValueError
from asyncckpt.format import TypedValue


class Mode(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Color(enum.StrEnum):
    RED = "red"


class Perm(enum.Flag):
    READ = 1
    WRITE = 2


@dataclasses.dataclass(frozen=True)
class Optim:
    name: str
    betas: tuple[float, float] = (0.9, 0.999)


@dataclasses.dataclass
class Config:
    lr: float
    root: pathlib.Path
    mode: Mode
    optim: Optim
    tags: list[str] = dataclasses.field(default_factory=list)
    seen: int = dataclasses.field(default=0, init=False)  # not an __init__ argument: kept too

    def __post_init__(self) -> None:
        self.seen += 1  # runs on construction; loading must not run it again


SAFE: dict[str, Any] = {
    "posix": pathlib.Path("/data/run 1"),
    "pure_windows": pathlib.PureWindowsPath(r"C:\data\run"),
    "pure_posix": pathlib.PurePosixPath("relative/dir"),
    "dtype": torch.bfloat16,
    "complex_dtype": torch.complex64,
    "device": torch.device("cuda", 1),
    "cpu": torch.device("cpu"),
    "enum": Mode.EVAL,
    "int_enum": Level.HIGH,
    "str_enum": Color.RED,
    "flag": Perm.READ | Perm.WRITE,
    "dataclass": Config(3e-4, pathlib.Path("runs"), Mode.TRAIN, Optim("adamw"), ["a"]),
    "namespace": argparse.Namespace(epochs=3, out=pathlib.Path("o"), levels=[Level.LOW], dtype=torch.float16),
    "nested": {"in_a_tuple": (Mode.TRAIN, pathlib.Path("x")), "big": 2**80},
}


def tree_of(path: Path) -> Any:
    with open(path, "rb") as file:
        return fmt.read_layout(file, path).tree


def roundtrip(tmp_path: Path, state: Any) -> Any:
    path = asyncckpt.save(tmp_path / "x.ckpt", state, step=1)
    return asyncckpt.load(path).state


@pytest.mark.parametrize("name", list(SAFE))
def test_a_safe_value_comes_back_as_the_same_type_and_value(tmp_path: Path, name: str) -> None:
    got = roundtrip(tmp_path, {"value": SAFE[name]})["value"]
    assert type(got) is type(SAFE[name])
    assert got == SAFE[name]


def test_a_dataclass_is_rebuilt_field_by_field_without_running_init(tmp_path: Path) -> None:
    config = SAFE["dataclass"]
    assert config.seen == 1
    got = roundtrip(tmp_path, {"config": config})["config"]
    assert got == config and got.seen == 1  # __post_init__ did not run again
    assert type(got.optim) is Optim and got.optim.betas == (0.9, 0.999)


def test_typed_values_live_in_the_header_and_metadata_too(tmp_path: Path) -> None:
    path = asyncckpt.save(tmp_path / "x.ckpt", {"w": torch.ones(2)}, step=1, metadata={"mode": Mode.EVAL})
    assert asyncckpt.load(path).metadata == {"mode": Mode.EVAL}


def test_a_class_the_program_has_not_imported_stays_exact_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = asyncckpt.save(tmp_path / "x.ckpt", {"mode": Mode.EVAL, "config": SAFE["dataclass"]}, step=1)
    monkeypatch.delitem(sys.modules, __name__)  # as in a program that never imported this module
    loaded = asyncckpt.load(path).state
    mode, config = loaded["mode"], loaded["config"]
    assert mode == UnresolvedValue("enum", f"{__name__}:Mode", "EVAL")
    assert isinstance(config, UnresolvedValue) and config.kind == "dataclass"
    assert config.type == f"{__name__}:Config"
    resaved = asyncckpt.save(tmp_path / "again.ckpt", loaded, step=1)  # saves back unchanged
    assert tree_of(resaved) == tree_of(path)


def test_a_class_whose_fields_changed_stays_exact_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = asyncckpt.save(tmp_path / "x.ckpt", {"optim": Optim("sgd")}, step=1)

    @dataclasses.dataclass(frozen=True)
    class Renamed:
        title: str

    monkeypatch.setattr(sys.modules[__name__], "Optim", Renamed)
    got = asyncckpt.load(path).state["optim"]
    assert got == UnresolvedValue("dataclass", f"{__name__}:Optim", {"name": "sgd", "betas": (0.9, 0.999)})


@pytest.mark.parametrize(
    ("kind", "name", "payload"),
    [
        ("enum", "os:system", "echo pwned"),  # a function, not a class: never called
        ("dataclass", "subprocess:Popen", {"args": "echo pwned"}),  # a class, not a dataclass
        ("enum", "not_imported_module_xyz:Mode", "A"),  # never imported
        ("dataclass", f"{__name__}:Config", ["not", "a", "dict"]),
        ("path", "PosixPath", 5),
        ("dtype", "torch.dtype", "nn"),  # torch.nn is no dtype
        ("unknown-kind", "x", None),
    ],
)
def test_a_hostile_typed_value_runs_nothing_and_stays_data(
    tmp_path: Path, kind: str, name: str, payload: Any
) -> None:
    path = asyncckpt.save(tmp_path / "x.ckpt", {"x": UnresolvedValue(kind, name, payload)}, step=1)
    assert asyncckpt.load(path).state["x"] == UnresolvedValue(kind, name, payload)
    assert "not_imported_module_xyz" not in sys.modules


class Opaque:
    pass


def local_dataclass() -> Any:
    @dataclasses.dataclass
    class Local:
        x: int = 1

    return Local()


@pytest.mark.parametrize(
    ("value", "key", "reason"),
    [
        (Opaque(), "state['hp']", "cannot store a value of type Opaque"),
        ({1, 2}, "state['hp']", "cannot store a value of type set"),
        (Optim(torch.ones(1)), "state['hp']['name']", "a tensor inside a typed value"),  # type: ignore[arg-type]
        (
            argparse.Namespace(m=torch.nn.Linear(1, 1)),
            "state['hp']['m']",
            "cannot store a value of type Linear",
        ),
        (local_dataclass(), "state['hp']", "defined inside a function"),
    ],
    ids=["object", "set", "tensor-field", "module-field", "local-class"],
)
def test_anything_else_fails_at_save_with_its_key_and_nothing_is_written(
    tmp_path: Path, value: Any, key: str, reason: str
) -> None:
    with pytest.raises(UnsupportedValueError, match=reason) as caught:
        asyncckpt.save(tmp_path / "x.ckpt", {"hp": value}, step=1)
    assert caught.value.key == key
    assert list(tmp_path.iterdir()) == []


def test_the_codec_keeps_typed_values_and_checks_their_fields() -> None:
    tree = {"a": TypedValue("enum", "m:Mode", "A"), "b": [TypedValue("path", "PosixPath", "/x")]}
    assert fmt.unpack(fmt.pack(tree)) == tree
    for bad in ([1, 2], ["", "t", 1], ["k" * 33, "t", 1], ["k", 5, 1]):
        data = msgpack.packb(msgpack.ExtType(fmt.EXT_TYPED, msgpack.packb(bad)))
        with pytest.raises(ValueError, match="typed value"):
            fmt.unpack(data)


def test_a_tensor_reference_inside_a_typed_value_is_a_corrupted_file(tmp_path: Path) -> None:
    header = fmt.prepare_header(
        step=1,
        metadata={},
        tree={"x": TypedValue("namespace", "argparse.Namespace", {"t": fmt.TensorRef(0)})},
        tensors=[],
        sizes=[],
    )
    assert header is not None  # the writer never builds such a tree; a hostile file may
    path = tmp_path / "x.ckpt"
    with open(path, "wb") as file:
        fmt.write_file(file, header, iter([]))
    with pytest.raises(CorruptedCheckpointError, match="tensor"):
        asyncckpt.load(path)
