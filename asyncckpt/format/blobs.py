"""Reading and checking blobs of a checked layout, and the bytes of tensors as memory views.

Everything here reads from a file-like object it is given (``seek``, ``readinto``); threads
and buffers belong to the caller. A broken blob raises :class:`CorruptedCheckpointError` with
``path``, ``blob``, ``offset`` and (when a tensor lies in it) ``key``.
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import crc32c
import torch

from ..dtypes import DTYPE_BY_NAME, itemsize
from ..errors import CorruptedCheckpointError, Where
from .spec import CHUNK, Layout, TensorEntry

_HAVE_NUMPY = importlib.util.find_spec("numpy") is not None
_ITEMSIZE = {dtype: itemsize(dtype) for dtype in DTYPE_BY_NAME.values()}


def read_blob_into(
    file: BinaryIO, layout: Layout, index: int, dest: memoryview, *, verify: bool, path: Where = None
) -> None:
    """Read blob ``index`` straight into ``dest`` (its exact size), checking its CRC32C if ``verify``."""
    blob = layout.blobs[index]
    assert len(dest) == blob.nbytes
    file.seek(blob.offset)
    crc = 0
    for start in range(0, blob.nbytes, CHUNK):
        chunk = dest[start : start + CHUNK]
        got = file.readinto(chunk)  # type: ignore[attr-defined]
        if got != len(chunk):
            raise _truncated_blob(layout, index, start, path)
        if verify:
            crc = crc32c.crc32c(chunk, crc)
    if verify and crc != blob.crc:
        raise _crc_mismatch(layout, index, crc, path)


def verify_crc(layout: Layout, index: int, data: memoryview, *, path: Where = None) -> None:
    """Check the CRC32C of blob ``index`` whose bytes ``data`` already holds."""
    crc = crc32c.crc32c(data)
    if crc != layout.blobs[index].crc:
        raise _crc_mismatch(layout, index, crc, path)


def check_crc(layout: Layout, index: int, crc: int, *, path: Where = None) -> None:
    """Raise the checksum mismatch of blob ``index`` unless ``crc`` is its CRC32C."""
    if crc != layout.blobs[index].crc:
        raise _crc_mismatch(layout, index, crc, path)


def truncated(layout: Layout, index: int, start: int, *, path: Where = None) -> CorruptedCheckpointError:
    """The error for blob ``index`` ending ``start`` bytes into the blob (the file is too short)."""
    return _truncated_blob(layout, index, start, path)


def check_blob(
    file: BinaryIO, layout: Layout, index: int, *, path: Where = None, scratch: memoryview
) -> None:
    """Read blob ``index`` chunk by chunk through ``scratch`` and check its CRC32C; keep nothing.

    ``scratch`` may be any size; :data:`~.spec.CHUNK` bytes is enough. Raises
    :class:`CorruptedCheckpointError` like :func:`read_blob_into`.
    """
    blob = layout.blobs[index]
    file.seek(blob.offset)
    crc = 0
    for start in range(0, blob.nbytes, len(scratch)):
        chunk = scratch[: min(len(scratch), blob.nbytes - start)]
        got = file.readinto(chunk)  # type: ignore[attr-defined]
        if got != len(chunk):
            raise _truncated_blob(layout, index, start, path)
        crc = crc32c.crc32c(chunk, crc)
    if crc != blob.crc:
        raise _crc_mismatch(layout, index, crc, path)


def verify_blobs(file: BinaryIO, layout: Layout, *, path: Where = None, scratch_bytes: int = CHUNK) -> None:
    """Re-read every blob through one small scratch buffer and check its CRC32C (:func:`check_blob`)."""
    scratch = memoryview(bytearray(scratch_bytes))
    for index in range(len(layout.blobs)):
        check_blob(file, layout, index, path=path, scratch=scratch)


def _truncated_blob(layout: Layout, index: int, start: int, path: Where) -> CorruptedCheckpointError:
    offset = layout.blobs[index].offset + start
    return CorruptedCheckpointError(
        f"truncated inside {layout.blob_key(index)} at offset {offset}",
        path=path,
        blob=index,
        offset=offset,
        key=layout.tensor_key(index),
    )


def _crc_mismatch(layout: Layout, index: int, crc: int, path: Where) -> CorruptedCheckpointError:
    blob = layout.blobs[index]
    return CorruptedCheckpointError(
        f"checksum mismatch in {layout.blob_key(index)} (blob {index} at offset "
        f"{blob.offset}, {blob.nbytes} bytes): expected crc32c {blob.crc:08x}, found {crc:08x}",
        path=path,
        blob=index,
        offset=blob.offset,
        key=layout.tensor_key(index),
    )


def view_tensor(entry: TensorEntry, blob: torch.Tensor) -> torch.Tensor:
    """The tensor ``entry`` describes, as a view of ``blob`` (a 1-D uint8 tensor)."""
    size = itemsize(entry.dtype)
    view = torch.empty(0, dtype=entry.dtype, device=blob.device)
    offset = (blob.storage_offset() + entry.offset) // size
    view.set_(blob.untyped_storage(), offset, entry.shape, entry.stride)
    return view


def view_tensors(entries: Sequence[TensorEntry], blobs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every tensor ``entries`` describe, as a view of its blob in ``blobs`` (1-D uint8 tensors
    at storage offset 0, such as a reader's own buffers): :func:`view_tensor`, in one loop."""
    empty = torch.empty
    storages = [blob.untyped_storage() for blob in blobs]
    views = []
    for entry in entries:
        dtype = entry.dtype
        view = empty(0, dtype=dtype).set_(
            storages[entry.blob], entry.offset // _ITEMSIZE[dtype], entry.shape, entry.stride
        )
        views.append(view)
    return views


def buffers_bytes(buffers: Sequence[torch.Tensor]) -> list[memoryview]:
    """:func:`tensor_bytes` of a reader's own buffers (new 1-D uint8 CPU tensors), in one loop."""
    if _HAVE_NUMPY:
        arrays: list[Any] = [buffer.numpy() for buffer in buffers]
        return [memoryview(array) for array in arrays]
    return [tensor_bytes(buffer) for buffer in buffers]


# dtypes numpy holds bit for bit (bfloat16, float8 and complex go through an int of their size).
_NUMPY_SAFE = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.float32,
        torch.float64,
    }
)

# An int dtype of each element size, to view the others through (a view of the same element size
# is allowed for any shape, a 0-dim tensor included).
_SAME_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensors_bytes(
    tensors: Iterable[torch.Tensor], to_host: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[memoryview]:
    """:func:`tensor_bytes` of each tensor, in turn; a tensor that is not a contiguous CPU
    tensor is passed through ``to_host`` first (one at a time: a CUDA state is never all on
    the host at once). The views keep their tensors alive.

    The common case costs the fewest calls (this runs once per blob of every one-shot save, on
    the thread whose GIL the writing thread waits for): a contiguous CPU tensor of a dtype
    numpy maps as it is, not requiring grad, whose ``numpy()`` refuses what its memory does
    not hold as its values (a negative view); anything else goes through :func:`tensor_bytes`.
    """
    safe = _NUMPY_SAFE
    for tensor in tensors:
        view = None
        if tensor.dtype in safe and tensor.is_cpu and not tensor.requires_grad and tensor.is_contiguous():
            if tensor.numel():
                try:
                    array: Any = tensor.numpy()
                    view = memoryview(array).cast("B")
                except RuntimeError:  # a negative view: resolved by tensor_bytes
                    view = None
        elif not (tensor.is_cpu and tensor.is_contiguous()):
            tensor = to_host(tensor)
        yield tensor_bytes(tensor) if view is None else view


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy view of the bytes of a contiguous CPU tensor; the view keeps the tensor alive.

    A conjugate or negative view (``t.conj()`` of a complex tensor, ``torch._neg_view``) is
    resolved into a copy first: its memory holds the values before the conjugation or negation,
    which are not the tensor's values. Raises ``ValueError`` for a tensor that is not a
    contiguous CPU tensor (the caller's bug, never the user's).
    """
    dtype = tensor.dtype
    if (
        _HAVE_NUMPY
        and tensor.is_cpu
        and tensor.is_contiguous()
        and tensor.numel()
        and not tensor.is_neg()
        and not tensor.is_conj()
    ):
        # The common case first, with the fewest calls (it runs once per blob of every save
        # and load: a sync save of 10,000 tensors spent 60 ms here holding the GIL its
        # writing thread waits for): numpy maps these dtypes as they are, and the others
        # (bfloat16, float8, complex) as an int of the same size.
        if dtype in _NUMPY_SAFE:
            own: Any = tensor.detach().numpy()
            return memoryview(own).cast("B")
        same = _SAME_SIZE.get(itemsize(dtype))
        if same is not None:
            own = tensor.detach().view(same).numpy()
            return memoryview(own).cast("B")
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    if tensor.is_conj() or tensor.is_neg():
        tensor = tensor.resolve_conj().resolve_neg()
    nbytes = tensor.numel() * itemsize(tensor.dtype)
    if nbytes == 0:
        return memoryview(bytearray(0))
    if _HAVE_NUMPY:  # 4x cheaper than a ctypes array (a new ctypes type per size)
        flat = tensor.detach().as_strided((tensor.numel(),), (1,))  # a size-1 dim may carry any stride
        array_: Any = flat.view(torch.uint8).numpy()  # keeps the tensor alive
        return memoryview(array_).cast("B")
    array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    array._owner = tensor  # type: ignore[attr-defined]  # keeps the memory alive with the view
    return memoryview(array).cast("B")
