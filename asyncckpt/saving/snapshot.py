"""Application state ⇄ (tree skeleton, table of tensors, list of byte blobs).

``flatten`` walks a state tree once (:func:`~asyncckpt.saving.walker.walk_state`) and lays out its
tensors: a :class:`Structure` (the skeleton, the tensor table, which tensor each blob is copied
from, the blobs' sizes) that depends only on the state's shape and where its tensors live, and a
:class:`Snapshot` of one save (the structure and the tensors found this time). Tensors that share
one storage (tied weights, views) become one blob so that they are written once and restored as
aliases. Nothing is copied here: blob sources are views of the caller's tensors. The inverse is
:func:`asyncckpt._tree.unflatten`.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._gc import gc_paused
from .._tree import renumber_refs
from ..dtypes import itemsize
from ..errors import StateTooLargeError, UnsupportedValueError
from ..format import MAX_INDEX, EncodedLayout, TensorEntry, encode_layout, tensor_size_problem
from .walker import INT64_MIN, UINT64_MAX, StateDicts, Walked, walk_state

__all__ = [
    "INT64_MIN",
    "UINT64_MAX",
    "BlobSource",
    "LayoutKey",
    "Snapshot",
    "StorageKey",
    "Structure",
    "contiguous_stride",
    "flatten",
    "flatten_metadata",
    "gc_paused",
    "lay_out",
    "storage_key",
]

StorageKey = tuple[torch.device, int]
BlobLayout = tuple[int, str, torch.dtype, tuple[int, ...]]
LayoutKey = tuple[BlobLayout, ...]


@dataclass(frozen=True)
class BlobSource:
    """The bytes of one blob, still in the caller's memory.

    ``tensor`` is either a tensor to be stored contiguously (``raw=False``) or a 1-D uint8 view of a
    storage span shared by several tensors (``raw=True``).
    """

    tensor: torch.Tensor
    nbytes: int
    raw: bool
    members: tuple[torch.Tensor, ...] = ()  # raw blobs: the state's views of the span
    storage: StorageKey | None = None  # the source's storage (None when empty)

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def watched(self) -> tuple[torch.Tensor, ...]:
        """The state's own tensors whose version counters tell whether the bytes changed.

        A raw blob's ``tensor`` is a view made here, with a version counter of its own, so the
        members of the span speak for it.
        """
        return self.members if self.raw else (self.tensor,)


@dataclass(frozen=True)
class Span:
    """A blob holding a storage span shared by several tensors: bytes ``[lo, hi)`` of the storage."""

    members: tuple[int, ...]  # indices of the found tensors that view the span
    lo: int
    hi: int


@dataclass(frozen=True, eq=False)
class Structure:
    """What a state's shape and its tensors' places decide; the same for every save of an
    unchanged state, so it is computed once and reused (see :mod:`asyncckpt.saving.fingerprint`).

    Per blob: ``sources[b]`` is the index (in the order found) of the tensor copied into blob
    ``b``, or -1 for a span blob (``spans[b]``); ``storages[b]`` its storage. ``memo`` holds what
    later steps derive from the structure alone (copy plans, the encoded header table).
    """

    tree: Any
    tensors: list[TensorEntry]
    sizes: list[int]
    sources: list[int]
    spans: dict[int, Span]
    storages: list[StorageKey | None]
    layout: LayoutKey
    found: int  # how many tensors a walk of the state finds
    memo: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    @functools.cached_property
    def one_each(self) -> bool:
        """Whether blob ``i`` is the ``i``-th tensor found, for every ``i`` (no aliases, no spans)."""
        return not self.spans and self.sources == list(range(self.found))

    @functools.cached_property
    def uses_cuda(self) -> bool:
        """Whether any blob is copied from a CUDA device."""
        return any(device == "cuda" or device.startswith("cuda:") for _, device, _, _ in self.layout)


class Snapshot:
    """One save's flattened state: its :class:`Structure` and the tensors found this time."""

    def __init__(
        self,
        structure: Structure,
        found: list[torch.Tensor],
        watching: dict[int, tuple[torch.Tensor, ...]] | None = None,
        *,
        versions: list[int] | None = None,
        tree: Any = None,
    ) -> None:
        assert len(found) == structure.found
        self.structure = structure
        self.found = found
        # This save's skeleton where its plain values differ from the structure's (same shape,
        # same tensors: a learning rate or an epoch changed); None: the structure's own.
        self._tree = tree
        # Blobs whose changes show on other tensors than their sources' (a DTensor's local
        # shard: an in-place op counts on the DTensor's version counter, not the shard's).
        self.watching = watching or {}
        # The version counters of ``found``, read while this save checked the structure (on
        # the trainer's thread, before anything was staged); None: staging reads them.
        self.versions = versions

    @property
    def tree(self) -> Any:
        return self.structure.tree if self._tree is None else self._tree

    @property
    def tensors(self) -> list[TensorEntry]:
        return self.structure.tensors

    @property
    def nbytes(self) -> int:
        return self.structure.nbytes

    def layout_key(self) -> LayoutKey:
        """Per blob: size, device, and dtype and shape of what is copied into it. Snapshots with
        equal keys fit the same staging buffers, and the same destination views."""
        return self.structure.layout

    @functools.cached_property
    def sources(self) -> list[torch.Tensor]:
        """Per blob, the tensor whose bytes are copied into it (span blobs: a uint8 view)."""
        found = self.found
        if self.structure.one_each:
            return found
        sources = list(map(found.__getitem__, self.structure.sources))
        for blob, span in self.structure.spans.items():
            sources[blob] = _span_view(found[span.members[0]], span)
        return sources

    def watched(self, blob: int) -> tuple[torch.Tensor, ...]:
        """The state's tensors whose version counters tell whether blob ``blob`` changed."""
        if blob in self.watching:
            return self.watching[blob]
        span = self.structure.spans.get(blob)
        if span is None:
            return (self.sources[blob],)
        return tuple(self.found[i] for i in span.members)

    @functools.cached_property
    def blobs(self) -> list[BlobSource]:
        """Each blob's source, size and storage."""
        structure = self.structure
        return [
            BlobSource(
                tensor,
                size,
                raw=blob in structure.spans,
                members=self.watched(blob) if blob in structure.spans else (),
                storage=storage,
            )
            for blob, (tensor, size, storage) in enumerate(
                zip(self.sources, structure.sizes, structure.storages, strict=True)
            )
        ]


def skeleton_of(walked: Walked, structure: Structure) -> Any:
    """The skeleton of a walked state laid out as ``structure`` (the same shape and tensors,
    other numbers): its refs numbered by ``structure``'s tensor table, which gives aliases of
    one tensor one entry."""
    index: list[int] | None = structure.memo.get("ref_index")
    return walked.tree if index is None else renumber_refs(walked.tree, index)


def encoded_layout(structure: Structure, tree: Any, sizes: Sequence[int]) -> EncodedLayout:
    """The header's tensor table and tree for a save of ``structure`` whose skeleton is
    ``tree`` and blobs have ``sizes``: the structure's own encoded once (kept in its memo),
    another tree (changed plain values) encoded against the kept tensor table.

    Raises what :func:`asyncckpt.format.encode_layout` raises.
    """
    layout: EncodedLayout | None = structure.memo.get("encoded_layout")
    if layout is None:
        layout = encode_layout(tree=structure.tree, tensors=structure.tensors, sizes=sizes)
        structure.memo["encoded_layout"] = layout
    return layout if tree is structure.tree else layout.with_tree(tree)


def flatten(state: Any, state_dicts: StateDicts | None = None) -> Snapshot:
    """Check ``state`` and split it into skeleton, tensor table and blob sources.

    Raises :class:`asyncckpt.errors.UnsupportedValueError` (a ``TypeError``) for the first value
    that cannot be stored; its ``key`` is the value's key path, which the message names too.
    Nothing is written before this returns. ``state_dicts`` replays the ``state_dict()`` results
    an earlier walk of the same save already took.
    """
    walked = walk_state(state, state_dicts)
    return Snapshot(lay_out(walked), walked.tensors)


def flatten_metadata(metadata: dict[str, Any] | None) -> Any:
    """Check user metadata (plain values only) and return its encodable tree.

    Raises :class:`asyncckpt.errors.UnsupportedValueError` for a value that cannot be stored,
    and for a tensor (tensors belong in the state).
    """
    walked = walk_state(metadata or {})
    if walked.tensors:
        key = f"metadata[{walked.keys[0]!r}]"
        raise UnsupportedValueError(f"{key}: tensors belong in the state, not metadata", key=key)
    return walked.tree


def storage_key(tensor: torch.Tensor) -> StorageKey | None:
    """The device and base address of ``tensor``'s storage; None for an empty tensor."""
    if tensor.numel() == 0:
        return None
    # The storage's base address, without building a storage object.
    return (tensor.device, tensor.data_ptr() - int(tensor.storage_offset()) * tensor.itemsize)


def lay_out(walked: Walked) -> Structure:
    """The tensor table and the blobs of a walked state.

    Identical views of one storage (a tied weight reached twice) get one table entry. A storage
    with several distinct views, or viewed by a tensor whose elements overlap in memory (an
    ``expand()``: 2**40 elements of one float are 4 bytes), becomes one span blob holding the
    views with their strides; every other tensor is one blob of its elements, stored contiguously.

    Raises :class:`StateTooLargeError` (with the tensor's key) for a tensor whose shape or
    strides the format cannot hold, before any memory is set aside for it.
    """
    found = walked.tensors
    storages = [storage_key(t) for t in found]
    counts = Counter(storages)
    counts.pop(None, None)
    overlapping = {
        storage
        for tensor, storage, contiguous in zip(
            found, storages, map(torch.Tensor.is_contiguous, found), strict=True
        )
        if not contiguous and storage is not None and _extent_bytes(tensor) < tensor.numel() * tensor.itemsize
    }
    if not overlapping and all(count == 1 for count in counts.values()):
        return _one_blob_each(walked, storages)
    return _LayOut(walked, storages, counts, overlapping).structure()


def _check_size(entry: TensorEntry) -> TensorEntry:
    problem = tensor_size_problem(entry.shape, entry.stride, itemsize(entry.dtype))
    if problem is not None:
        raise StateTooLargeError(f"tensor {entry.key} {problem}", key=entry.key)
    return entry


def _one_blob_each(walked: Walked, storages: list[StorageKey | None]) -> Structure:
    """The common case: no two tensors share a storage, so each is one contiguous blob."""
    fields = [
        (t.dtype, tuple(t.shape), t.numel() * t.itemsize, _device_name(t.device)) for t in walked.tensors
    ]
    tensors = [
        TensorEntry(key, dtype, shape, contiguous_stride(shape), index, 0)
        for index, (key, (dtype, shape, _, _)) in enumerate(zip(walked.keys, fields, strict=True))
    ]
    sizes = [size for _, _, size, _ in fields]
    if max(sizes, default=0) > MAX_INDEX:
        tensors = list(map(_check_size, tensors))
    layout = tuple((size, device, dtype, shape) for dtype, shape, size, device in fields)
    count = len(tensors)
    return Structure(walked.tree, tensors, sizes, list(range(count)), {}, storages, layout, count)


_DEVICE_NAMES: dict[torch.device, str] = {}


def _device_name(device: torch.device) -> str:
    name = _DEVICE_NAMES.get(device)
    if name is None:
        name = _DEVICE_NAMES[device] = str(device)
    return name


class _LayOut:
    """The general case of :func:`lay_out`: some tensors share a storage."""

    def __init__(
        self,
        walked: Walked,
        storages: list[StorageKey | None],
        counts: Counter[StorageKey | None],
        overlapping: set[StorageKey],
    ) -> None:
        self.walked = walked
        self.storages = storages
        self.overlapping = overlapping  # storages viewed by a tensor whose elements overlap
        # View keys cost several microseconds a tensor: only tensors that share a storage need one.
        self.views = [
            (
                storage,
                _view_key(t)
                if storage is not None and (counts[storage] > 1 or storage in overlapping)
                else None,
            )
            for t, storage in zip(walked.tensors, storages, strict=True)
        ]
        self.views_by_storage: dict[StorageKey, set[Any]] = {}
        self.members: dict[StorageKey, list[int]] = {}
        for index, (storage, view_key) in enumerate(self.views):
            if storage is not None:
                self.views_by_storage.setdefault(storage, set()).add(view_key)
                self.members.setdefault(storage, []).append(index)

    def structure(self) -> Structure:
        found = self.walked.tensors
        tensors: list[TensorEntry] = []
        sizes: list[int] = []
        sources: list[int] = []
        spans: dict[int, Span] = {}
        blob_storages: list[StorageKey | None] = []
        layout: list[BlobLayout] = []
        span_blob: dict[StorageKey, int] = {}
        table_by_view: dict[Any, int] = {}
        table_index: list[int] = []
        for index, (tensor, key, view) in enumerate(zip(found, self.walked.keys, self.views, strict=True)):
            storage = view[0]
            if storage is not None and view in table_by_view:
                table_index.append(table_by_view[view])
                continue
            shape = tuple(tensor.shape)
            if storage is not None and (
                len(self.views_by_storage[storage]) > 1 or storage in self.overlapping
            ):
                if storage not in span_blob:
                    span = _span(self.members[storage], found)
                    span_blob[storage] = len(sizes)
                    spans[len(sizes)] = span
                    sizes.append(span.hi - span.lo)
                    sources.append(-1)
                    blob_storages.append(storage)
                    layout.append((span.hi - span.lo, str(tensor.device), torch.uint8, (span.hi - span.lo,)))
                blob = span_blob[storage]
                start = int(tensor.storage_offset()) * tensor.itemsize - spans[blob].lo
                tensors.append(
                    _check_size(TensorEntry(key, tensor.dtype, shape, tuple(tensor.stride()), blob, start))
                )
            else:
                sizes.append(tensor.numel() * tensor.itemsize)
                sources.append(index)
                blob_storages.append(storage)
                layout.append((sizes[-1], str(tensor.device), tensor.dtype, shape))
                stride = contiguous_stride(shape)
                tensors.append(_check_size(TensorEntry(key, tensor.dtype, shape, stride, len(sizes) - 1, 0)))
            table_index.append(len(tensors) - 1)
            if storage is not None:
                table_by_view[view] = table_index[-1]
        tree = self.walked.tree
        memo: dict[str, Any] = {}
        if table_index != list(range(len(table_index))):  # some tensors were aliases: renumber
            tree = renumber_refs(tree, table_index)
            memo["ref_index"] = table_index  # for a skeleton walked again (skeleton_of)
        return Structure(tree, tensors, sizes, sources, spans, blob_storages, tuple(layout), len(found), memo)


def _view_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())


# Span blobs start at a multiple of the largest element size, so every member view keeps its
# element alignment inside the blob.
_SPAN_ALIGN = 16


def _span(members: list[int], found: list[torch.Tensor]) -> Span:
    starts = [int(found[i].storage_offset()) * found[i].itemsize for i in members]
    lo = min(starts) // _SPAN_ALIGN * _SPAN_ALIGN
    hi = max(start + _extent_bytes(found[i]) for start, i in zip(starts, members, strict=True))
    return Span(tuple(members), lo, hi)


def _span_view(member: torch.Tensor, span: Span) -> torch.Tensor:
    """A 1-D uint8 view of bytes ``[lo, hi)`` of ``member``'s storage."""
    raw = torch.empty(0, dtype=torch.uint8, device=member.device)
    raw.set_(member.untyped_storage(), span.lo, (span.hi - span.lo,), (1,))
    return raw


def _extent_bytes(tensor: torch.Tensor) -> int:
    """Bytes from the tensor's first element to one past its last (0 when empty)."""
    if tensor.numel() == 0:
        return 0
    span = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return (span + 1) * tensor.itemsize


@functools.lru_cache(maxsize=4096)
def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape`` (a size-0 dimension counts as 1)."""
    stride = []
    acc = 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))
