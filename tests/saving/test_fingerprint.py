"""save/fingerprint.py: the structure of the last save is reused only while nothing it depends on changed.

Each case saves a state, changes it in one way, saves again through the same checkpointer, and
checks that every file loads back bit for bit as the state it was saved from (and, for the
fingerprint itself, that the change was seen).
"""

from __future__ import annotations

import enum
import math
import weakref
from collections import OrderedDict, namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt import AsyncCheckpointer
from asyncckpt.catalog import checkpoint_name
from asyncckpt.format import encode_layout
from asyncckpt.saving import fingerprint as fingerprint_module
from asyncckpt.saving.fingerprint import _DOUBLE, StructureCache, _fields, scan
from asyncckpt.saving.plan import Planner
from asyncckpt.saving.snapshot import encoded_layout, flatten
from asyncckpt.saving.staging import Copier, StagingPool, StagingRaceError, stage
from asyncckpt.saving.tensors_check import TensorsCheck
from asyncckpt.saving.walker import StateDicts
from asyncckpt.testing import states_equal

SameState = Callable[[Any, Any], None]


def fingerprint(state: Any) -> list[Any]:
    scanned = scan(state, StateDicts())
    assert scanned is not None
    return [scanned.signature, scanned.values]


def saved_copy(state: Any) -> Any:
    """What a save of ``state`` must hold: its state dicts taken now, tensors cloned."""
    return _clone(flatten_to_plain(state))


def flatten_to_plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: flatten_to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [flatten_to_plain(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if hasattr(value, "state_dict"):
        return flatten_to_plain(value.state_dict())
    return value


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_clone(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def model_and_adam(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()


# Each change takes the state and returns the state to save next (often the same object, changed).
def add_a_key(state: dict[str, Any]) -> dict[str, Any]:
    state["extra"] = torch.arange(5.0)
    return state


def change_a_shape(state: dict[str, Any]) -> dict[str, Any]:
    state["w"] = torch.arange(12.0).view(3, 4)
    return state


def change_a_dtype(state: dict[str, Any]) -> dict[str, Any]:
    state["w"] = state["w"].double()
    return state


def transpose_in_place(state: dict[str, Any]) -> dict[str, Any]:
    state["w"] = state["w"].t()  # same storage, same numel, other strides
    return state


def tie_two_tensors(state: dict[str, Any]) -> dict[str, Any]:
    state["b"] = state["w"]  # now one blob for both
    return state


def view_into_another(state: dict[str, Any]) -> dict[str, Any]:
    state["b"] = state["w"].view(-1)[1:3]  # a span blob shared by two views
    return state


def set_storage_in_place(state: dict[str, Any]) -> dict[str, Any]:
    state["w"].set_(torch.arange(6.0) * 7)  # same tensor object, new storage
    return state


def change_a_plain_value(state: dict[str, Any]) -> dict[str, Any]:
    state["lr"] = 0.5
    return state


def int_becomes_bool(state: dict[str, Any]) -> dict[str, Any]:
    state["n"] = True  # 1 == True, but the file must say bool
    return state


class Mode(enum.IntEnum):
    ONE = 1


def int_becomes_float(state: dict[str, Any]) -> dict[str, Any]:
    state["n"] = 1.0
    return state


def zero_becomes_negative_zero(state: dict[str, Any]) -> dict[str, Any]:
    state["lr"] = -0.0 if state["lr"] == 0.0 else 0.0
    return state


def list_becomes_tuple(state: dict[str, Any]) -> dict[str, Any]:
    state["seq"] = tuple(state["seq"])
    return state


def int_key_becomes_str_key(state: dict[str, Any]) -> dict[str, Any]:
    state["map"] = {"1": state["map"][1]}
    return state


def reorder_keys(state: dict[str, Any]) -> dict[str, Any]:
    return dict(reversed(list(state.items())))


# An optimizer's state and parameter ids are fingerprinted a container at a time.
def rename_a_per_param_key(state: dict[str, Any]) -> dict[str, Any]:
    state["per_param"][1] = {"m": state["per_param"][1]["m"], "u": state["per_param"][1]["v"]}
    return state


def per_param_tensor_becomes_a_float(state: dict[str, Any]) -> dict[str, Any]:
    state["per_param"][0]["v"] = 0.5
    return state


def per_param_key_becomes_an_int(state: dict[str, Any]) -> dict[str, Any]:
    state["per_param"][0] = {"m": state["per_param"][0]["m"], 7: state["per_param"][0]["v"]}
    return state


def per_param_state_is_swapped(state: dict[str, Any]) -> dict[str, Any]:
    per_param = state["per_param"]
    per_param[0], per_param[1] = per_param[1], per_param[0]  # other shapes under the same keys
    return state


def an_id_becomes_bool(state: dict[str, Any]) -> dict[str, Any]:
    state["ids"][1] = True  # 1 == True, but the file must say bool
    return state


def an_id_changes_in_place(state: dict[str, Any]) -> dict[str, Any]:
    state["ids"].append(3)  # the list object stays: the cached fingerprint must not follow it
    return state


def simple_state() -> dict[str, Any]:
    return {
        "w": torch.arange(6.0).view(2, 3),
        "b": torch.ones(3, dtype=torch.bfloat16),
        "lr": 0.0,
        "n": 1,
        "seq": [1, 2],
        "map": {1: "one"},
        "ids": [0, 1, 2],
        "per_param": {
            0: {"m": torch.zeros(2), "v": torch.ones(2)},
            1: {"m": torch.zeros(3, 2), "v": torch.full((3,), 2.0)},
        },
    }


CHANGES = [
    add_a_key,
    change_a_shape,
    change_a_dtype,
    transpose_in_place,
    tie_two_tensors,
    view_into_another,
    set_storage_in_place,
    change_a_plain_value,
    int_becomes_bool,
    int_becomes_float,
    zero_becomes_negative_zero,
    list_becomes_tuple,
    int_key_becomes_str_key,
    reorder_keys,
    rename_a_per_param_key,
    per_param_tensor_becomes_a_float,
    per_param_key_becomes_an_int,
    per_param_state_is_swapped,
    an_id_becomes_bool,
    an_id_changes_in_place,
]


@pytest.mark.parametrize("change", CHANGES, ids=lambda c: c.__name__)
def test_a_changed_state_is_saved_as_it_is_now(
    tmp_path: Path, change: Callable[[dict[str, Any]], dict[str, Any]], assert_same_state: SameState
) -> None:
    state = simple_state()
    before = fingerprint(state)
    with AsyncCheckpointer(tmp_path, keep_last=10) as ckpt:
        expected = [saved_copy(state)]
        first = ckpt.save(1, state)
        first.result(timeout=30)
        state = change(state)
        expected.append(saved_copy(state))
        second = ckpt.save(2, state)
        second.result(timeout=30)
        assert fingerprint(state) != before
    for handle, want in zip((first, second), expected, strict=True):
        assert handle.path is not None
        assert_same_state(want, asyncckpt.load(handle.path).state)


def test_an_unchanged_state_reuses_the_structure_and_saves_new_values(tmp_path: Path) -> None:
    state = simple_state()
    cache = StructureCache()
    first, _ = cache.snapshot(state)
    state["w"].add_(1.0)  # values change every step; the structure does not
    second, _ = cache.snapshot(state)
    assert second.structure is first.structure and (cache.hits, cache.misses) == (1, 1)
    assert second.sources[0] is state["w"]  # the copies read this save's tensors
    with AsyncCheckpointer(tmp_path) as ckpt:
        for step in (1, 2, 3):
            state["w"].mul_(2.0)
            path = ckpt.save(step, state).result(timeout=30)
            assert path is not None
            assert states_equal(asyncckpt.load(path).state, state)


def test_training_objects_across_structure_changes(tmp_path: Path, assert_same_state: SameState) -> None:
    """Optimizer state appearing after the first step, a parameter replaced, a group added."""
    model, optimizer = model_and_adam()
    state: dict[str, Any] = {"model": model, "optimizer": optimizer}
    expected = []
    paths = []

    def save(step: int) -> None:
        expected.append(saved_copy(state))
        handle = ckpt.save(step, state)
        ckpt.wait_staged()  # the next change may touch parameters in place
        paths.append(handle.result(timeout=30))

    with AsyncCheckpointer(tmp_path, keep_last=20) as ckpt:
        save(1)  # no optimizer state yet
        train_step(model, optimizer)
        save(2)  # exp_avg / exp_avg_sq / step appear
        train_step(model, optimizer)
        save(3)  # same structure, new values
        model[0].weight = torch.nn.Parameter(torch.randn(3, 4))  # a parameter replaced
        save(4)
        optimizer.add_param_group({"params": [model[0].weight]})
        train_step(model, optimizer)
        save(5)
        model[2] = torch.nn.Linear(3, 2, bias=False)  # a key gone
        save(6)
    for want, path in zip(expected, paths, strict=True):
        assert path is not None
        assert_same_state(want, asyncckpt.load(path).state)


def test_the_overlap_plan_follows_the_optimizer() -> None:
    model, optimizer = model_and_adam()
    planner = Planner()
    state = {"model": model, "optimizer": optimizer}

    def deferred_keys() -> set[str]:
        plan = planner.plan(1, state, None, overlap=True)
        return {t.key for t in plan.snapshot.tensors if t.blob in plan.deferred}

    params = {f"model.{name}" for name, _ in model.named_parameters()}
    assert deferred_keys() == params
    train_step(model, optimizer)
    after_step = deferred_keys()
    assert params < after_step and all(k in params or k.startswith("optimizer.state.") for k in after_step)
    assert deferred_keys() == after_step  # reused
    other = torch.optim.SGD(model[0].parameters(), lr=0.1)  # a new optimizer: only its parameters
    state["optimizer"] = other
    assert deferred_keys() == {"model.0.weight", "model.0.bias"}


def test_floats_are_compared_by_their_bits() -> None:
    assert fingerprint({"x": 0.0}) != fingerprint({"x": -0.0})
    assert fingerprint({"x": math.nan}) == fingerprint({"x": math.nan})
    assert fingerprint({"x": 1}) != fingerprint({"x": 1.0}) != fingerprint({"x": True})
    assert fingerprint({1: 0}) != fingerprint({True: 0})
    assert fingerprint({"ids": [0, 1]}) != fingerprint({"ids": [0, True]})
    assert fingerprint({"s": {0: {"m": torch.ones(1)}}}) != fingerprint({"s": {0: {1: torch.ones(1)}}})
    assert fingerprint({"s": {0: {1: torch.ones(1)}}}) != fingerprint({"s": {0: {True: torch.ones(1)}}})


def test_subclasses_are_fingerprinted_by_what_is_stored() -> None:
    class Name(str):
        pass

    assert fingerprint({"k": Name("v")}) == fingerprint({"k": Name("v")})
    assert fingerprint(OrderedDict(a=1)) == fingerprint({"a": 1})  # both stored as a dict
    assert scan({"n": Mode.ONE}, StateDicts()) is None  # a typed value: laid out every save


def test_typed_values_between_plain_ones_keep_each_type(tmp_path: Path) -> None:
    # Mode.ONE == 1 and the fingerprint of a plain value is its value: typed values are never
    # fingerprinted, so the structure of the save before is not reused for them.
    values: list[Any] = [1, Mode.ONE, 1, "one", Path("one"), "one"]
    weights = torch.ones(2)  # the same tensor each time: only the value differs
    with AsyncCheckpointer(tmp_path, keep_last=10) as ckpt:
        handles = [ckpt.save(step, {"n": value, "w": weights}) for step, value in enumerate(values)]
        paths = [handle.result(timeout=30) for handle in handles]
    loaded = [asyncckpt.load(p).state["n"] for p in paths]
    assert [type(n) for n in loaded] == [type(v) for v in values]
    assert loaded == values


def test_a_state_that_cannot_be_stored_is_not_cached() -> None:
    cache = StructureCache()
    with pytest.raises(TypeError, match="cannot store"):
        cache.snapshot({"f": print})
    assert scan({"f": print}, StateDicts()) is None
    cycle: list[Any] = []
    cycle.append(cycle)
    assert scan(cycle, StateDicts()) is None


def test_state_dict_is_called_once_per_save() -> None:
    class Counting:
        calls = 0

        def state_dict(self) -> dict[str, Any]:
            Counting.calls += 1
            return {"t": torch.ones(2), "odd": [Name("x")]}

    class Name(str):  # the fast walk hands this state to the careful one
        pass

    cache = StructureCache()
    cache.snapshot({"obj": Counting()})
    cache.snapshot({"obj": Counting()})
    assert Counting.calls == 2


def test_tensors_that_require_grad_are_copied_without_autograd() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    cache = StructureCache()
    cache.snapshot({"w": weight})
    snapshot, _ = cache.snapshot({"w": weight})
    assert cache.hits == 1 and snapshot.sources[0].data_ptr() == weight.data_ptr()
    buffers = StagingPool(1, pin_memory=False).acquire(snapshot.layout_key())
    assert buffers is not None
    stage(snapshot, buffers).wait()
    copy = buffers.destinations[0]
    assert not copy.requires_grad and copy.grad_fn is None and torch.equal(copy, torch.ones(3))


def test_a_tensor_reached_twice_is_one_blob_on_reuse_too(tmp_path: Path) -> None:
    weight = torch.arange(4.0)
    state = {"x": weight, "again": weight}
    cache = StructureCache()
    for _ in range(2):
        snapshot, _ = cache.snapshot(state)
        assert len(snapshot.sources) == len(snapshot.structure.sizes) == 1
    with AsyncCheckpointer(tmp_path) as ckpt:
        for step in (1, 2):
            path = ckpt.save(step, state).result(timeout=30)
            assert path is not None
            loaded = asyncckpt.load(path).state
            assert loaded["x"] is loaded["again"] and torch.equal(loaded["x"], weight)


# The same tensor objects with their fields changed in place (or the same storage under a new
# object): a cached structure's tensors are checked in one C call plus their offsets and
# pointers, and each of these must still be seen.
def data_of_another_shape(state: dict[str, Any]) -> dict[str, Any]:
    state["w"].data = torch.zeros(3, 2)
    return state


def data_of_another_dtype(state: dict[str, Any]) -> dict[str, Any]:
    state["w"].data = state["w"].data.double()
    return state


def data_moved_elsewhere(state: dict[str, Any]) -> dict[str, Any]:
    state["w"].data = state["w"].data.clone()  # every field the same but the data pointer
    return state


def made_an_alias_in_place(state: dict[str, Any]) -> dict[str, Any]:
    state["v"].set_(state["w"])  # same dtype and shape: now one storage for two keys
    return state


def transposed_in_place(state: dict[str, Any]) -> dict[str, Any]:
    state["w"].t_()
    return state


def unsqueezed_in_place(state: dict[str, Any]) -> dict[str, Any]:
    state["w"].unsqueeze_(0)
    return state


def offset_moved_in_place(state: dict[str, Any]) -> dict[str, Any]:
    w = state["w"]
    w.set_(w.untyped_storage(), 1, (2, 2), (3, 1))
    state["v"] = torch.zeros(2, 2)
    return state


def requires_grad_switched_on(state: dict[str, Any]) -> dict[str, Any]:
    state["w"].requires_grad_()
    return state


def becomes_a_parameter(state: dict[str, Any]) -> dict[str, Any]:
    state["w"] = torch.nn.Parameter(state["w"])  # same storage, same pointer, another type
    return state


def becomes_a_negative_view(state: dict[str, Any]) -> dict[str, Any]:
    state["w"] = state["w"]._neg_view()  # same storage and pointer, the negative bit set
    return state


def becomes_a_conjugate_view(state: dict[str, Any]) -> dict[str, Any]:
    state["c"] = state["c"].conj()  # same storage and pointer, the conjugate bit set
    return state


IN_PLACE_CHANGES = [
    data_of_another_shape,
    data_of_another_dtype,
    data_moved_elsewhere,
    made_an_alias_in_place,
    transposed_in_place,
    unsqueezed_in_place,
    offset_moved_in_place,
    requires_grad_switched_on,
    becomes_a_parameter,
    becomes_a_negative_view,
    becomes_a_conjugate_view,
]


def tensors_state() -> dict[str, Any]:
    return {
        "w": torch.arange(7.0)[:6].view(2, 3),
        "v": torch.zeros(2, 3),
        "c": torch.zeros(2, dtype=torch.complex64),
        **simple_state(),
    }


NUMBER_CHANGES = [change_a_plain_value, zero_becomes_negative_zero]


@pytest.mark.parametrize(
    "change", [c for c in [*CHANGES, *IN_PLACE_CHANGES] if c not in NUMBER_CHANGES], ids=lambda c: c.__name__
)
def test_a_cached_structure_is_laid_out_again_after_any_change(
    change: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    state = tensors_state()
    cache = StructureCache()
    first, _ = cache.snapshot(state)
    cache.snapshot(state)  # the second save checks the tensors without reading their fields
    assert (cache.hits, cache.misses) == (1, 1)
    with torch.no_grad():
        state = change(state)
    second, _ = cache.snapshot(state)
    assert (cache.hits, cache.misses) == (1, 2)
    assert second.structure is not first.structure


@pytest.mark.parametrize("change", NUMBER_CHANGES, ids=lambda c: c.__name__)
def test_changed_numbers_keep_the_structure_and_come_with_a_tree_of_their_own(
    change: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    """A learning rate or an epoch that changes between saves does not lay the state out again:
    the structure (tensor table, blobs, copy plans) stays, the snapshot carries the new tree."""
    state = simple_state()
    cache = StructureCache()
    first, _ = cache.snapshot(state)
    state = change(state)
    second, _ = cache.snapshot(state)
    assert (cache.hits, cache.misses) == (1, 1)
    assert second.structure is first.structure
    assert second.tree is not first.structure.tree
    assert second.tree == flatten(state).tree
    assert _DOUBLE(second.tree["lr"]) == _DOUBLE(state["lr"])  # -0.0 is not 0.0
    third, _ = cache.snapshot(change(state))  # changed again: the structure stays
    assert third.structure is first.structure and (cache.hits, cache.misses) == (2, 1)


def test_a_state_whose_numbers_change_every_save_is_saved_with_each_saves_numbers(
    tmp_path: Path, assert_same_state: SameState
) -> None:
    """The scheduler case: the optimizer's learning rate and the epoch change at every save."""
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    expected = []
    with AsyncCheckpointer(tmp_path, keep_last=10) as ckpt:
        for epoch in range(4):
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
            scheduler.step()
            state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epoch": epoch}
            expected.append(saved_copy(state))
            ckpt.save(epoch, state).result(timeout=30)
        structures = ckpt._mode._planner.structures
        assert structures.misses <= 2  # momentum buffers appear after the first step
    for epoch, want in enumerate(expected):
        loaded = asyncckpt.load(tmp_path / checkpoint_name(epoch)).state
        assert loaded["epoch"] == epoch
        assert loaded["optimizer"]["param_groups"][0]["lr"] == 0.1 * 0.5 ** (epoch + 1)
        assert_same_state(want, loaded)


def test_a_container_of_ints_that_change_keeps_the_structure(tmp_path: Path) -> None:
    """``{"epoch": e, "step": s}`` and a list of ints are values too; a big int among them is
    stored differently (a big int), so such a container stays in the shape."""
    weights = torch.arange(6.0)
    cache = StructureCache()
    snapshots = []
    for epoch in range(3):
        state = {"w": weights, "progress": {"epoch": epoch, "step": 100 * epoch}, "seen": [epoch, 7]}
        snapshots.append(cache.snapshot(state)[0])
        path = asyncckpt.save(tmp_path / f"e{epoch}.ckpt", state, step=epoch)
        assert states_equal(asyncckpt.load(path).state, state)
    assert (cache.hits, cache.misses) == (2, 1)
    assert all(s.structure is snapshots[0].structure for s in snapshots)
    assert [s.tree["progress"]["step"] for s in snapshots] == [0, 100, 200]

    big = {"w": weights, "ids": [1, 2**70]}
    cache.snapshot(big)
    big["ids"] = [1, 2**71]
    changed, _ = cache.snapshot(big)
    assert cache.misses == 3 and changed.tree == flatten(big).tree


@pytest.mark.parametrize("how", ["checkpointer", "oneshot"])
def test_changed_numbers_in_a_state_with_tied_weights_and_views_keep_them(tmp_path: Path, how: str) -> None:
    """A reused structure whose tensor table merged aliases (tied weights) numbers the new
    skeleton's refs by that table, as a fresh layout does."""
    embedding = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = embedding.weight
    model = torch.nn.ModuleDict({"embedding": embedding, "head": head})
    extra = torch.arange(4.0)

    def state(epoch: int) -> dict[str, Any]:
        return {"model": model, "epoch": epoch, "lr": 0.1 / (epoch + 1), "views": [extra, extra[1:], extra]}

    if how == "checkpointer":
        with AsyncCheckpointer(tmp_path, keep_last=10) as ckpt:
            for epoch in range(3):
                ckpt.save(epoch, state(epoch)).result(timeout=30)
            assert ckpt._mode._planner.structures.misses == 1  # type: ignore[union-attr]
    else:
        for epoch in range(3):
            asyncckpt.save(tmp_path / checkpoint_name(epoch), state(epoch), step=epoch)
    for epoch in range(3):
        loaded = asyncckpt.load(tmp_path / checkpoint_name(epoch)).state
        assert (loaded["epoch"], loaded["lr"]) == (epoch, 0.1 / (epoch + 1))
        weights = loaded["model"]
        assert weights["embedding.weight"] is weights["head.weight"]
        assert torch.equal(weights["head.weight"], embedding.weight.detach())
        whole, tail, again = loaded["views"]
        assert whole is again and torch.equal(tail, extra[1:])
        assert tail.data_ptr() == whole.data_ptr() + 4


@pytest.mark.parametrize("change", IN_PLACE_CHANGES, ids=lambda c: c.__name__)
def test_the_tensors_check_sees_every_field(change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    state = tensors_state()
    found = [state[k] for k in ("w", "v", "c")]
    check = TensorsCheck.of(found)
    assert check is not None and check.matches(found)
    before = [_fields(t) for t in found]
    with torch.no_grad():
        state = change(state)
    changed = [state[k] for k in ("w", "v", "c")]
    assert [_fields(t) for t in changed] != before  # a change the fields show
    assert not check.matches(changed)


def test_an_unchanged_state_is_checked_without_reading_each_tensors_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, optimizer = model_and_adam()
    train_step(model, optimizer)
    state = {"model": model, "optimizer": optimizer}
    cache = StructureCache()
    first, _ = cache.snapshot(state)
    train_step(model, optimizer)  # new values, same structure

    def read_fields(t: torch.Tensor) -> tuple[Any, ...]:
        raise AssertionError("a tensor's fields were read one by one")

    monkeypatch.setattr(fingerprint_module, "_fields", read_fields)
    second, _ = cache.snapshot(state)
    assert second.structure is first.structure and (cache.hits, cache.misses) == (1, 1)
    assert [t.data_ptr() for t in second.sources] == [t.data_ptr() for t in first.sources]


def test_a_check_made_under_another_mode_falls_back_to_the_fields() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    cache = StructureCache()
    with torch.inference_mode():  # other dispatch keys: the C check fails, the fields decide
        first, _ = cache.snapshot({"w": weight})
    second, _ = cache.snapshot({"w": weight})
    third, _ = cache.snapshot({"w": weight})
    assert first.structure is second.structure is third.structure
    assert (cache.hits, cache.misses) == (2, 1)


def test_the_tensors_check_keeps_no_tensor_alive() -> None:
    tensor = torch.ones(3)
    ref = weakref.ref(tensor)
    check = TensorsCheck.of([tensor])
    assert check is not None
    del tensor
    assert ref() is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_tensor_moved_to_the_host_in_place_is_seen() -> None:
    weight = torch.nn.Parameter(torch.ones(3, device="cuda"))
    cache = StructureCache()
    first, _ = cache.snapshot({"w": weight})
    cache.snapshot({"w": weight})
    weight.data = weight.data.cpu()  # the same object, same dtype, shape and strides
    second, _ = cache.snapshot({"w": weight})
    assert (cache.hits, cache.misses) == (1, 2) and second.structure is not first.structure
    assert not second.structure.uses_cuda


@pytest.mark.parametrize(
    "state",
    [
        lambda: {"a": torch.ones(4), "b": torch.full((4,), 2.0)},
        lambda: {"b": (tied := torch.full((4,), 2.0)), "again": tied, "a": torch.ones(4)},  # one blob
    ],
    ids=["one blob each", "a tensor reached twice"],
)
def test_a_reused_structure_watches_the_versions_its_check_read(state: Callable[[], dict[str, Any]]) -> None:
    tensors = state()
    cache = StructureCache()
    cache.snapshot(tensors)
    snapshot, _ = cache.snapshot(tensors)
    assert snapshot.versions == [t._version for t in snapshot.found]
    deferred = next(b for b, t in enumerate(snapshot.sources) if t is tensors["b"])
    tensors["b"].add_(1.0)  # after the check read its version, before its copy
    buffers = StagingPool(1, pin_memory=False).acquire(snapshot.layout_key())
    assert buffers is not None
    copier = Copier()
    try:
        staged = stage(snapshot, buffers, deferred={deferred}, copier=copier)
        with pytest.raises(StagingRaceError):
            staged.wait()
    finally:
        copier.close()


def test_a_tensor_listed_twice_is_checked_once_and_must_stay_the_same_object() -> None:
    tied, other = torch.ones(4), torch.zeros(2)
    check = TensorsCheck.of([tied, other, tied])
    assert check is not None
    tied.add_(1.0)
    assert check.versions([tied, other, tied]) == [1, 0, 1]
    assert check.versions([tied, other, torch.ones(4)]) is None  # no longer one object
    assert check.versions([tied, tied, tied]) is None


# --------------------------------------------------------------------------- numbers that change

Point = namedtuple("Point", "x y")  # noqa: PYI024 - stored as a typed value


class Bag(dict):  # type: ignore[type-arg]
    """A dict subclass: stored as a typed value."""


class Holder:
    """An object with state_dict(): its state dict is taken once a save and replayed."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.lr: Any = 0.1

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "weight": self.weight}


_NUMBERS = {  # a slot keeps its kind between saves (mostly): only its value changes
    "int": st.integers(-3, 3) | st.integers(-(2**63), 2**64 - 1),
    "wide": st.sampled_from([2**64 - 1, 2**64, -(2**63), -(2**63) - 1]),  # beyond: a big int
    "float": st.one_of(
        st.sampled_from([0.0, -0.0, math.nan, -math.nan, math.inf, 0.5]), st.floats(allow_nan=True)
    ),
    "bool": st.booleans(),  # bool is not an int
}


@given(data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_each_save_of_a_state_whose_numbers_change_encodes_as_a_fresh_layout(
    data: st.DataObject, tmp_path: Path
) -> None:
    """Every save through a structure cache (numbers changed or not, back and forth) has the
    header a fresh layout of that state has, byte for byte, and loads equal to that state: with
    shared views, tied tensors, typed values, non-ASCII strings and a replayed state dict."""
    shared = torch.arange(6.0)
    tied = torch.nn.Parameter(torch.randn(3))
    holder = Holder(torch.ones(2, dtype=torch.int64))

    def state(n: list[Any]) -> dict[str, Any]:
        holder.lr = n[8]
        return {
            "epoch": n[0],
            "lrs": [n[1], "é", n[2], None, True],
            "point": Point(n[3], torch.Size([2, 3])),
            "bag": Bag(x=n[4], y="ü"),
            "t": shared,
            "views": [shared[1:4], shared, tied, tied, shared[:1].expand(4)],
            "opt": {"step": n[5], "nested": (n[6], {"k": n[7], 3: "x"})},
            "holder": holder,
        }

    common = st.sampled_from(["int", "float"])
    kinds = data.draw(st.lists(common | st.sampled_from(list(_NUMBERS)), min_size=9, max_size=9))
    cache = StructureCache()
    for step in range(data.draw(st.integers(2, 5))):
        if data.draw(st.integers(0, 9)) == 0:  # now and then a slot changes its kind
            kinds[data.draw(st.integers(0, 8))] = data.draw(st.sampled_from(list(_NUMBERS)))
        current = state([data.draw(_NUMBERS[kind]) for kind in kinds])
        snapshot, _ = cache.snapshot(current)
        fresh = flatten(current)
        structure = snapshot.structure
        reused = encoded_layout(structure, snapshot.tree, structure.sizes)
        expected = encode_layout(tree=fresh.tree, tensors=fresh.tensors, sizes=fresh.structure.sizes)
        assert reused == expected
        assert structure.tensors == fresh.tensors and structure.layout == fresh.structure.layout
        path = asyncckpt.save(tmp_path / f"{step}.ckpt", current, step=step)
        assert states_equal({**current, "holder": holder.state_dict()}, asyncckpt.load(path).state)


@pytest.mark.parametrize("budget", [None, 3 * (64 << 10)], ids=["whole", "streamed"])
def test_saves_piling_up_while_numbers_change_each_write_their_own(
    tmp_path: Path, budget: int | None
) -> None:
    """The trainer plans the next saves (walking new skeletons, some back at the first save's
    numbers) while the writer encodes earlier ones: each file holds its own save's numbers."""
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 128))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 128)).sum().backward()
    optimizer.step()
    numbers = [(1, 0.1), (2, 0.2), (1, 0.1), (3, -0.0), (3, 0.0), (1, 0.1)]
    with AsyncCheckpointer(
        tmp_path, keep_last=None, max_pending=3, staging_budget=budget, verify="none"
    ) as ckpt:
        futures = []
        for step, (epoch, lr) in enumerate(numbers):
            optimizer.param_groups[0]["lr"] = lr
            state = {"model": model, "optimizer": optimizer, "epoch": epoch, "lrs": [lr, epoch]}
            futures.append(ckpt.save(step, state))
        for future in futures:
            future.result(timeout=30)
        assert ckpt._mode._planner.structures.misses == 1  # type: ignore[union-attr]
    for step, (epoch, lr) in enumerate(numbers):
        loaded = asyncckpt.load(tmp_path / checkpoint_name(step)).state
        assert loaded["epoch"] == epoch and _DOUBLE(loaded["lrs"][0]) == _DOUBLE(lr)
        assert _DOUBLE(loaded["optimizer"]["param_groups"][0]["lr"]) == _DOUBLE(lr)


def _tensor_dict_keys(scanned: Any) -> list[Any]:
    """The key lists the scan recorded for its containers of dicts of tensors."""
    signature = scanned.signature
    return [signature[i + 1] for i, item in enumerate(signature) if item is fingerprint_module._TENSOR_DICTS]


@pytest.mark.skipif(fingerprint_module._DICT_VERSION is None, reason="this torch reads no dict version tags")
def test_unchanged_per_param_dicts_are_fingerprinted_from_the_last_scan() -> None:
    state = simple_state()
    memo: list[Any] = []
    first = fingerprint_module._scan_unchecked(state, StateDicts(), memo)
    second = fingerprint_module._scan_unchecked(state, StateDicts(), memo)
    assert first is not None and second is not None
    [first_keys], [second_keys] = _tensor_dict_keys(first), _tensor_dict_keys(second)
    assert second_keys is first_keys  # taken from the memo, not rebuilt dict by dict
    assert second.signature == first.signature and second.found == first.found
    assert not any(isinstance(v, torch.Tensor) for seen in memo for v in vars(seen).values())
    replaced = torch.ones(5)
    state["per_param"][1]["v"] = replaced  # the dict changed: its keys and types are read again
    third = fingerprint_module._scan_unchecked(state, StateDicts(), memo)
    assert third is not None
    [third_keys] = _tensor_dict_keys(third)
    assert third_keys is not first_keys and third_keys == first_keys
    assert any(t is replaced for t in third.found)
    state["per_param"][0] = dict(state["per_param"][0])  # an equal dict, another object
    fourth = fingerprint_module._scan_unchecked(state, StateDicts(), memo)
    assert fourth is not None and _tensor_dict_keys(fourth)[0] is not third_keys


def test_a_per_param_tensor_replaced_between_saves_is_saved(tmp_path: Path) -> None:
    state = simple_state()
    with AsyncCheckpointer(tmp_path, keep_last=3) as ckpt:
        ckpt.save(1, state).result(timeout=30)
        ckpt.save(2, state).result(timeout=30)  # the per-param dicts are known now
        state["per_param"][0]["m"] = torch.full((4,), 3.0)  # same key, another tensor
        path = ckpt.save(3, state).result(timeout=30)
    assert path is not None
    assert states_equal(asyncckpt.load(path).state, state)
