"""Generated states of views, conjugate and negative views, Parameters, namedtuples, dict
subclasses and enums: every save loads back exactly, or is refused before writing with
``UnsupportedValueError`` (issue 17, "Silent conversions"); never silently different.

Each state goes through ``asyncckpt.save`` and through an ``AsyncCheckpointer`` twice (the
second save reuses the structure the first laid out, through the fingerprint).
"""

from __future__ import annotations

import enum
import tempfile
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt import AsyncCheckpointer
from asyncckpt.errors import UnsupportedValueError
from asyncckpt.testing import states_equal


class Shade(enum.IntEnum):
    DARK = 1
    LIGHT = 2


class Pair(NamedTuple):
    left: Any
    right: Any


class Settings(dict[str, Any]):
    pass


class Items(list[Any]):
    pass


Refusable = (defaultdict, Items)
Typed = (Pair, Settings)


def _tensor_makers(base: torch.Tensor, complex_base: torch.Tensor) -> list[Callable[[], torch.Tensor]]:
    """Tensors that share memory with the two bases in every way the walker distinguishes."""
    return [
        lambda: base,
        lambda: base[1:3],
        lambda: base.view(2, 3).t(),
        lambda: base[:1].expand(4),
        lambda: torch._neg_view(base),
        lambda: complex_base,
        lambda: complex_base.conj(),
        lambda: torch._neg_view(complex_base.conj()),
        lambda: torch.nn.Parameter(base.clone()),
        lambda: torch.nn.Parameter(base.clone(), requires_grad=False),
        lambda: base.clone().requires_grad_(True),
    ]


@st.composite
def states(draw: st.DrawFn) -> Any:
    base = torch.arange(6.0) - 2.5
    complex_base = torch.tensor([1 + 2j, -3 + 0.5j, 4 - 1j])
    makers = _tensor_makers(base, complex_base)
    tensor = st.integers(0, len(makers) - 1).map(lambda i: makers[i]())
    plain = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=4),
        st.sampled_from(list(Shade)),
    )  # fmt: skip
    keys = st.text(alphabet="abc", min_size=1, max_size=2)

    def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        listed = st.lists(children, max_size=3)
        mapped = st.dictionaries(keys, children, max_size=3)
        return st.one_of(
            listed,
            listed.map(tuple),
            mapped,
            mapped.map(OrderedDict),
            st.tuples(children, children).map(lambda pair: Pair(*pair)),
            mapped.map(Settings),
            mapped.map(lambda items: defaultdict(int, items)),
            listed.map(Items),
        )

    return draw(st.recursive(st.one_of(plain, tensor), containers, max_leaves=8))


def refused(value: Any, in_typed: bool = False) -> bool:
    """Whether the walker must refuse ``value``: a container it cannot rebuild, or a tensor
    inside a typed value (typed values hold plain values only)."""
    if isinstance(value, torch.Tensor):
        return in_typed
    if isinstance(value, Refusable):
        return True
    typed = in_typed or isinstance(value, Typed)
    if isinstance(value, dict):
        return any(refused(v, typed) for v in value.values())
    if isinstance(value, list | tuple):
        return any(refused(v, typed) for v in value)
    return False


def save_twice(directory: Path, state: Any) -> list[Any]:
    with AsyncCheckpointer(directory, keep_last=2) as ckpt:
        for step in (1, 2):
            ckpt.save(step, state).result(timeout=60)
    return [asyncckpt.load(directory / f"step-{step:010d}.ckpt").state for step in (1, 2)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=states())
def test_a_state_loads_back_exactly_or_is_refused(state: Any) -> None:
    wrapped = {"state": state}
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        if refused(state):
            try:
                asyncckpt.save(directory / "x.ckpt", wrapped, step=1)
            except UnsupportedValueError as exc:
                assert (exc.key or "").startswith("state['state']")
            else:
                raise AssertionError("saved a state that cannot load back exactly")
            assert list(directory.iterdir()) == []
            return
        loaded = [asyncckpt.load(asyncckpt.save(directory / "x.ckpt", wrapped, step=1)).state]
        loaded += save_twice(directory / "run", wrapped)
    for each in loaded:
        assert states_equal(each, wrapped)
