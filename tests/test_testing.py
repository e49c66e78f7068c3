"""asyncckpt.testing.states_equal: exact comparison, conjugate and negative views by value (P9)."""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any, NamedTuple

import pytest
import torch

from asyncckpt.testing import states_equal


class Pair(NamedTuple):
    a: int
    b: int


def test_a_conjugate_view_equals_its_values_not_its_memory() -> None:
    base = torch.tensor([1 + 2j, 3 - 4j])
    assert states_equal(base.conj(), torch.tensor([1 - 2j, 3 + 4j]))
    assert not states_equal(base.conj(), base)  # same memory, other values
    assert states_equal({"v": base.conj()}, {"v": base.conj().resolve_conj()})


def test_a_negative_view_equals_its_values_not_its_memory() -> None:
    real = torch.tensor([1.0, -2.0])
    assert states_equal(torch._neg_view(real), torch.tensor([-1.0, 2.0]))
    assert not states_equal(torch._neg_view(real), real)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (torch.nn.Parameter(torch.ones(2)), torch.ones(2)),
        (torch.ones(2, requires_grad=True), torch.ones(2)),
        (Pair(1, 2), (1, 2)),
        (Counter(a=1), {"a": 1}),
        (torch.ones(2), torch.ones(2, dtype=torch.float64)),
    ],
)
def test_values_of_another_type_are_not_equal(a: Any, b: Any) -> None:
    assert not states_equal(a, b) and not states_equal(b, a)


def test_an_ordered_dict_equals_a_dict_with_the_same_items_in_order() -> None:
    assert states_equal(OrderedDict(a=1, b=torch.ones(1)), {"a": 1, "b": torch.ones(1)})
    assert not states_equal(OrderedDict(b=1, a=2), {"a": 2, "b": 1})
    assert states_equal(torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2)))
