"""What loads back is what was saved, or the save is refused before writing (issue 17).

Every test runs through both entry points, ``AsyncCheckpointer.save`` and ``asyncckpt.save``:
conjugate and negative views keep their values beside their base (P6), Parameters and tensors
that require grad come back as such, namedtuples and dict subclasses keep their type, and the
tensor kinds the format cannot hold are refused with the key named (P7).
"""

from __future__ import annotations

import collections
import sys
import types
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

import asyncckpt
from asyncckpt import AsyncCheckpointer, UnresolvedValue
from asyncckpt.errors import StateTooLargeError, UnsupportedValueError


class Point(NamedTuple):
    x: int
    y: float


OldPoint = collections.namedtuple("OldPoint", "a b")  # noqa: PYI024 - the collections kind is the point


class Config(dict[str, Any]):
    """A dict subclass with no state of its own (like Lightning's AttributeDict)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Ordered(OrderedDict[str, Any]):
    pass


class WithAttribute(dict[str, Any]):
    pass


class Slotted(dict[str, Any]):
    __slots__ = ("extra",)


class Items(list[int]):
    pass


def save_oneshot(directory: Path, state: Any) -> Any:
    return asyncckpt.load(asyncckpt.save(directory / "x.ckpt", state, step=1)).state


def save_async(directory: Path, state: Any) -> Any:
    with AsyncCheckpointer(directory) as ckpt:
        path = ckpt.save(1, state).result(timeout=60)
    assert path is not None
    return asyncckpt.load(path).state


SAVERS: dict[str, Callable[[Path, Any], Any]] = {"oneshot": save_oneshot, "checkpointer": save_async}


@pytest.fixture(params=sorted(SAVERS))
def save_load(request: pytest.FixtureRequest) -> Callable[[Path, Any], Any]:
    saver: Callable[[Path, Any], Any] = SAVERS[request.param]
    return saver


def checkpoint_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "events.jsonl")


# --------------------------------------------------------------------------- P6: conj / neg views


def test_conjugate_and_negative_views_beside_their_base_keep_their_values(
    tmp_path: Path, save_load: Callable[[Path, Any], Any]
) -> None:
    base = torch.tensor([1 + 2j, 3 - 4j, -5 + 6j])
    real = torch.tensor([1.0, -2.0, 3.0])
    state = {"a": base, "b": base.conj(), "b2": base.conj(), "y": real, "ny": torch._neg_view(real)}

    loaded = save_load(tmp_path, state)

    assert torch.equal(loaded["a"], base)
    assert torch.equal(loaded["b"], base.conj().resolve_conj())
    assert torch.equal(loaded["y"], real) and torch.equal(loaded["ny"], -real)
    assert not loaded["b"].is_conj() and not loaded["ny"].is_neg()


def test_a_view_saved_twice_stays_one_tensor_after_resolving(
    tmp_path: Path, save_load: Callable[[Path, Any], Any]
) -> None:
    base = torch.tensor([1 + 2j, 3 - 4j])
    view = base.conj()

    loaded = save_load(tmp_path, {"base": base, "v": view, "again": view})

    assert loaded["v"] is loaded["again"]
    assert torch.equal(loaded["v"], torch.tensor([1 - 2j, 3 + 4j]))


def test_a_reused_structure_still_resolves_the_views(tmp_path: Path) -> None:
    """The fingerprint path: the same state saved again must not reuse a layout that reads raw memory."""
    base = torch.tensor([1 + 2j, 3 - 4j])
    state = {"base": base, "conj": base.conj()}
    with AsyncCheckpointer(tmp_path, keep_last=5) as ckpt:
        for step in (1, 2, 3):
            base.add_(1)
            ckpt.save(step, state).result(timeout=60)
    for step in (1, 2, 3):
        loaded = asyncckpt.load(tmp_path / f"step-{step:010d}.ckpt").state
        expected = torch.tensor([1 + 2j, 3 - 4j]) + step
        assert torch.equal(loaded["base"], expected)
        assert torch.equal(loaded["conj"], expected.conj().resolve_conj())


def test_a_tensor_that_turns_into_a_conjugate_view_is_resolved(tmp_path: Path) -> None:
    base = torch.tensor([1 + 2j])
    with AsyncCheckpointer(tmp_path, keep_last=5) as ckpt:
        ckpt.save(1, {"base": base, "v": base[:]}).result(timeout=60)
        ckpt.save(2, {"base": base, "v": base.conj()}).result(timeout=60)
    loaded = asyncckpt.load(tmp_path / "step-0000000002.ckpt").state
    assert torch.equal(loaded["v"], torch.tensor([1 - 2j]))


# --------------------------------------------------------------------------- Parameters, requires_grad


def test_parameters_and_requires_grad_round_trip(
    tmp_path: Path, save_load: Callable[[Path, Any], Any]
) -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    state = {"w": weight, "alias": weight, "frozen": frozen, "g": torch.ones(2, requires_grad=True)}

    loaded = save_load(tmp_path, state)

    assert type(loaded["w"]) is torch.nn.Parameter and loaded["w"].requires_grad
    assert loaded["alias"] is loaded["w"]
    assert type(loaded["frozen"]) is torch.nn.Parameter and not loaded["frozen"].requires_grad
    assert type(loaded["g"]) is torch.Tensor and loaded["g"].requires_grad and loaded["g"].is_leaf
    assert torch.equal(loaded["w"].detach(), torch.ones(3))


def test_a_parameter_and_a_view_of_it_share_memory_after_loading(tmp_path: Path) -> None:
    weight = torch.nn.Parameter(torch.arange(6.0))
    loaded = save_oneshot(tmp_path, {"w": weight, "half": weight.detach()[:3]})
    assert type(loaded["w"]) is torch.nn.Parameter and type(loaded["half"]) is torch.Tensor
    assert loaded["w"].data_ptr() == loaded["half"].data_ptr()


def test_the_fingerprint_tells_a_parameter_from_a_tensor(tmp_path: Path) -> None:
    data = torch.ones(3)
    with AsyncCheckpointer(tmp_path, keep_last=5) as ckpt:
        ckpt.save(1, {"w": data}).result(timeout=60)
        ckpt.save(2, {"w": torch.nn.Parameter(data)}).result(timeout=60)
        data.requires_grad_(True)
        ckpt.save(3, {"w": data}).result(timeout=60)
    kinds = [asyncckpt.load(tmp_path / f"step-{s:010d}.ckpt").state["w"] for s in (1, 2, 3)]
    assert [type(t) for t in kinds] == [torch.Tensor, torch.nn.Parameter, torch.Tensor]
    assert [t.requires_grad for t in kinds] == [False, True, True]


def test_a_module_state_with_parameters_loads_into_a_model(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    params = dict(model.named_parameters())  # Parameters, not detached state_dict() tensors
    loaded = save_oneshot(tmp_path, params)
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.weight, model.weight) and type(fresh.weight) is torch.nn.Parameter


# --------------------------------------------------------------------------- containers


def test_namedtuples_and_dict_subclasses_keep_their_type(
    tmp_path: Path, save_load: Callable[[Path, Any], Any]
) -> None:
    state = {
        "point": Point(1, 2.5),
        "old": OldPoint("x", [Point(3, 4.0)]),
        "config": Config(lr=0.1, nested=Config(depth=2)),
        "ordered": Ordered(b=1, a=2),
        "counts": Counter("abca"),
        "size": torch.Size([2, 3]),
        "w": torch.ones(2),
    }

    loaded = save_load(tmp_path, state)

    for key in ("point", "old", "config", "ordered", "counts", "size"):
        assert type(loaded[key]) is type(state[key]), key
        assert loaded[key] == state[key], key
    assert type(loaded["old"].b[0]) is Point and loaded["config"].nested.depth == 2
    assert list(loaded["ordered"]) == ["b", "a"] and loaded["counts"]["zzz"] == 0


def test_an_ordered_dict_loads_as_a_dict_with_its_order(
    tmp_path: Path, save_load: Callable[[Path, Any], Any]
) -> None:
    loaded = save_load(tmp_path, {"sd": OrderedDict(b=torch.ones(1), a=torch.zeros(1))})
    assert type(loaded["sd"]) is dict and list(loaded["sd"]) == ["b", "a"]


def test_a_class_the_loading_program_lacks_loads_as_unresolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = asyncckpt.save(tmp_path / "x.ckpt", {"p": Point(1, 2.0), "c": Config(a=1)}, step=1)
    module = sys.modules[__name__]
    monkeypatch.delattr(module, "Point")
    monkeypatch.delattr(module, "Config")

    loaded = asyncckpt.load(path).state

    assert loaded["p"] == UnresolvedValue("namedtuple", f"{__name__}:Point", {"x": 1, "y": 2.0})
    assert loaded["c"] == UnresolvedValue("dict", f"{__name__}:Config", {"a": 1})
    again = asyncckpt.save(tmp_path / "y.ckpt", loaded, step=1)  # saves back unchanged
    monkeypatch.undo()
    assert asyncckpt.load(again).state == {"p": Point(1, 2.0), "c": Config(a=1)}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (defaultdict(list, a=[1]), "defaultdict"),
        (types.MappingProxyType({"a": 1}), "mappingproxy"),
        (collections.UserDict(a=1), "UserDict"),
        (collections.ChainMap({"a": 1}), "ChainMap"),
        (Items([1]), r"list subclass \(Items\)"),
        (torch.return_types.max((torch.ones(1), torch.zeros(1))), r"tuple subclass \(max\)"),
        (Point(torch.ones(1), 2.0), "tensor inside"),
        (Config(w=torch.ones(1)), "tensor inside"),
        (Slotted(a=1), "__slots__"),
        (Counter({(1, 2): 1}), r"dict key \(1, 2\)"),
        (collections.namedtuple("Unreachable", "x")(1), "module level"),  # noqa: PYI024
    ],
)
def test_containers_that_cannot_load_back_exactly_are_refused_before_writing(
    tmp_path: Path, save_load: Callable[[Path, Any], Any], value: Any, reason: str
) -> None:
    with pytest.raises(UnsupportedValueError, match=reason) as caught:
        save_load(tmp_path, {"m": {"v": value}})
    assert (caught.value.key or "").startswith("state['m']['v']")  # a tensor inside: its own key
    assert checkpoint_files(tmp_path) == []


def test_a_dict_subclass_with_instance_attributes_is_refused(
    tmp_path: Path, save_load: Callable[[Path, Any], Any]
) -> None:
    value = WithAttribute(a=1)
    value.note = "lost on load"  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedValueError, match="attributes") as caught:
        save_load(tmp_path, {"v": value})
    assert caught.value.key == "state['v']"


def test_the_fingerprint_never_reuses_a_structure_across_a_container_type(tmp_path: Path) -> None:
    states = [{"h": {"a": 1}}, {"h": Config(a=1)}, {"h": (1, 2.0)}, {"h": Point(1, 2.0)}, {"h": [1]}]
    with AsyncCheckpointer(tmp_path, keep_last=10) as ckpt:
        for step, state in enumerate(states, 1):
            ckpt.save(step, state).result(timeout=60)
    for step, state in enumerate(states, 1):
        loaded = asyncckpt.load(tmp_path / f"step-{step:010d}.ckpt").state["h"]
        assert type(loaded) is type(state["h"]) and loaded == state["h"]


# --------------------------------------------------------------------------- P7: tensor kinds


def _wrapper_subclass() -> torch.Tensor:
    class Wrapper(torch.Tensor):
        @staticmethod
        def __new__(cls, inner: torch.Tensor) -> Wrapper:
            made: Wrapper = torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)
            return made

        @classmethod
        def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            raise NotImplementedError(f"{func}")

    return Wrapper(torch.ones(2))


UNSTORABLE: dict[str, tuple[Callable[[], Any], str]] = {
    "sparse": (lambda: torch.eye(3).to_sparse(), "dense"),
    "sparse_csr": (lambda: torch.eye(3).to_sparse_csr(), "dense"),
    "quantized": (lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8), "qint8"),
    "meta": (lambda: torch.empty(3, device="meta"), "meta"),
    "nested": (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested"),
    "jagged": (
        lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged),
        "dense",
    ),
    "wrapper subclass": (_wrapper_subclass, "no storage"),
}


@pytest.mark.parametrize("kind", sorted(UNSTORABLE))
def test_tensor_kinds_the_format_cannot_hold_are_refused_with_their_key(
    tmp_path: Path, save_load: Callable[[Path, Any], Any], kind: str
) -> None:
    make, reason = UNSTORABLE[kind]
    with pytest.raises(UnsupportedValueError, match=reason) as caught:
        save_load(tmp_path, {"m": {"w": make()}})
    assert caught.value.key == "state['m']['w']"
    assert checkpoint_files(tmp_path) == []


def test_an_expanded_view_is_stored_as_the_memory_it_views(
    tmp_path: Path, save_load: Callable[[Path, Any], Any]
) -> None:
    """2**40 elements of one float: stored as its one element with stride 0, not as 4 TiB."""
    huge = torch.tensor([1.5]).expand(2**40)
    small = torch.arange(3.0)[:1].expand(2, 5)
    loaded = save_load(tmp_path, {"huge": huge, "small": small})
    assert loaded["huge"].shape == huge.shape and loaded["huge"].stride() == (0,)
    assert float(loaded["huge"][2**40 - 1]) == 1.5
    assert torch.equal(loaded["small"], small) and loaded["small"].stride() == (0, 0)
    assert sum(p.stat().st_size for p in tmp_path.rglob("*.ckpt")) < 1 << 20


def test_a_view_too_large_for_the_format_is_refused_with_its_key(
    tmp_path: Path, save_load: Callable[[Path, Any], Any]
) -> None:
    with pytest.raises(StateTooLargeError, match="beyond") as caught:
        save_load(tmp_path, {"m": {"w": torch.zeros(1).expand(2**61)}})
    assert caught.value.key == "m.w"
    assert checkpoint_files(tmp_path) == []
