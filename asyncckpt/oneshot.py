"""One-shot ``asyncckpt.save`` and ``asyncckpt.load``: one checkpoint file, synchronously.

``save`` writes durably and atomically; ``load`` reads through the same reader as a resume
(:mod:`asyncckpt.reader`), so ``load(map_location="cuda")`` and ``restore()`` read a file the
same way.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import format as fmt
from . import reader
from ._gc import gc_paused
from ._tree import unflatten
from .format import FileKind
from .format.blobs import tensors_bytes
from .format.legacy import LEGACY_VERSION, legacy_step
from .loading.options import VERIFY_MODES, MapLocation, Verify, one_of
from .saving.fingerprint import StructureCache
from .saving.readback import VerifyMode, verify_written
from .saving.snapshot import Snapshot, encoded_layout, flatten_metadata
from .storage import (
    OS,
    Body,
    CheckpointPath,
    FileOps,
    PosixStorage,
    ReadHandle,
    Sink,
    Storage,
    is_url,
    local_path,
    open_storage,
    path_of,
)

__all__ = ["Checkpoint", "MapLocation", "load", "save", "wait_replaced_dropped"]


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its state tree, step, user metadata, format version and file
    (a ``Path``, or a :class:`~asyncckpt.storage.RemotePath` for a URL)."""

    state: Any
    step: int
    metadata: dict[str, Any]
    version: str
    path: CheckpointPath


def save(
    path: str | os.PathLike[str],
    state: Any,
    *,
    step: int,
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    ops: FileOps = OS,
    verify: VerifyMode = "structure",
) -> CheckpointPath:
    """Write ``state`` to ``path`` durably and atomically; return the path.

    After a crash at any instant ``path`` holds either its previous complete content or the new
    complete file. A file it replaces is deleted after it returns, on a thread of its own (the
    interpreter waits for it at exit; :func:`wait_replaced_dropped` waits now). Tensor bytes are
    written straight from tensor memory (CUDA tensors are copied to the host one at a time).
    Before it is published the durable file is read back as ``verify`` says, as the checkpointer
    does: ``"structure"`` (default: prelude, trailer, size and header
    checksum), ``"full"`` (also every blob's checksum) or ``"none"``. Raises ``TypeError``
    naming the key path of a value that cannot be stored, ``TypeError`` / ``ValueError`` for a
    step that is not an int in ``[0, 2**63 - 1]`` and :class:`UsageError` for another
    ``verify``, before anything is written; :class:`CheckpointWriteError` when the write fails
    or the file does not read back (nothing is published then).

    ``path`` may be a URL (``s3://bucket/run/model.ckpt``; ``storage_options`` go to fsspec):
    the bytes are uploaded, then a commit object makes them visible (docs/REMOTE.md), and a
    :class:`~asyncckpt.storage.RemotePath` is returned.
    """
    fmt.check_step(step)
    mode = one_of("verify", verify, VERIFY_MODES)
    # Several small objects per tensor, none cyclic: with a trainer's many live objects, the
    # collections they would trigger cost more than the save (a third of it at 10,000 tensors).
    # They are all gone when _save returns, before the collector resumes.
    with gc_paused():
        return _save(os.fspath(path), state, step, metadata, storage_options, ops, mode)


def _save(
    text: str,
    state: Any,
    step: int,
    metadata: dict[str, Any] | None,
    storage_options: dict[str, Any] | None,
    ops: FileOps,
    verify: VerifyMode,
) -> CheckpointPath:
    snapshot = _flatten(state)
    meta = flatten_metadata(metadata)
    header = fmt.prepare_header(step=step, metadata=meta, layout=_encoded_layout(snapshot))
    body = _body(header, _host_bytes(snapshot))
    if is_url(text):
        storage, name = _folder_of(text, storage_options, ops)
        path: CheckpointPath = path_of(text)
    else:
        path = Path(local_path(text))
        storage, name = PosixStorage(path.parent, ops=ops), path.name
    written = storage.write(name, body)
    try:
        verify_written(storage, written, mode=verify, step=step, path=path)
    except BaseException:
        storage.discard(written)
        raise
    storage.commit(written)
    _drop_replaced_later(storage)
    return path


# The threads deleting what one-shot saves replaced (see _drop_replaced_later).
_dropping: set[threading.Thread] = set()
_dropping_lock = threading.Lock()


def _drop_replaced_later(storage: Storage) -> None:
    """Delete the file a save replaced (kept aside by the commit) on a thread of its own, after
    the save returned: on a filesystem that discards freed blocks that takes a fraction of a
    second per GiB, which is no part of the new file's durability. The thread is not a daemon:
    the interpreter waits for it at exit, so the process leaves no hidden file behind. Where no
    thread may start (a save from an ``atexit`` hook, on Python 3.12 and later) it is deleted
    here, before the save returns."""
    if not isinstance(storage, PosixStorage) or not storage.has_replaced:
        return
    thread = threading.Thread(target=_drop, args=(storage,), name="asyncckpt-drop-replaced")
    with _dropping_lock:
        _dropping.add(thread)
    try:
        thread.start()
    except RuntimeError:  # the interpreter is shutting down
        _drop(storage, thread)


def _drop(storage: PosixStorage, thread: threading.Thread | None = None) -> None:
    try:
        storage.drop_replaced()
    finally:
        with _dropping_lock:
            _dropping.discard(thread or threading.current_thread())


def wait_replaced_dropped() -> None:
    """Wait until the files that this process's one-shot saves replaced are deleted (they are
    deleted in the background after each save returns; the interpreter waits for them at exit)."""
    with _dropping_lock:
        threads = list(_dropping)
    for thread in threads:
        thread.join()


def _body(header: fmt.PreparedHeader, blobs: Iterator[memoryview]) -> Body:
    def body(sink: Sink) -> int:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncckpt-crc") as checksums:
            return fmt.write_file(sink, header, blobs, checksum_pool=checksums)

    return body


def _folder_of(url: str, storage_options: dict[str, Any] | None, ops: FileOps = OS) -> tuple[Storage, str]:
    """The storage of a URL's folder, and the object's name in it."""
    folder, _, name = url.rpartition("/")
    return open_storage(folder, storage_options=storage_options, ops=ops), name


# Per thread, the structure of the last state it saved: a trainer saving the same model every
# N steps has it laid out once (see saving.fingerprint). Holds no tensor.
_structures = threading.local()


def _flatten(state: Any) -> Snapshot:
    """``flatten(state)``, reusing this thread's last structure while the state keeps its shape."""
    cache: StructureCache | None = getattr(_structures, "cache", None)
    if cache is None:
        cache = _structures.cache = StructureCache()
    return cache.snapshot(state)[0]


def _encoded_layout(snapshot: Snapshot) -> fmt.EncodedLayout:
    structure = snapshot.structure
    return encoded_layout(structure, snapshot.tree, structure.sizes)


def _host_bytes(snapshot: Snapshot) -> Iterator[memoryview]:
    return tensors_bytes(snapshot.sources, _host_contiguous)


def _host_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return tensor.contiguous()


def load(
    path: str | os.PathLike[str],
    *,
    map_location: MapLocation = "cpu",
    verify: Verify = "full",
    storage_options: dict[str, Any] | None = None,
) -> Checkpoint:
    """Read and check one checkpoint file (a path, or a URL with ``storage_options`` for fsspec).

    v1 files are checked for structure and, with ``verify="full"``, every checksum
    (``"structure"`` and ``"none"`` skip the tensor checksums; the structure is always checked);
    tensors are read straight into their own memory on ``map_location`` (CUDA through pinned
    bounce buffers). Legacy ``torch.save`` files load read-only with ``weights_only=True`` and
    report ``version == "0.x"`` (and ``step == -1`` when they have none).

    Raises :class:`CorruptedCheckpointError` (broken bytes), :class:`UnsupportedVersionError`
    (newer format), :class:`UsageError` for another ``verify``, ``FileNotFoundError`` for a file
    that is missing or not a regular file, ``PermissionError`` for one that cannot be opened.
    """
    checksums = one_of("verify", verify, VERIFY_MODES) == "full"
    text = os.fspath(path)
    if is_url(text):
        storage, name = _folder_of(text, storage_options)
    else:
        local = Path(local_path(text))
        storage, name = open_storage(local.parent), local.name
    file_path = path_of(storage.where(name))
    where = str(file_path)
    with storage.open(name) as handle:
        kind = reader.file_kind(handle, where)
        if kind is FileKind.V1:
            return _load_v1(handle, file_path, device=torch.device(map_location), checksums=checksums)
        legacy = reader.read_legacy(handle, kind, where=where, map_location=map_location, checksums=checksums)
    step = legacy_step(legacy.state, Path(name))
    return Checkpoint(legacy.state, -1 if step is None else step, {}, LEGACY_VERSION, file_path)


def _load_v1(
    handle: ReadHandle, path: CheckpointPath, *, device: torch.device, checksums: bool
) -> Checkpoint:
    where = str(path)
    layout = reader.read_layout(handle, where)
    tensors = reader.read_tensors(handle, layout, where=where, checksums=checksums, device=device)
    with gc_paused():  # a dict or list per container and a tensor per leaf: nothing cyclic
        state = unflatten(layout.tree, tensors)
    metadata = unflatten(layout.metadata, [])
    return Checkpoint(state, layout.step, metadata, layout.version, path)
