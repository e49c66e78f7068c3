"""save/snapshot.py: flattening a state into skeleton, tensor table and blobs, and back."""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch

from asyncckpt import format as fmt
from asyncckpt._tree import unflatten
from asyncckpt.errors import UnsupportedValueError
from asyncckpt.format import BigInt, TensorRef
from asyncckpt.saving.snapshot import (
    INT64_MIN,
    UINT64_MAX,
    BlobSource,
    contiguous_stride,
    flatten,
    flatten_metadata,
    gc_paused,
)

SameState = Callable[[Any, Any], None]


def restore(state: Any) -> Any:
    """flatten, then rebuild every tensor from its blob as the reader does, then unflatten."""
    snapshot = flatten(state)
    blobs = [_blob_bytes(blob) for blob in snapshot.blobs]
    tensors = [fmt.view_tensor(spec, blobs[spec.blob]) for spec in snapshot.tensors]  # type: ignore[arg-type]
    return unflatten(snapshot.tree, tensors)


def _blob_bytes(blob: BlobSource) -> torch.Tensor:
    data = blob.tensor.contiguous()
    flat = data.reshape(-1)
    return flat.view(torch.uint8).clone() if flat.numel() else torch.empty(0, dtype=torch.uint8)


def test_contiguous_stride() -> None:
    assert contiguous_stride((2, 3, 4)) == (12, 4, 1)
    assert contiguous_stride(()) == ()
    assert contiguous_stride((0, 3)) == (3, 1)
    assert contiguous_stride((2, 0, 5)) == (5, 5, 1)


def test_flatten_replaces_tensors_by_refs() -> None:
    a, b = torch.ones(3), torch.zeros(2, 2, dtype=torch.int8)
    snapshot = flatten({"x": [a, 1], "y": (b, "s")})

    assert snapshot.tree == {"x": [TensorRef(0), 1], "y": (TensorRef(1), "s")}
    assert [spec.key for spec in snapshot.tensors] == ["x.0", "y.0"]
    assert [(spec.dtype, spec.shape, spec.stride) for spec in snapshot.tensors] == [
        (torch.float32, (3,), (1,)),
        (torch.int8, (2, 2), (2, 1)),
    ]
    assert [blob.nbytes for blob in snapshot.blobs] == [12, 4] and snapshot.nbytes == 16
    assert snapshot.layout_key() == ((12, "cpu", torch.float32, (3,)), (4, "cpu", torch.int8, (2, 2)))


def test_flatten_copies_nothing() -> None:
    weight = torch.arange(6.0)
    snapshot = flatten({"w": weight})

    assert snapshot.blobs[0].tensor.data_ptr() == weight.data_ptr()


def test_big_ints_become_big_int_values() -> None:
    snapshot = flatten([UINT64_MAX, UINT64_MAX + 1, INT64_MIN, INT64_MIN - 1, 2**70])

    assert snapshot.tree == [
        UINT64_MAX,
        BigInt(UINT64_MAX + 1),
        INT64_MIN,
        BigInt(INT64_MIN - 1),
        BigInt(2**70),
    ]
    assert unflatten(snapshot.tree, []) == [UINT64_MAX, UINT64_MAX + 1, INT64_MIN, INT64_MIN - 1, 2**70]


def test_subclasses_become_exact_types() -> None:
    class Name(str):
        pass

    class Blob(bytes):
        pass

    class Flag(int):
        pass

    tree = flatten({Name("k"): [Name("v"), Blob(b"b"), Flag(3), OrderedDict(a=1)]}).tree

    key, (name, blob, flag, ordered) = next(iter(tree.items()))
    assert (type(key), type(name), type(blob), type(flag), type(ordered)) == (str, str, bytes, int, dict)
    assert (key, name, blob, flag, ordered) == ("k", "v", b"b", 3, {"a": 1})


def test_objects_with_state_dict_are_flattened(trained: Any) -> None:
    model, optimizer, scheduler = trained
    snapshot = flatten({"model": model, "optim": optimizer, "sched": scheduler})

    assert list(snapshot.tree["model"]) == list(model.state_dict())
    assert snapshot.tree["sched"] == scheduler.state_dict()
    assert snapshot.tree["optim"]["param_groups"][0]["betas"] == (0.9, 0.999)


def test_tied_tensor_is_one_table_entry(assert_same_state: SameState) -> None:
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    state = {"encoder": weight, "decoder": weight, "copy": weight.clone()}
    snapshot = flatten(state)

    assert snapshot.tree == {"encoder": TensorRef(0), "decoder": TensorRef(0), "copy": TensorRef(1)}
    assert len(snapshot.tensors) == len(snapshot.blobs) == 2
    restored = restore(state)
    assert restored["encoder"] is restored["decoder"] and restored["copy"] is not restored["encoder"]
    assert_same_state(state, restored)


def test_distinct_views_share_one_span_blob(assert_same_state: SameState) -> None:
    base = torch.arange(40, dtype=torch.float32)
    state = {"head": base[3:9], "grid": base[10:34].view(4, 6)[:, ::2], "bits": base.view(torch.int32)[20:22]}
    snapshot = flatten(state)

    assert len(snapshot.blobs) == 1 and snapshot.blobs[0].raw
    # The span starts at the first view's byte 12, aligned down to 16 bytes, and ends after the last.
    assert snapshot.blobs[0].nbytes == 33 * 4 and snapshot.blobs[0].tensor.storage_offset() == 0
    assert [(s.offset, s.stride) for s in snapshot.tensors] == [(12, (1,)), (40, (6, 2)), (80, (1,))]
    restored = restore(state)
    assert len({t.untyped_storage().data_ptr() for t in restored.values()}) == 1
    assert_same_state(state, restored)


def test_span_blob_starts_at_an_aligned_offset_in_the_storage() -> None:
    base = torch.arange(64, dtype=torch.float64)
    snapshot = flatten({"a": base[37:40], "b": base[38:50]})

    blob = snapshot.blobs[0]
    assert blob.tensor.storage_offset() == 37 * 8 // 16 * 16 == 288
    assert blob.nbytes == 50 * 8 - 288
    assert [s.offset for s in snapshot.tensors] == [37 * 8 - 288, 38 * 8 - 288]
    assert all(s.offset % 8 == 0 for s in snapshot.tensors)


def test_single_non_contiguous_view_is_stored_contiguously(assert_same_state: SameState) -> None:
    source = torch.arange(24, dtype=torch.int64).view(4, 6)
    state = {"t": source.t(), "step": source[:, ::3]}
    snapshot = flatten({"t": state["t"]})

    assert snapshot.tensors[0].stride == (4, 1) and not snapshot.blobs[0].raw
    assert snapshot.blobs[0].nbytes == 24 * 8
    assert_same_state({"t": state["t"]}, restore({"t": state["t"]}))


def test_zero_size_and_scalar_tensors(assert_same_state: SameState) -> None:
    state = {
        "empty": torch.empty(0, 5),
        "empty2": torch.empty(3, 0, dtype=torch.int8),
        "scalar": torch.tensor(2.5),
    }
    snapshot = flatten(state)

    assert [blob.nbytes for blob in snapshot.blobs] == [0, 0, 4]
    assert [spec.shape for spec in snapshot.tensors] == [(0, 5), (3, 0), ()]
    assert_same_state(state, restore(state))


def test_parameters_are_copied_detached_and_rebuilt_as_parameters() -> None:
    parameter = torch.nn.Parameter(torch.ones(2))
    grad = torch.ones(2, requires_grad=True)
    snapshot = flatten({"p": parameter, "g": grad})

    assert not any(blob.tensor.requires_grad for blob in snapshot.blobs)
    assert snapshot.tree == {"p": TensorRef(0, requires_grad=True, parameter=True), "g": TensorRef(1, True)}
    restored = restore({"p": parameter, "g": grad})
    assert type(restored["p"]) is torch.nn.Parameter and restored["p"].requires_grad
    assert type(restored["g"]) is torch.Tensor and restored["g"].requires_grad


# --------------------------------------------------------------------------- refusals


class Opaque:
    pass


@pytest.mark.parametrize(
    ("state", "pattern"),
    [
        (
            {"optim": {"param_groups": [{"foo": Opaque()}]}},
            r"state\['optim'\]\['param_groups'\]\[0\]\['foo'\]: cannot",
        ),
        ([1, {2}], r"state\[1\]: cannot store a value of type set"),
        ({"f": lambda: 0}, r"state\['f'\]: cannot store a value of type"),
        ({"a": bytearray(b"x")}, r"state\['a'\]: cannot store a value of type bytearray"),
        ({"a": 1 + 2j}, r"state\['a'\]: cannot store a value of type complex"),
        ({"k": {(1, 2): 0}}, r"state\['k'\]: dict key \(1, 2\) of type tuple cannot be stored"),
        ({"k": {1.5: 0}}, r"state\['k'\]: dict key 1.5 of type float"),
        ({"k": {True: 0}}, r"state\['k'\]: dict key True of type bool"),
        ({"k": {None: 0}}, r"state\['k'\]: dict key None of type NoneType"),
        ({"k": {b"x": 0}}, r"state\['k'\]: dict key b'x' of type bytes"),
        ({"k": {2**64: 0}}, r"state\['k'\]: dict key 18446744073709551616 does not fit 64 bits"),
        (
            {"s": ["ok", "\ud800"]},
            r"state\['s'\]\[1\]: string '\\ud800' cannot be stored: it is not valid UTF-8",
        ),
        ({"s": {"\udcff": 1}}, r"state\['s'\]: dict key '\\udcff' cannot be stored"),
    ],
)
def test_unstorable_values_name_their_key_path(state: Any, pattern: str) -> None:
    with pytest.raises(TypeError, match=pattern) as info:
        flatten(state)
    assert isinstance(info.value, UnsupportedValueError)
    assert info.value.key is not None and str(info.value).startswith(info.value.key + ": ")


@pytest.mark.filterwarnings("ignore::UserWarning")  # quantized and sparse CSR creation warn
@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (
            lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8),
            "tensors of dtype torch.quint8",
        ),
        (lambda: torch.empty(4, dtype=torch.int4), "tensors of dtype torch.int4 cannot be stored"),
        (lambda: torch.empty(4, dtype=torch.uint3), "tensors of dtype torch.uint3 cannot be stored"),
        (lambda: torch.eye(3).to_sparse(), r"only dense \(strided\) tensors can be stored"),
        (lambda: torch.eye(3).to_sparse_csr(), r"only dense \(strided\) tensors can be stored"),
        (lambda: torch.empty([1] * 65), "tensors of more than 64 dimensions"),
    ],
)
def test_unstorable_tensors_name_their_key_path(make: Callable[[], torch.Tensor], pattern: str) -> None:
    with pytest.raises(TypeError, match=rf"^state\['model'\]\[0\]: {pattern}") as info:
        flatten({"model": [make()]})
    assert isinstance(info.value, UnsupportedValueError) and info.value.key == "state['model'][0]"


def test_optimizer_with_an_unstorable_param_group_entry(trained: Any) -> None:
    _, optimizer, _ = trained
    optimizer.param_groups[0]["foo"] = Opaque()

    with pytest.raises(TypeError, match=r"^state\['optim'\]\['param_groups'\]\[0\]\['foo'\]: cannot store"):
        flatten({"optim": optimizer})


def test_cycles_are_refused() -> None:
    loop: list[Any] = [1]
    loop.append(loop)

    with pytest.raises(TypeError, match=r"state\['a'\]\[1\]: the state refers to itself \(a cycle\)"):
        flatten({"a": loop})


def test_shared_subtrees_are_not_cycles() -> None:
    shared = {"lr": 0.1}

    assert flatten([shared, shared]).tree == [{"lr": 0.1}, {"lr": 0.1}]


def test_nesting_limit() -> None:
    deepest: Any = []
    for _ in range(fmt.MAX_DEPTH):
        deepest = [deepest]
    flatten(deepest)  # a container at depth MAX_DEPTH is allowed

    with pytest.raises(TypeError, match="nesting deeper than 128 levels"):
        flatten([deepest])


def test_gc_paused_restores_the_collector_even_on_error() -> None:
    assert gc.isenabled()
    with pytest.raises(TypeError), gc_paused():
        assert not gc.isenabled()
        flatten({"bad": object()})
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # a caller's own pause is left alone
    finally:
        gc.enable()


def test_metadata_holds_plain_values_only() -> None:
    assert flatten_metadata(None) == {}
    assert flatten_metadata({"lr": 0.1, "tags": ("a", 2**70)}) == {"lr": 0.1, "tags": ("a", BigInt(2**70))}
    with pytest.raises(UnsupportedValueError, match=r"^metadata\['w'\]: tensors belong in the state") as info:
        flatten_metadata({"w": torch.ones(2)})
    assert info.value.key == "metadata['w']" and isinstance(info.value, TypeError)
