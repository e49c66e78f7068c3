"""Application state ⇄ (tree skeleton, table of tensors, list of byte blobs).

``flatten`` walks a state tree once, checks every value, turns objects with ``state_dict()`` into
their state dicts, and replaces each tensor by a :class:`TensorRef` (the inverse is
:func:`asyncckpt._tree.unflatten`). Tensors that share one storage
(tied weights, views) become one blob so that they are written once and restored as aliases.
Nothing is copied here: blob sources are views of the caller's tensors.
"""

from __future__ import annotations

import contextlib
import enum
import gc
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._tree import KeyPath, dotted_key, key_path, renumber_refs
from .._values import SAFE_TYPES_TEXT, NotSafeError, encode, typed_kind
from ..dtypes import dtype_name, itemsize
from ..errors import UnsupportedValueError
from ..format import MAX_DEPTH, MAX_NDIM, BigInt, TensorEntry, TensorRef, TypedValue

# Python ints outside this range are stored as big ints (a msgpack extension type).
INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1


# The table's entries are the format's own (one class for writing and reading). The old name
# stays for the modules that import it from here until they move (writer.py, checkpoint.py).


StorageKey = tuple[torch.device, int]


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


BlobLayout = tuple[int, str, torch.dtype, tuple[int, ...]]
LayoutKey = tuple[BlobLayout, ...]


@dataclass(frozen=True)
class Snapshot:
    """A flattened state: the skeleton with refs, the tensor table and the blob sources."""

    tree: Any
    tensors: list[TensorEntry]
    blobs: list[BlobSource]

    @property
    def nbytes(self) -> int:
        return sum(blob.nbytes for blob in self.blobs)

    def layout_key(self) -> LayoutKey:
        """Per blob: size, device, and dtype and shape of what is copied into it. Snapshots with
        equal keys fit the same staging buffers, and the same destination views."""
        return tuple(
            (b.nbytes, str(b.tensor.device), b.tensor.dtype, tuple(b.tensor.shape)) for b in self.blobs
        )


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a short burst of allocations.

    Flattening a state makes several small objects per tensor; each few hundred of them trigger
    a collection that scans the young objects, which doubled ``flatten``'s time (9 -> 17 ms at
    1,000 tensors). Nothing flattening makes is cyclic garbage, so the pause loses nothing; the
    collector resumes (if it was on) when the block exits, even on error.
    """
    if not gc.isenabled():
        yield
        return
    try:
        gc.disable()  # inside the try: a signal handler raising right after it must not leave it off
        yield
    finally:
        gc.enable()


def flatten(state: Any) -> Snapshot:
    """Check ``state`` and split it into skeleton, tensor table and blob sources.

    Raises :class:`asyncckpt.errors.UnsupportedValueError` (a ``TypeError``) for the first value
    that cannot be stored; its ``key`` is the value's key path, which the message names too.
    Nothing is written before this returns.
    """
    walker = _Walker()
    tree = walker.walk(state, ())
    tensors, blobs, table_index = _tabulate(walker.found)
    if table_index != list(range(len(table_index))):  # some tensors were aliases: renumber
        tree = renumber_refs(tree, table_index)
    return Snapshot(tree=tree, tensors=tensors, blobs=blobs)


def flatten_metadata(metadata: dict[str, Any] | None) -> Any:
    """Check user metadata (plain values only) and return its encodable tree.

    Raises :class:`asyncckpt.errors.UnsupportedValueError` for a value that cannot be stored,
    and for a tensor (tensors belong in the state).
    """
    snapshot = flatten(metadata or {})
    if snapshot.tensors:
        key = f"metadata[{snapshot.tensors[0].key!r}]"
        raise UnsupportedValueError(f"{key}: tensors belong in the state, not metadata", key=key)
    return snapshot.tree


def _unsupported(path: KeyPath, reason: str) -> UnsupportedValueError:
    """The error for a value at ``path`` that cannot be stored; the message starts with the key path."""
    where = key_path(path)
    return UnsupportedValueError(f"{where}: {reason}", key=where)


class _Walker:
    def __init__(self) -> None:
        self.found: list[tuple[torch.Tensor, KeyPath]] = []
        self._active: set[int] = set()
        self._in_typed = 0  # > 0 while walking the fields of a typed value

    def walk(self, value: Any, path: KeyPath) -> Any:
        if len(path) > MAX_DEPTH:
            raise _unsupported(path, f"nesting deeper than {MAX_DEPTH} levels")
        if isinstance(value, torch.Tensor):  # first: the most common leaf of a big state
            return self._tensor(value, path)
        if isinstance(value, enum.Enum):  # before str and int: IntEnum and StrEnum keep their type
            return self._typed(value, "enum", path)
        if isinstance(value, str):
            return _text(value, path, "string")
        if value is None or isinstance(value, bool | bytes):
            return _exact(value)
        if isinstance(value, int):
            return _int(int(value))
        if isinstance(value, float):
            return float(value)
        if isinstance(value, Mapping | list | tuple):
            return self._container(value, path)
        state_dict = getattr(value, "state_dict", None)
        if callable(state_dict) and not self._in_typed:
            return self.walk(state_dict(), path)
        kind = typed_kind(value)
        if kind is not None:
            return self._typed(value, kind, path)
        raise _unsupported(
            path,
            f"cannot store a value of type {type(value).__qualname__}; checkpoints hold dicts, lists, "
            f"tuples, None, bool, int, float, str, bytes, tensors, objects with state_dict() and "
            f"{SAFE_TYPES_TEXT}: convert it to one of those (e.g. str(value)) or leave it out",
        )

    def _typed(self, value: Any, kind: str, path: KeyPath) -> TypedValue:
        """A safe typed value; its fields are walked as plain values (no tensors, no state dicts)."""
        self._in_typed += 1
        try:
            return encode(value, kind, lambda child, key: self.walk(child, (*path, key)))
        except NotSafeError as exc:
            raise _unsupported(path, str(exc)) from None
        finally:
            self._in_typed -= 1

    def _tensor(self, tensor: torch.Tensor, path: KeyPath) -> TensorRef:
        if self._in_typed:
            raise _unsupported(
                path, "a tensor inside an enum, dataclass or Namespace cannot be stored; put it in the state"
            )
        if dtype_name(tensor.dtype) is None:
            raise _unsupported(path, f"tensors of dtype {tensor.dtype} cannot be stored")
        if tensor.layout is not torch.strided:  # sparse, sparse_csr, mkldnn, jagged, ...
            raise _unsupported(path, "only dense (strided) tensors can be stored")
        if tensor.dim() > MAX_NDIM:
            raise _unsupported(path, f"tensors of more than {MAX_NDIM} dimensions")
        self.found.append((tensor.detach(), path))
        return TensorRef(len(self.found) - 1)

    def _container(self, value: Any, path: KeyPath) -> Any:
        if id(value) in self._active:
            raise _unsupported(path, "the state refers to itself (a cycle)")
        self._active.add(id(value))
        try:
            if isinstance(value, Mapping):
                return {self._key(k, path): self.walk(v, (*path, k)) for k, v in value.items()}
            items = [self.walk(v, (*path, i)) for i, v in enumerate(value)]
            return tuple(items) if isinstance(value, tuple) else items
        finally:
            self._active.discard(id(value))

    @staticmethod
    def _key(key: Any, path: KeyPath) -> str | int:
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise _unsupported(
                path,
                f"dict key {key!r} of type {type(key).__qualname__} "
                "cannot be stored (keys must be str or int)",
            )
        if isinstance(key, int) and not INT64_MIN <= key <= UINT64_MAX:
            raise _unsupported(path, f"dict key {key} does not fit 64 bits")
        return _text(key, path, "dict key") if isinstance(key, str) else int(key)


def _text(value: str, path: KeyPath, what: str) -> str:
    """``value`` as an exact ``str``; lone surrogates have no UTF-8 form, so msgpack cannot store them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _unsupported(
            path, f"{what} {value!r} cannot be stored: it is not valid UTF-8 ({exc.reason})"
        ) from None
    return str(value)


def _exact(value: Any) -> Any:
    if isinstance(value, bytes) and type(value) is not bytes:
        return bytes(value)
    return value


def _int(value: int) -> int | BigInt:
    return value if INT64_MIN <= value <= UINT64_MAX else BigInt(value)


def _extent_bytes(tensor: torch.Tensor) -> int:
    """Bytes from the tensor's first element to one past its last (0 when empty)."""
    if tensor.numel() == 0:
        return 0
    span = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return (span + 1) * itemsize(tensor.dtype)


def storage_key(tensor: torch.Tensor) -> StorageKey | None:
    if tensor.numel() == 0:
        return None
    # The storage's base address, without building a storage object (that costs ~20 us a tensor).
    base = tensor.data_ptr() - int(tensor.storage_offset()) * itemsize(tensor.dtype)
    return (tensor.device, base)


def _view_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())


def _tabulate(
    found: list[tuple[torch.Tensor, KeyPath]],
) -> tuple[list[TensorEntry], list[BlobSource], list[int]]:
    """Build the tensor table and the blobs; return also each found tensor's table index.

    Identical views of one storage (a tied weight reached twice) get one table entry. A storage
    with several distinct views becomes one span blob holding the views with their strides;
    every other tensor is one blob of its elements, stored contiguously.
    """
    storages = [storage_key(t) for t, _ in found]
    counts = Counter(storages)
    # View keys cost several microseconds a tensor: only tensors that share a storage need one.
    keys = [
        (storage, _view_key(t) if storage is not None and counts[storage] > 1 else None)
        for (t, _), storage in zip(found, storages, strict=True)
    ]
    views_by_storage: dict[StorageKey, set[tuple[Any, ...] | None]] = {}
    members: dict[StorageKey, list[torch.Tensor]] = {}
    for (tensor, _), (storage, view_key) in zip(found, keys, strict=True):
        if storage is not None:
            views_by_storage.setdefault(storage, set()).add(view_key)
            members.setdefault(storage, []).append(tensor)
    tensors: list[TensorEntry] = []
    blobs: list[BlobSource] = []
    span_blob: dict[StorageKey, int] = {}
    table_by_view: dict[tuple[Any, ...], int] = {}
    table_index: list[int] = []
    for (tensor, path), (storage, view_key) in zip(found, keys, strict=True):
        view = (storage, view_key)
        if storage is not None and view in table_by_view:
            table_index.append(table_by_view[view])
            continue
        if storage is not None and len(views_by_storage[storage]) > 1:
            if storage not in span_blob:
                span_blob[storage] = _add_span_blob(members[storage], storage, blobs)
            blob = span_blob[storage]
            tensors.append(_spec(tensor, path, blob, _span_start(blobs[blob], tensor)))
        else:
            nbytes = tensor.numel() * itemsize(tensor.dtype)
            blobs.append(BlobSource(tensor, nbytes, raw=False, storage=storage))
            shape = tuple(tensor.shape)
            tensors.append(_spec(tensor, path, len(blobs) - 1, 0, stride=contiguous_stride(shape)))
        table_index.append(len(tensors) - 1)
        if storage is not None:
            table_by_view[view] = table_index[-1]
    return tensors, blobs, table_index


# Span blobs start at a multiple of the largest element size, so every member view keeps its
# element alignment inside the blob.
_SPAN_ALIGN = 16


def _add_span_blob(members: list[torch.Tensor], storage_id: StorageKey, blobs: list[BlobSource]) -> int:
    starts = [int(t.storage_offset()) * itemsize(t.dtype) for t in members]
    lo = min(starts) // _SPAN_ALIGN * _SPAN_ALIGN
    hi = max(s + _extent_bytes(t) for s, t in zip(starts, members, strict=True))
    storage = members[0].untyped_storage()
    raw = torch.empty(0, dtype=torch.uint8, device=members[0].device)
    raw.set_(storage, lo, (hi - lo,), (1,))
    blobs.append(BlobSource(raw, hi - lo, raw=True, members=tuple(members), storage=storage_id))
    return len(blobs) - 1


def _span_start(blob: BlobSource, tensor: torch.Tensor) -> int:
    return int(tensor.storage_offset()) * itemsize(tensor.dtype) - int(blob.tensor.storage_offset())


def _spec(
    tensor: torch.Tensor,
    path: KeyPath,
    blob: int,
    offset: int,
    *,
    stride: tuple[int, ...] | None = None,
) -> TensorEntry:
    return TensorEntry(
        key=dotted_key(path),
        dtype=tensor.dtype,
        shape=tuple(tensor.shape),
        stride=tuple(tensor.stride()) if stride is None else stride,
        blob=blob,
        offset=offset,
    )


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride = []
    acc = 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))
