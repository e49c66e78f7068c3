"""save/walker.py: the fast walk and the careful walk agree on every state the fast one accepts."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncckpt._tree import dotted_key
from asyncckpt.saving.walker import StateDicts, _CarefulWalk, _FastWalk, _Unusual, walk_state

leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=6)
    | st.binary(max_size=6)
    | st.builds(lambda n: torch.arange(float(n)), st.integers(0, 4))
)
keys = st.text(max_size=4) | st.integers(-(2**65), 2**65)
trees = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(keys, inner, max_size=3)
        | st.dictionaries(keys, inner, max_size=3).map(OrderedDict)
    ),
    max_leaves=16,
)


def careful(state: Any) -> tuple[Any, list[torch.Tensor], list[str]]:
    walker = _CarefulWalk(StateDicts().reader())
    tree = walker.walk(state, ())
    return tree, [t for t, _ in walker.found], [dotted_key(p) for _, p in walker.found]


@settings(max_examples=200, deadline=None)
@given(state=trees)
def test_the_fast_walk_builds_what_the_careful_walk_builds(state: Any) -> None:
    try:
        fast = _FastWalk(StateDicts().reader()).run(state)
    except _Unusual:
        return  # e.g. a wide int key: only the careful walk decides
    tree, tensors, names = careful(state)
    assert repr(fast.tree) == repr(tree) and fast.keys == names
    assert [t.data_ptr() for t in fast.tensors] == [t.data_ptr() for t in tensors]


def test_keys_are_dotted_paths_even_with_empty_names() -> None:
    one = torch.ones(1)
    walked = walk_state({"": {"a": one, "": one.clone()}, "b": [one.clone()], "c": one.clone()})
    assert walked.keys == [".a", ".", "b.0", "c"]
    assert walk_state(torch.ones(1)).keys == ["<root>"]


def test_state_dicts_are_replayed_to_a_later_walk() -> None:
    class Counting:
        calls = 0

        def state_dict(self) -> dict[str, int]:
            Counting.calls += 1
            return {"n": Counting.calls}

    state_dicts = StateDicts()
    first = walk_state([Counting(), Counting()], state_dicts)
    second = walk_state([Counting(), Counting()], state_dicts)
    assert first.tree == second.tree == [{"n": 1}, {"n": 2}] and Counting.calls == 2
