"""The commands on odd inputs: names that are not UTF-8, legacy files holding values the format
has no word for, checkpoints whose root is not a container (findings P3, P4, P5 of issue 17).

Typer's runner writes to a strict UTF-8 stream, as a pipe under ``PYTHONIOENCODING=utf-8`` does:
a lone surrogate in the output raised UnicodeEncodeError (exit 1, "unexpected error").
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt.catalog import checkpoint_name
from asyncckpt.errors import EXIT_CHECKPOINT, EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL
from asyncckpt.events import EventLog

from .helpers import run, state


@pytest.fixture
def odd_dir(tmp_path: Path) -> Path:
    """``run-\\xff`` (not UTF-8) with a good step 1, a broken step 2 and an events file."""
    directory = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"run-\xff")))
    directory.mkdir()
    asyncckpt.save(directory / checkpoint_name(1), state(1), step=1)
    (directory / checkpoint_name(2)).write_bytes(b"ASYNCKPT" + bytes(100))
    log = EventLog(directory / "events.jsonl")
    log.info("checkpoint.writer.started", directory=str(directory))
    log.close()
    return directory


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("ls",), EXIT_OK),
        (("validate",), EXIT_PARTIAL),
        (("validate", "--verify", "structure"), EXIT_PARTIAL),
        (("logs",), EXIT_OK),
    ],
)
def test_a_directory_name_that_is_not_utf8_is_printed_escaped(
    odd_dir: Path, args: tuple[str, ...], code: int
) -> None:
    answer = run(args[0], odd_dir, *args[1:])
    assert answer.exit_code == code, answer.output
    assert "run-\\xff" in answer.output and "unexpected error" not in answer.output


def test_inspect_of_a_file_in_it(odd_dir: Path) -> None:
    answer = run("inspect", odd_dir / checkpoint_name(1))
    assert answer.exit_code == EXIT_OK, answer.output
    assert "run-\\xff" in answer.output


def test_an_error_naming_it(odd_dir: Path) -> None:
    answer = run("inspect", odd_dir / checkpoint_name(2))
    assert answer.exit_code == EXIT_CHECKPOINT
    assert "run-\\xff" in answer.output and "unexpected error" not in answer.output


def test_json_keeps_the_real_name(odd_dir: Path) -> None:
    answer = run("validate", odd_dir, "--json")
    document = json.loads(answer.stdout)
    assert document["path"] == str(odd_dir)  # json escapes the lone surrogate: the path round-trips
    assert os.fsencode(document["path"]).endswith(b"run-\xff")


def test_a_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / os.fsdecode(b"model-\xfe-3.pt"))
    for command in ("ls", "validate"):
        answer = run(command, tmp_path)
        assert answer.exit_code == EXIT_OK, answer.output
        assert "model-\\xfe-3.pt" in answer.output


def legacy(directory: Path, payload: Any, name: str = "model-5.pt") -> Path:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    (directory / name).write_bytes(buffer.getvalue())
    return directory / name


ODD_VALUES = {
    "set": ({"s": {1, 2}, "step": 5}, "{1, 2}"),
    "complex": ({"c": 1 + 2j, "step": 5}, "(1+2j)"),
    "bytes key": ({b"\xff": 1, "step": 5}, "[b'\\xff']"),
    "tuple key": ({(1, 2): 3, "step": 5}, "[(1, 2)]"),
    "None and float keys": ({None: 4, 1.5: 2, "step": 5}, "[None]"),
    "surrogate key": ({"\udcff": 1, "step": 5}, "\\xff"),
    "sparse tensor": ({"s": torch.eye(3).to_sparse(), "step": 5}, "float32 (sparse_coo)"),
    "nested tensor": (
        {"n": torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)]), "step": 5},
        "nested",
    ),
    "quantized tensor": (
        {"q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8), "step": 5},
        "qint8",
    ),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", sorted(ODD_VALUES))
def test_inspect_shows_what_a_legacy_file_holds(tmp_path: Path, kind: str) -> None:
    payload, shown = ODD_VALUES[kind]
    path = legacy(tmp_path, payload)

    answer = run("inspect", path)
    as_json = run("inspect", path, "--json")

    assert answer.exit_code == EXIT_OK, answer.output
    assert shown in answer.output
    assert as_json.exit_code == EXIT_OK and json.loads(as_json.stdout)["step"] == 5


def test_inspect_json_marks_a_value_shown_by_its_repr(tmp_path: Path) -> None:
    path = legacy(tmp_path, {"s": {1, 2}, "step": 5})
    tree = json.loads(run("inspect", path, "--json").stdout)["tree"]
    assert tree["s"] == {"repr": "{1, 2}", "type": "set"}


def test_a_value_weights_only_refuses_is_a_checkpoint_problem(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"o": frozenset([1]), "step": 5}, buffer)
    path = tmp_path / "model-5.pt"
    path.write_bytes(buffer.getvalue())
    answer = run("inspect", path)
    assert answer.exit_code == EXIT_CHECKPOINT and "weights_only" in answer.output
    assert "\x1b[" not in answer.output  # torch's message carries terminal escapes: not ours to print


class Holder:
    """An object restore loads into."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)


ROOTS = {
    "a tensor": torch.arange(3.0),
    "an int": 5,
    "None": None,
    "a list": [torch.ones(1), 2],
    "a string": "text",
}


@pytest.mark.parametrize("root", sorted(ROOTS))
@pytest.mark.parametrize("kind", ["v1", "legacy"])
def test_a_root_that_is_not_a_dict_gets_a_clean_answer_everywhere(
    tmp_path: Path, root: str, kind: str
) -> None:
    asyncckpt.save(tmp_path / checkpoint_name(1), state(1), step=1)
    if kind == "v1":
        path = asyncckpt.save(tmp_path / checkpoint_name(2), ROOTS[root], step=2)
    else:
        path = legacy(tmp_path, ROOTS[root], "model-2.pt")

    assert asyncckpt.load(path).step == 2
    assert asyncckpt.load_latest(tmp_path, log=lambda *a, **k: None).step == 2
    holder = Holder()
    result = asyncckpt.restore(tmp_path, {"model": holder}, log=lambda *a, **k: None)
    assert result.step == 1 and result.diagnostics[0].kind == "incompatible"
    assert torch.equal(holder.state["weight"], state(1)["model"]["weight"])
    for args in (("validate", tmp_path), ("inspect", path), ("inspect", path, "--json")):
        answer = run(*args)
        assert answer.exit_code == EXIT_OK, answer.output
    if root == "a tensor":
        assert "1 tensor" in run("inspect", path).output


@pytest.mark.parametrize(
    "step",
    [
        torch.tensor(1 + 2j),
        torch.tensor(-3),
        torch.tensor(True),
        torch.tensor([7]).to_sparse(),
        torch.quantize_per_tensor(torch.ones(1), 0.1, 0, torch.qint8),
    ],
    ids=["complex", "negative", "bool", "sparse", "quantized"],
)
def test_a_legacy_step_that_is_no_step_is_ignored(tmp_path: Path, step: torch.Tensor) -> None:
    # Complex: int(complex) raised TypeError in load, load_latest and inspect.
    asyncckpt.save(tmp_path / checkpoint_name(1), state(1), step=1)
    path = legacy(tmp_path, {"step": step, "w": torch.ones(1)}, "model.pt")
    assert asyncckpt.load(path).step == -1  # no step
    assert asyncckpt.load_latest(tmp_path, log=lambda *a, **k: None).step == 1
    answer = run("validate", tmp_path)
    assert answer.exit_code == EXIT_PARTIAL and "without a step" in answer.output
    assert run("inspect", path).exit_code == EXIT_OK


def test_a_nested_step_tensor_is_ignored(tmp_path: Path) -> None:
    nested = torch.nested.nested_tensor([torch.tensor([1])])
    path = legacy(tmp_path, {"step": nested}, "model-4.pt")
    assert asyncckpt.load(path).step == 4  # from the name
    assert run("inspect", path).exit_code == EXIT_OK


def test_exit_failure_is_still_for_usage(tmp_path: Path) -> None:
    assert run("inspect", tmp_path / "missing.ckpt").exit_code == EXIT_FAILURE
