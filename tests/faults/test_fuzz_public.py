"""The public entry points fed hostile files, steps, values, tensor kinds and names.

``asyncckpt.load`` returns a checkpoint or raises a ``CheckpointError``; ``load_latest`` over a
directory that also holds a good older checkpoint always resumes (from the hostile file, if it
loads, else from the good one, exactly); ``asyncckpt validate`` and ``asyncckpt inspect`` exit 0,
2 or 3 and never with "unexpected error"; ``asyncckpt.save`` writes a file that loads back equal
or raises a ``UsageError`` before writing.

``restore`` into a live model and Adam, fed hostile optimizer state (every dtype, edge shapes and
strides), either restores an optimizer that steps or falls back to the good checkpoint exactly.
Names that are not UTF-8, legacy files holding values the format has no word for, and roots
that are not containers (findings P1-P5 of issue 17) are in the strategies, and so are the
save-side kinds of P6-P9 (conjugate and negative views beside their base, Parameters, tensors
that require grad, namedtuples, dict subclasses, and the kinds the format refuses).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import crc32c
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt import load_latest
from asyncckpt.catalog import checkpoint_name
from asyncckpt.cli import app
from asyncckpt.dtypes import DTYPE_BY_NAME
from asyncckpt.errors import EXIT_CHECKPOINT, EXIT_OK, EXIT_PARTIAL, UnsupportedValueError, UsageError
from asyncckpt.format import BigInt, TensorRef
from asyncckpt.testing import states_equal

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CI = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
STRESS = settings(CI, max_examples=1500)
GOOD = {"w": torch.arange(4, dtype=torch.float32), "step": 1}
CLI_EXITS = {EXIT_OK, EXIT_PARTIAL, EXIT_CHECKPOINT}


def quiet(*_: object, **__: object) -> None:
    """A ``log`` for load_latest that drops the summary."""


def cli(*args: object) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})


def run_directory(name: bytes = b"run") -> tuple[Path, Path]:
    """A fresh directory (its name given as bytes, as Linux has it) holding a good step 1."""
    base = tempfile.mkdtemp()
    directory = Path(os.fsdecode(os.path.join(os.fsencode(base), name)))
    os.mkdir(directory)
    asyncckpt.save(directory / checkpoint_name(1), GOOD, step=1)
    return Path(base), directory


def judge_everywhere(directory: Path, victim: Path, outcomes: Counter[str], *, cli_too: bool = True) -> None:
    """Every public reader on ``victim`` (the newest file of ``directory``): result or documented error."""
    try:
        asyncckpt.load(victim)
        outcomes["load: loaded"] += 1
    except asyncckpt.CheckpointError:
        outcomes["load: refused"] += 1
    result = load_latest(directory, log=quiet)  # a good step 1 is there: never raises
    if result.path.name == checkpoint_name(1):
        assert result.step == 1 and states_equal(result.state, GOOD)
        outcomes["load_latest: fell back"] += 1
    else:
        outcomes["load_latest: loaded the hostile file"] += 1
    if not cli_too:
        return
    for args in (("validate", directory), ("validate", directory, "--json"), ("inspect", victim)):
        answer = cli(*args)
        assert answer.exit_code in CLI_EXITS, f"{args[0]}: {answer.exit_code}\n{answer.output[-2000:]}"
        assert "unexpected error" not in answer.output, answer.output[-2000:]
        outcomes[f"{args[0]}: exit {answer.exit_code}"] += 1


@pytest.fixture(scope="module")
def outcomes() -> Counter[str]:
    return Counter()


# --------------------------------------------------------------------------- hostile v1 files

EDGES = [0, 1, 2, 3, 255, 2**31, 2**32, 2**61, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
ints = st.sampled_from(EDGES) | st.integers(0, 8)
odd_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=12),  # control characters, bidi overrides, line separators included
    st.binary(max_size=12),
    st.integers(-(2**8000), 2**8000).map(BigInt),
    st.just("\x1b[31mred\x1b[0m\n\u2028\u202e"),
)
trees = st.recursive(
    odd_values | st.builds(TensorRef, st.just(0), st.booleans(), st.booleans()),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=6) | st.integers(-(2**63), 2**64 - 1), children, max_size=4)
    ),
    max_leaves=10,
)
# The root may be a dict, a list, or the lone tensor itself (finding P5).
roots = st.one_of(
    st.dictionaries(st.text(max_size=6), trees, max_size=4).map(lambda d: {**d, "w": TensorRef(0)}),
    st.lists(trees, max_size=3).map(lambda items: [TensorRef(0), *items]),
    st.just(TensorRef(0)),
)


@st.composite
def hostile_v1_files(draw: st.DrawFn) -> bytes:
    ndim = draw(st.integers(0, 4))
    row = [
        "w",
        draw(st.sampled_from(sorted(DTYPE_BY_NAME))),
        draw(st.lists(ints, min_size=ndim, max_size=ndim)),
        draw(st.lists(ints, min_size=ndim, max_size=ndim)),
        0,
        draw(st.sampled_from([0, 0, 8, 16])),
    ]
    data = bytes(range(64))
    fields: dict[str, Any] = {
        "format": "asyncckpt",
        "version": "1.0",
        "status": "complete",
        "step": draw(st.sampled_from([2, 2, 0, 1, 3, 2**63 - 1])),
        "created": "2026-01-01T00:00:00.000000+00:00",
        "writer": draw(st.text(max_size=20)),
        "metadata": draw(st.dictionaries(st.text(max_size=6), trees, max_size=3)),
        "blobs": [[4096, len(data), crc32c.crc32c(data)]],
        "tensors": [row],
        "tree": draw(roots),
    }
    raw = fmt.pack(fields)
    body = fmt.encode_prelude() + bytes(4096 - 64) + data
    return body + raw + fmt.encode_trailer(len(body), raw)


def judge_v1_file(data: bytes, outcomes: Counter[str], faults: Counter[str]) -> None:
    base, directory = run_directory()
    try:
        victim = directory / checkpoint_name(2)
        victim.write_bytes(data)
        judge_everywhere(directory, victim, outcomes)
    finally:
        shutil.rmtree(base)
    faults["public fuzz: hostile v1 files"] += 1


@CI
@given(data=hostile_v1_files())
def test_hostile_v1_files(data: bytes, outcomes: Counter[str], faults: Counter[str]) -> None:
    judge_v1_file(data, outcomes, faults)


@pytest.mark.stress
@STRESS
@given(data=hostile_v1_files())
def test_hostile_v1_files_stress(data: bytes, outcomes: Counter[str], faults: Counter[str]) -> None:
    judge_v1_file(data, outcomes, faults)


def test_the_reviewed_overflowing_shape_falls_back(tmp_dir: Path) -> None:
    # Issue item 8 end to end: a shape [2**62, 2**62, 0] with consistent checksums.
    asyncckpt.save(tmp_dir / checkpoint_name(1), GOOD, step=1)
    data = bytes(16)
    fields = {
        "format": "asyncckpt",
        "version": "1.0",
        "status": "complete",
        "step": 2,
        "created": "2026-01-01T00:00:00.000000+00:00",
        "writer": "hand-made",
        "metadata": {},
        "blobs": [[4096, 16, crc32c.crc32c(data)]],
        "tensors": [["w", "float32", [2**62, 2**62, 0], [1, 1, 1], 0, 0]],
        "tree": {"w": TensorRef(0)},
    }
    raw = fmt.pack(fields)
    body = fmt.encode_prelude() + bytes(4096 - 64) + data
    (tmp_dir / checkpoint_name(2)).write_bytes(body + raw + fmt.encode_trailer(len(body), raw))

    with pytest.raises(asyncckpt.CorruptedCheckpointError, match="beyond"):
        asyncckpt.load(tmp_dir / checkpoint_name(2))
    result = load_latest(tmp_dir, log=quiet)
    assert result.step == 1 and [Path(d.path).name for d in result.diagnostics] == [checkpoint_name(2)]
    answer = cli("validate", tmp_dir)
    assert answer.exit_code == EXIT_PARTIAL and "a resume would load step 1" in answer.stdout


# --------------------------------------------------------------------------- hostile legacy files


def legacy_tensors() -> dict[str, Callable[[], torch.Tensor]]:
    return {
        "nested": lambda: torch.nested.nested_tensor([torch.zeros(2), torch.ones(3)]),
        "sparse": lambda: torch.eye(3).to_sparse(),
        "sparse csr": lambda: torch.eye(3).to_sparse_csr(),
        "quantized": lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8),
        "dense": lambda: torch.arange(6.0).reshape(2, 3),
        "0-d": lambda: torch.tensor(3),
        "empty": lambda: torch.empty(0, 5),
        "transposed": lambda: torch.arange(6.0).reshape(2, 3).t(),
        "expanded": lambda: torch.zeros(1).expand(1000),
        "complex": lambda: torch.tensor([1 + 2j]),
        "conj view": lambda: torch.tensor([1 + 2j]).conj(),
        "float8": lambda: torch.zeros(2, dtype=torch.float8_e4m3fn),
        "bool": lambda: torch.tensor([True, False]),
        "parameter": lambda: torch.nn.Parameter(torch.ones(2)),
    }


legacy_steps = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.sampled_from(["step", "global_step"]).map(lambda _: None),
    st.builds(torch.tensor, st.integers(-(2**63), 2**63 - 1)),
    st.builds(torch.tensor, st.floats(allow_nan=True)),
    st.just(torch.tensor([1, 2])),
    st.just(torch.tensor(1 + 2j)),
    st.just(torch.tensor(True)),
    st.just(torch.tensor([4]).to_sparse()),
)
# Values weights_only loads and the v1 format has no word for (complex numbers, sets), and dict
# keys of every kind, text that is not valid UTF-8 included (finding P4).
surrogates = st.text(st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF), min_size=1, max_size=3)
legacy_keys = st.one_of(
    st.text(max_size=4),
    st.integers(),
    surrogates,
    st.binary(max_size=3),
    st.tuples(st.integers(0, 3)),
    st.none(),
    st.floats(allow_nan=False),
)
legacy_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=6)
    | st.binary(max_size=6)
    | st.complex_numbers(allow_nan=True)
    | st.sets(st.integers(0, 9), max_size=3),
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(legacy_keys, children, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def hostile_legacy_files(draw: st.DrawFn) -> tuple[bytes, str]:
    kinds = legacy_tensors()
    payload: Any = {
        name: kinds[name]()
        for name in draw(st.lists(st.sampled_from(sorted(kinds)), max_size=3, unique=True))
    }
    payload["extra"] = draw(legacy_values)
    key = draw(st.sampled_from(["step", "global_step"]))
    step = draw(legacy_steps)
    if step is not None:
        payload[key] = step
    if draw(st.integers(0, 5)) == 0:  # a root that is not a dict (finding P5)
        payload = draw(st.sampled_from([torch.ones(2), 7, None, [torch.ones(1)], "text"]))
    buffer = io.BytesIO()
    torch.save(payload, buffer, _use_new_zipfile_serialization=draw(st.booleans()))
    name = draw(
        st.sampled_from(
            ["model.pt", "model-12.pt", "ckpt_99999999999999999999.pt", "x.pth", "é-3.pt", "m\udcff-4.pt"]
        )
    )
    return buffer.getvalue(), name


@CI
@given(file=hostile_legacy_files())
def test_hostile_legacy_files(file: tuple[bytes, str], outcomes: Counter[str], faults: Counter[str]) -> None:
    data, name = file
    base, directory = run_directory()
    try:
        victim = directory / name
        victim.write_bytes(data)
        judge_everywhere(directory, victim, outcomes)
    finally:
        shutil.rmtree(base)
    faults["public fuzz: hostile legacy files"] += 1


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name", [b"run", "r\u00e9sum\u00e9 \u2603".encode(), b"with space", b"-dash", b"x" * 200]
)
def test_directory_names(name: bytes, outcomes: Counter[str]) -> None:
    base, directory = run_directory(name)
    try:
        victim = directory / checkpoint_name(2)
        victim.write_bytes(b"ASYNCKPT" + bytes(100))  # a broken newest checkpoint
        judge_everywhere(directory, victim, outcomes)
        answer = cli("ls", directory)
        assert answer.exit_code in CLI_EXITS and "unexpected error" not in answer.output
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("name", [b"run-\xff", b"r\xe9sum\xe9", b"\x80\x81"])
def test_directory_names_that_are_not_utf8(
    name: bytes, outcomes: Counter[str], capsys: pytest.CaptureFixture[str]
) -> None:
    base, directory = run_directory(name)
    try:
        victim = directory / checkpoint_name(2)
        victim.write_bytes(b"ASYNCKPT" + bytes(100))  # a broken newest checkpoint
        judge_everywhere(directory, victim, outcomes)
        # The fallback reports through structlog's default logger too (finding P1).
        result = load_latest(directory)
        assert result.step == 1 and result.source == "fallback"
        assert "\\x" in capsys.readouterr().out
        for args in (("ls", directory), ("logs", directory), ("inspect", directory / checkpoint_name(1))):
            answer = cli(*args)
            assert answer.exit_code in CLI_EXITS | {1}, answer.output
            assert "unexpected error" not in answer.output and "Traceback" not in answer.output
    finally:
        shutil.rmtree(base)


# --------------------------------------------------------------------------- restore: hostile optimizer state


def good_objects() -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


@st.composite
def hostile_optimizer_files(draw: st.DrawFn) -> bytes:
    """A Linear(4, 2) + Adam checkpoint whose weight's state tensors are hostile rows."""
    _, optimizer = good_objects()
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    data = bytes(range(256))
    home = {"step": 40, "exp_avg": 64, "exp_avg_sq": 128}  # where each fits without sharing bytes
    rows: list[list[Any]] = [
        ["model.weight", "float32", [2, 4], [4, 1], 0, 0],
        ["model.bias", "float32", [2], [1], 0, 32],
    ]
    state: dict[str, Any] = {}
    # Every key Adam needs is there: a per-parameter state that lacks one restores and then fails
    # in optimizer.step() (a limit in docs/RELIABILITY.md: keys are not checked, tensors are).
    for key in ("step", "exp_avg", "exp_avg_sq"):
        ndim = draw(st.integers(0, 3))
        shape = draw(st.lists(st.sampled_from([0, 1, 2, 4, 8, 2**20, 2**28]), min_size=ndim, max_size=ndim))
        stride = draw(st.lists(st.sampled_from([0, 0, 1, 4]), min_size=ndim, max_size=ndim))
        dtype = draw(st.sampled_from(sorted(DTYPE_BY_NAME)))
        offset = draw(st.sampled_from([0, 8, home[key]]))
        if draw(st.integers(0, 3)) > 0:  # the shape Adam has, a float, any strides: some restore
            shape = [] if key == "step" else [2, 4]
            stride = [] if key == "step" else draw(st.sampled_from([[4, 1]] * 3 + [[0, 0], [0, 1], [1, 0]]))
            dtype = draw(st.sampled_from(["float32", "float64", "float16", "bfloat16"]))
            offset = home[key] if draw(st.integers(0, 7)) else 0
        state[key] = TensorRef(len(rows))
        rows.append([f"optimizer.state.0.{key}", dtype, shape, stride, 0, offset])
    tree = {
        "model": {"weight": TensorRef(0), "bias": TensorRef(1)},
        "optimizer": {"state": {0: state}, "param_groups": [{**group, "params": [0, 1]}]},
    }
    fields: dict[str, Any] = {
        "format": "asyncckpt",
        "version": "1.0",
        "status": "complete",
        "step": 2,
        "created": "2026-01-01T00:00:00.000000+00:00",
        "writer": "fuzz",
        "metadata": {},
        "blobs": [[4096, len(data), crc32c.crc32c(data)]],
        "tensors": rows,
        "tree": tree,
    }
    raw = fmt.pack(fields)
    body = fmt.encode_prelude() + bytes(4096 - 64) + data
    return body + raw + fmt.encode_trailer(len(body), raw)


def judge_optimizer_file(data: bytes, outcomes: Counter[str], faults: Counter[str]) -> None:
    base = Path(tempfile.mkdtemp())
    try:
        model, optimizer = good_objects()
        asyncckpt.save(base / checkpoint_name(1), {"model": model, "optimizer": optimizer}, step=1)
        (base / checkpoint_name(2)).write_bytes(data)
        live, live_optimizer = good_objects()
        with torch.no_grad():
            live.weight.fill_(9.0)
        result = asyncckpt.restore(base, {"model": live, "optimizer": live_optimizer}, log=quiet)
        if result.step == 1:
            assert torch.equal(live.weight, model.weight)
            outcomes["restore: fell back"] += 1
        else:
            outcomes["restore: restored the hostile state"] += 1
        for state in live_optimizer.state.values():  # nothing bigger than the parameter got in
            assert all(
                t.numel() <= live.weight.numel() for t in state.values() if isinstance(t, torch.Tensor)
            )
        live(torch.randn(3, 4)).sum().backward()
        live_optimizer.step()  # the optimizer restore left behind steps
    finally:
        shutil.rmtree(base)
    faults["public fuzz: hostile optimizer state"] += 1


@CI
@given(data=hostile_optimizer_files())
def test_restore_of_hostile_optimizer_state(
    data: bytes, outcomes: Counter[str], faults: Counter[str]
) -> None:
    judge_optimizer_file(data, outcomes, faults)


@pytest.mark.stress
@STRESS
@given(data=hostile_optimizer_files())
def test_restore_of_hostile_optimizer_state_stress(
    data: bytes, outcomes: Counter[str], faults: Counter[str]
) -> None:
    judge_optimizer_file(data, outcomes, faults)


# --------------------------------------------------------------------------- saving tensor kinds and values


class FuzzPoint(NamedTuple):
    x: int
    y: str


class FuzzConfig(dict[str, Any]):
    pass


def _conj_beside_base() -> dict[str, torch.Tensor]:
    base = torch.tensor([1 + 2j, 3 - 4j])
    return {"base": base, "conj": base.conj(), "neg": torch._neg_view(base)}


def savable_kinds() -> dict[str, Callable[[], Any]]:
    # 2**40 elements of an expand() (4 bytes in the file) are in tests/saving/test_exact_values.py:
    # comparing them element by element here would take minutes.
    return {
        "dense": lambda: torch.arange(6.0).reshape(2, 3),
        "0-d": lambda: torch.tensor(3),
        "empty": lambda: torch.empty(0, 5),
        "transposed": lambda: torch.arange(6.0).reshape(2, 3).t(),
        "expanded": lambda: torch.arange(3.0)[:1].expand(100),
        "expanded to 2**20": lambda: torch.tensor([2.5]).expand(4, 2**18),
        "slice of a shared storage": lambda: torch.arange(10.0)[2:7:2],
        "complex32": lambda: torch.zeros(3, dtype=torch.complex32),
        "conj view": lambda: torch.tensor([1 + 2j, 3 - 4j]).conj(),
        "neg view": lambda: torch._neg_view(torch.tensor([1.0, -2.0])),
        "conj and neg views beside their base": _conj_beside_base,
        "parameter": lambda: torch.nn.Parameter(torch.ones(2)),
        "frozen parameter": lambda: torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "requires grad": lambda: torch.ones(2, requires_grad=True),
        "namedtuple": lambda: FuzzPoint(1, "a"),
        "dict subclass": lambda: FuzzConfig(lr=0.1, size=torch.Size([2, 3])),
        "float8": lambda: torch.zeros(2, dtype=torch.float8_e5m2),
        "bits8": lambda: torch.zeros(2, dtype=torch.bits8),
        "uint64": lambda: torch.tensor([2**63 + 1], dtype=torch.uint64),
        "bool": lambda: torch.tensor([True, False]),
        "64 dims": lambda: torch.zeros([1] * 64),
        "big int": lambda: 2**8000,
        "text": lambda: "\x00\u2028\U0001f600",
    }


@pytest.mark.parametrize("kind", sorted(savable_kinds()))
def test_saving_tensor_kinds_and_values(kind: str, tmp_dir: Path) -> None:
    value = savable_kinds()[kind]()
    state = {"x": value, "again": value}
    path = asyncckpt.save(tmp_dir / "x.ckpt", state, step=1)

    loaded = asyncckpt.load(path).state

    assert states_equal(loaded, state)  # conj/neg views by value, Parameters and types exactly
    if isinstance(value, torch.Tensor) and value.numel():  # empty tensors: finding P8
        assert loaded["x"] is loaded["again"]


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        ("sparse", lambda: torch.eye(2).to_sparse()),
        ("quantized", lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)),
        ("meta", lambda: torch.empty(2, device="meta")),
        ("nested", lambda: torch.nested.nested_tensor([torch.ones(1), torch.ones(2)])),
        ("namedtuple of tensors", lambda: FuzzPoint(torch.ones(1), "a")),  # type: ignore[arg-type]
        ("defaultdict", lambda: defaultdict(int)),
    ],
)
def test_saving_what_cannot_load_back_exactly_is_refused_with_its_key(
    kind: str, make: Callable[[], Any], tmp_dir: Path
) -> None:
    with pytest.raises(UnsupportedValueError) as caught:
        asyncckpt.save(tmp_dir / "x.ckpt", {"m": [make()]}, step=1)
    assert (caught.value.key or "").startswith("state['m'][0]"), kind
    assert list(tmp_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("state", "step", "error"),
    [
        ({"x": 2**8192}, 1, "an int of 8193 bits exceeds the limit"),
        ({"x": [[] for _ in range(20_000)]}, 1, "lists, tuples, dicts"),
        ({}, -1, "step must be in"),
        ({}, 2**63, "step must be in"),
        ({}, True, "step must be an int"),
        ({}, "3", "step must be an int"),
        ({"x": torch.zeros(1).expand(2**61)}, 1, "beyond 9223372036854775807"),
    ],
)
def test_saving_what_the_format_cannot_hold_is_a_usage_error(
    state: Any, step: Any, error: str, tmp_dir: Path
) -> None:
    with pytest.raises(UsageError, match=error):
        asyncckpt.save(tmp_dir / "x.ckpt", state, step=step)
    assert list(tmp_dir.iterdir()) == []


def test_outcomes(outcomes: Counter[str], faults: Counter[str]) -> None:
    # Runs after the module's fuzz (file order): both kinds of outcome were reached.
    if not outcomes:
        pytest.skip("run with the rest of the module")
    assert outcomes["load: refused"] and outcomes["load: loaded"], outcomes
    for kind, count in outcomes.items():
        faults[f"public fuzz outcome: {kind}"] += count
