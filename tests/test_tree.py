"""_tree.py: key paths, the one walk of state trees, and maps over encoded trees."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from asyncckpt._tree import dotted_key, key_path, leaves_of, map_leaves, renumber_refs, unflatten, walk
from asyncckpt.format import BigInt, TensorRef, TypedValue


def test_key_path_and_dotted_key() -> None:
    assert key_path(("optim", "param_groups", 0, "foo")) == "state['optim']['param_groups'][0]['foo']"
    assert key_path(()) == "state"
    assert key_path((1,), root="metadata") == "metadata[1]"
    assert dotted_key(("model", "layers.3.weight")) == "model.layers.3.weight"
    assert dotted_key(()) == "<root>"


def test_walk_yields_every_leaf_with_its_path_in_order() -> None:
    weight = torch.ones(2)
    tree = {"model": OrderedDict(w=weight, b=None), "groups": [{"lr": 0.1}, (1, [2])], 3: "x"}

    leaves = list(walk(tree))

    assert [path for path, _ in leaves] == [
        ("model", "w"),
        ("model", "b"),
        ("groups", 0, "lr"),
        ("groups", 1, 0),
        ("groups", 1, 1, 0),
        (3,),
    ]
    assert leaves[0][1] is weight and [leaf for _, leaf in leaves[1:]] == [None, 0.1, 1, 2, "x"]


def test_walk_of_a_leaf_and_of_empty_containers() -> None:
    assert list(walk(5)) == [((), 5)]
    assert list(walk(5, ("root",))) == [(("root",), 5)]
    assert list(walk({"a": [], "b": {}, "c": ()})) == []


def test_walk_does_not_look_into_objects() -> None:
    module = torch.nn.Linear(2, 2)
    ref = TensorRef(0)

    assert list(walk({"m": module, "r": [ref]})) == [(("m",), module), (("r", 0), ref)]


def test_walk_survives_nesting_deeper_than_the_recursion_limit() -> None:
    deep: Any = 0
    for _ in range(5000):
        deep = [deep]

    [(path, leaf)] = list(walk(deep))

    assert path == (0,) * 5000 and leaf == 0


def test_leaves_of_an_encoded_tree_are_walk_s_leaves_of_that_kind() -> None:
    typed = TypedValue("path", "pathlib:PurePosixPath", ("a", [TensorRef(9)]))  # a leaf: not looked into
    tree = {
        "model": {"w": TensorRef(0), "b": TensorRef(1, parameter=True)},
        "optim": {"state": {0: {"step": TensorRef(2), "lr": 0.1}}, "param_groups": [{"params": [0]}]},
        3: (TensorRef(3), [], {}, [[TensorRef(4)]], BigInt(1 << 70)),
        "typed": typed,
        "again": TensorRef(0),
    }
    expected = [(path, leaf) for path, leaf in walk(tree) if type(leaf) is TensorRef]

    assert leaves_of(tree, TensorRef) == expected
    assert [path for path, _ in expected][-2:] == [(3, 3, 0, 0), ("again",)]
    assert leaves_of(tree, BigInt) == [((3, 4), BigInt(1 << 70))]
    assert leaves_of(TensorRef(5), TensorRef) == [((), TensorRef(5))]
    assert leaves_of(0.5, TensorRef) == [] and leaves_of([], TensorRef) == []


def test_map_leaves_keeps_container_types() -> None:
    tree = {"a": (1, [2, {"b": 3}]), 4: None}

    out = map_leaves(tree, lambda leaf: leaf * 10 if isinstance(leaf, int) else leaf)

    assert out == {"a": (10, [20, {"b": 30}]), 4: None}
    assert type(out["a"]) is tuple and type(out["a"][1]) is list


def test_renumber_refs() -> None:
    tree = {"x": [TensorRef(0), TensorRef(2)], "y": (TensorRef(1), BigInt(2**70), "s")}

    out = renumber_refs(tree, [0, 0, 1])

    assert out == {"x": [TensorRef(0), TensorRef(1)], "y": (TensorRef(0), BigInt(2**70), "s")}


def test_unflatten_rebuilds_containers() -> None:
    tensors = [torch.ones(1), torch.zeros(1)]
    tree = {"a": (TensorRef(1), [TensorRef(0), BigInt(2**80)]), 3: None}

    out = unflatten(tree, tensors)

    assert out["a"][0] is tensors[1] and out["a"][1][0] is tensors[0]
    assert type(out["a"]) is tuple and out["a"][1][1] == 2**80 and out[3] is None
