"""Rollback loader: find the newest intact, compatible checkpoint, diagnose the rest, restore it.

Candidates are the committed ``step-*.ckpt`` files of a directory and legacy ``torch.save`` files
(``*.pt``, ``*.pth``) whose step can be read, newest step first. Each is checked (structure,
checksums, and the expected keys and shapes) until one is usable; every failure becomes a
:class:`Diagnostic`, a line of ``failed_checkpoints.txt`` and part of the summary. The loader
never modifies or deletes a checkpoint.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

import structlog
import torch

from . import format as fmt
from ._tree import unflatten
from .catalog import kind_of, list_checkpoints
from .compat import Expected, TensorShape, compare, expected_for_restore, expected_from, tensor_index
from .dtypes import itemsize
from .errors import (
    CheckpointError,
    CorruptedCheckpointError,
    Diagnostic,
    IncompatibleCheckpointError,
    NoValidCheckpointError,
    UsageError,
)
from .format.legacy import LEGACY_VERSION, is_zip_torch_save, legacy_step, load_legacy

FAILED_LOG_NAME = "failed_checkpoints.txt"
SUMMARY_EVENT = "checkpoint.load.summary"
MAX_READ_THREADS = 8
PARALLEL_READ_MIN_BYTES = 32 << 20  # smaller files are read by one thread

OnCorrupt = Literal["fallback", "fail"]
Log = Callable[..., None]
MapLocation = str | torch.device


@dataclass(frozen=True)
class LoadResult:
    """The checkpoint a rollback load resumed from.

    ``source`` is "primary" when the newest candidate loaded, "fallback" otherwise; then
    ``diagnostics`` says why each newer candidate was skipped. ``summary`` is the one-line text
    that was logged. ``version`` is the file's format version ("0.x" for legacy files).
    """

    state: Any
    step: int
    path: Path
    version: str
    source: Literal["primary", "fallback"]
    diagnostics: list[Diagnostic]
    summary: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CandidateReport:
    """What :func:`check_candidates` found out about one file.

    ``step`` is None for a legacy file whose step cannot be read; ``version`` is None when the
    file is too broken to say; ``reason`` is None when ``status`` is "valid".
    """

    step: int | None
    path: Path
    size: int
    version: str | None
    status: Literal["valid", "corrupted", "incompatible"]
    reason: str | None


def load_latest(
    directory: str | os.PathLike[str],
    *,
    map_location: MapLocation = "cpu",
    on_corrupt: OnCorrupt = "fallback",
    validate: bool = True,
    expect: Any = None,
    log: Log | None = None,
) -> LoadResult:
    """Load the newest usable checkpoint in ``directory``, falling back past broken ones.

    Each candidate, newest step first, is checked for structure and (``validate=True``) every
    checksum, and, when ``expect`` is given (a state tree or objects with ``state_dict()``),
    against its tensors: missing or unexpected keys and shape mismatches make a candidate
    incompatible; dtype differences are only reported in the summary. With
    ``on_corrupt="fallback"`` a failed candidate is diagnosed and the next one tried; with
    ``"fail"`` the first failure is raised at once (:class:`CorruptedCheckpointError` or
    :class:`IncompatibleCheckpointError`). Failures are appended to
    ``<directory>/failed_checkpoints.txt`` (a read-only directory only warns); the summary is
    logged as the ``checkpoint.load.summary`` event through ``log`` (default: structlog's
    "asyncckpt" logger).

    Raises :class:`NoValidCheckpointError` when no candidate is usable, with every diagnosis in
    its ``diagnostics``; for an empty or missing directory its message says "no checkpoints in"
    and ``diagnostics`` is empty. ``NotADirectoryError`` when ``directory`` is a file. Blocking:
    call it from a worker thread in async code.
    """
    request = _Request(torch.device(map_location), validate, _checks(expect), None)
    return _rollback(Path(directory), request, on_corrupt=on_corrupt, log=log)


def restore(
    directory: str | os.PathLike[str],
    objects: Mapping[str, Any],
    *,
    map_location: MapLocation = "cpu",
    on_corrupt: OnCorrupt = "fallback",
    validate: bool = True,
    expect: Any = None,
    log: Log | None = None,
) -> LoadResult:
    """Load the newest usable checkpoint into ``objects`` (name → object with ``load_state_dict``).

    Like :func:`load_latest`, and besides: a candidate must hold every name of ``objects``, the
    exact tensor keys and shapes of each ``torch.nn.Module`` and the parameter-group sizes of
    each optimizer, all checked before anything is read into an object. Each object then gets
    ``load_state_dict(state[name])`` (``strict=True`` for modules); a refusal makes the candidate
    incompatible and the next one is tried. A module's tensors are read from the file straight
    into their own memory when dtype and shape match (CUDA tensors through pinned host bounce
    buffers), and so is an optimizer's state when it already has some (an in-process rollback),
    so no second copy is made; ``result.state`` then shares that memory.
    Big files are read by several threads at once.

    When a candidate fails halfway, some objects may already hold its data; a later candidate
    that loads overwrites all of them. If :class:`NoValidCheckpointError` is raised, do not use
    the objects unless its ``diagnostics`` is empty: that means the directory has no candidate
    at all (a fresh start) and nothing was touched.
    """
    for name, obj in objects.items():
        if not callable(getattr(obj, "load_state_dict", None)):
            raise TypeError(f"objects[{name!r}] ({type(obj).__qualname__}) has no load_state_dict()")
    checks = (*_checks(expect), expected_for_restore(objects))
    request = _Request(torch.device(map_location), validate, checks, objects)
    return _rollback(Path(directory), request, on_corrupt=on_corrupt, log=log)


def check_candidates(
    directory_or_file: str | os.PathLike[str], *, verify: Literal["full", "structure"] = "full"
) -> list[CandidateReport]:
    """Check every candidate of a directory (newest first), or one file, without keeping any data.

    ``verify="full"`` checks what a resume checks: the structure and every blob's checksum (legacy
    files are unpickled); ``verify="structure"`` checks the prelude, trailer and header only.
    Nothing is written. Raises ``FileNotFoundError`` for a missing file and
    :class:`~asyncckpt.errors.UsageError` for another ``verify``.
    """
    if verify not in ("full", "structure"):
        raise UsageError(f"verify must be 'full' or 'structure', not {verify!r}")
    full = verify == "full"
    target = Path(directory_or_file)
    if target.is_dir():
        found = _discover(target)
        candidates = found.candidates + found.ignored
    else:
        candidates = [_probe(target)]
    return [_check(candidate, full=full) for candidate in candidates]


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class _Candidate:
    path: Path
    step: int | None
    size: int
    error: CheckpointError | None = None  # found while reading a legacy file's step


@dataclass(frozen=True)
class _Found:
    candidates: list[_Candidate]  # newest step first
    ignored: list[_Candidate]  # legacy files without a readable step


def _discover(root: Path) -> _Found:
    committed = [_Candidate(info.path, info.step, info.size) for info in list_checkpoints(root)]
    legacy = [_probe(path) for path in _legacy_files(root)]
    ordered = committed + [c for c in legacy if c.step is not None]
    # One step written twice (Lightning's epoch file, then last.ckpt): the later write first.
    ordered.sort(key=lambda c: (-(c.step or 0), c.path.suffix != ".ckpt", -_mtime(c.path), c.path.name))
    return _Found(ordered, [c for c in legacy if c.step is None])


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _legacy_files(root: Path) -> list[Path]:
    """Legacy files, and ``*.ckpt`` files at names a caller chose (``last.ckpt``): their step
    is read from their content."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    return sorted(
        root / e.name
        for e in entries
        if kind_of(e.name) in ("legacy", "named") and e.is_file(follow_symlinks=False)
    )


def _probe(path: Path) -> _Candidate:
    """A candidate for any file: its step read from its content (cheaply), else from its name."""
    size = path.stat().st_size
    try:
        return _Candidate(path, _read_step(path), size)
    except CheckpointError as exc:
        return _Candidate(path, legacy_step(None, path), size, exc)


def _read_step(path: Path) -> int | None:
    with _open(path) as file:
        head = file.read(fmt.SNIFF_BYTES)
        if fmt.sniff(head, path=path) is fmt.FileKind.V1:
            return fmt.read_layout(file, str(path)).step
    # mmap: only the pickled structure is read, not the tensor data
    return legacy_step(load_legacy(path, mmap=is_zip_torch_save(head)), path)


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb", buffering=0)
    except OSError as exc:
        raise CorruptedCheckpointError(f"{path}: cannot be opened: {exc.strerror or exc}") from exc


# --------------------------------------------------------------------------- loading one candidate


@dataclass(frozen=True)
class _Request:
    device: torch.device
    validate: bool
    checks: tuple[Expected, ...]
    objects: Mapping[str, Any] | None  # restore's targets


@dataclass(frozen=True)
class _Loaded:
    state: Any
    step: int
    version: str
    metadata: dict[str, Any]
    notes: list[str]  # dtype differences


def _checks(expect: Any) -> tuple[Expected, ...]:
    return () if expect is None else (expected_from(expect),)


def _load_candidate(candidate: _Candidate, request: _Request) -> _Loaded:
    if candidate.error is not None:
        raise candidate.error
    path = candidate.path
    try:
        with _open(path) as file:
            if fmt.sniff(file.read(fmt.SNIFF_BYTES), path=path) is fmt.FileKind.V1:
                return _load_v1(file, path, request)
        return _load_legacy(path, request)
    except OSError as exc:
        raise CorruptedCheckpointError(f"{path}: cannot be read: {exc.strerror or exc}") from exc


def _load_v1(file: BinaryIO, path: Path, request: _Request) -> _Loaded:
    layout = fmt.read_layout(file, str(path))
    index = tensor_index(layout.tree, lambda node: _entry_shape(layout, node))
    notes = _fit(layout.tree, index, request.checks, path)
    tensors = _TensorReader(file, layout, path, request).read()
    state = unflatten(layout.tree, tensors)
    if request.objects is not None:
        _apply(request.objects, state, path)
    metadata = unflatten(layout.metadata, [])
    return _Loaded(state, layout.step, layout.version, metadata if isinstance(metadata, dict) else {}, notes)


def _load_legacy(path: Path, request: _Request) -> _Loaded:
    state = load_legacy(path, map_location=request.device)
    step = legacy_step(state, path)
    if step is None:  # the file changed since discovery
        raise CorruptedCheckpointError(f"{path}: legacy file without a step entry")
    notes = _fit(state, tensor_index(state, _tensor_shape), request.checks, path)
    if request.objects is not None:
        _apply(request.objects, state, path)
    return _Loaded(state, step, LEGACY_VERSION, {}, notes)


def _entry_shape(layout: fmt.Layout, node: Any) -> TensorShape | None:
    if not isinstance(node, fmt.TensorRef):
        return None
    entry = layout.tensors[node.index]
    return TensorShape(entry.dtype, entry.shape)


def _tensor_shape(node: Any) -> TensorShape | None:
    return TensorShape(node.dtype, tuple(node.shape)) if isinstance(node, torch.Tensor) else None


def _fit(tree: Any, index: Any, checks: tuple[Expected, ...], path: Path) -> list[str]:
    """Raise :class:`IncompatibleCheckpointError` listing every mismatch; return the dtype notes."""
    mismatches: list[str] = []
    notes: list[str] = []
    for expected in checks:
        fit = compare(tree, index, expected)
        mismatches += [m for m in fit.mismatches if m not in mismatches]
        notes += [n for n in fit.notes if n not in notes]
    if mismatches:
        raise IncompatibleCheckpointError(
            f"{path}: does not fit the expected state ({_count(len(mismatches), 'mismatch')}: "
            f"{'; '.join(mismatches)}); was the model changed since it was written?"
        )
    return notes


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("ch") else f"{n} {noun}s"


def _apply(objects: Mapping[str, Any], state: Any, path: Path) -> None:
    if not isinstance(state, Mapping):
        raise IncompatibleCheckpointError(f"{path}: the state is a {type(state).__name__}, not a dict")
    for name, obj in objects.items():
        if name not in state:
            raise IncompatibleCheckpointError(f"{path}: missing {name!r}")
        try:
            if isinstance(obj, torch.nn.Module):
                obj.load_state_dict(state[name], strict=True)
            else:
                obj.load_state_dict(state[name])
        except Exception as exc:  # load_state_dict raises RuntimeError, ValueError, KeyError, ...
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise IncompatibleCheckpointError(
                f"{path}: {name}.load_state_dict refused the checkpoint: {reason}"
            ) from exc


class _TensorReader:
    """Reads the blobs of a checked v1 file, several at a time for big files; a module's tensor
    or an optimizer's existing state tensor whose blob holds exactly it (same dtype and shape,
    contiguous) is read straight into that tensor's memory."""

    def __init__(self, file: BinaryIO, layout: fmt.Layout, path: Path, request: _Request) -> None:
        self.file = file
        self.layout = layout
        self.path = path
        self.request = request
        self._lock = threading.Lock()
        self._failed_at = len(layout.blobs)  # the lowest blob index known to be broken

    def read(self) -> list[torch.Tensor]:
        direct = self._direct_targets()
        buffers = {
            i: torch.empty(blob.nbytes, dtype=torch.uint8)
            for i, blob in enumerate(self.layout.blobs)
            if i not in direct
        }
        self._read_all(
            [(i, buffers[i] if i in buffers else direct[i]) for i in range(len(self.layout.blobs))]
        )
        if self.request.device.type != "cpu":
            buffers = {i: blob.to(self.request.device) for i, blob in buffers.items()}
        return [
            direct[entry.blob] if entry.blob in direct else fmt.view_tensor(entry, buffers[entry.blob])
            for entry in self.layout.tensors
        ]

    def _read_all(self, jobs: list[tuple[int, torch.Tensor]]) -> None:
        groups = self._groups(jobs)
        if len(groups) == 1:
            failures = [self._read_group(groups[0])]
        else:
            # readinto and crc32c release the GIL: blobs are read and checked in parallel
            with ThreadPoolExecutor(len(groups), thread_name_prefix="asyncckpt-read") as pool:
                failures = list(pool.map(self._read_group, groups))
        found = [failure for failure in failures if failure is not None]
        if found:
            raise min(found, key=lambda failure: failure[0])[1]

    def _groups(self, jobs: list[tuple[int, torch.Tensor]]) -> list[list[tuple[int, torch.Tensor]]]:
        """Jobs split into groups of about equal bytes, one per reading thread."""
        sizes = [blob.nbytes for blob in self.layout.blobs]
        count = min(MAX_READ_THREADS, os.cpu_count() or 1, len(jobs))
        if sum(sizes) < PARALLEL_READ_MIN_BYTES or count < 2:
            return [jobs]
        groups: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(count)]
        loads = [0] * count
        for job in sorted(jobs, key=lambda job: -sizes[job[0]]):
            lightest = loads.index(min(loads))
            groups[lightest].append(job)
            loads[lightest] += sizes[job[0]]
        return [sorted(group, key=lambda job: job[0]) for group in groups if group]

    def _read_group(self, group: list[tuple[int, torch.Tensor]]) -> tuple[int, CheckpointError] | None:
        """Read ``group`` in file order; return the first failure instead of raising it, so that
        the lowest broken blob of the file is the one reported, whatever the threads' timing."""
        reader = cast(BinaryIO, _PositionalReader(self.file.fileno()))
        bounce: torch.Tensor | None = None
        for index, target in group:
            if index > self._failed_at:  # a lower blob is broken already: nothing to learn here
                return None
            try:
                if target.device.type == "cpu":
                    self._read_bytes(reader, index, target)
                    continue
                nbytes = self.layout.blobs[index].nbytes
                if bounce is None or bounce.numel() < nbytes:
                    bounce = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                self._read_bytes(reader, index, bounce[:nbytes])
                target.reshape(-1).view(torch.uint8).copy_(bounce[:nbytes])
            except CheckpointError as exc:
                with self._lock:
                    self._failed_at = min(self._failed_at, index)
                return index, exc
        return None

    def _read_bytes(self, reader: BinaryIO, index: int, host: torch.Tensor) -> None:
        view = fmt.tensor_bytes(host)
        verify = self.request.validate
        fmt.read_blob_into(reader, self.layout, index, view, verify=verify, path=str(self.path))

    def _direct_targets(self) -> dict[int, torch.Tensor]:
        """Blob index → the module tensor its bytes go straight into."""
        if self.request.objects is None:
            return {}
        destinations = _module_tensors(self.request.objects)
        users: dict[int, int] = {}
        for entry in self.layout.tensors:
            users[entry.blob] = users.get(entry.blob, 0) + 1
        direct: dict[int, torch.Tensor] = {}
        used: set[tuple[str, int]] = set()
        for path, node in _tensor_refs(self.layout.tree):
            target = destinations.get(path)
            entry = self.layout.tensors[node.index]
            if target is None or entry.blob in direct or users[entry.blob] != 1:
                continue
            storage = (str(target.device), target.untyped_storage().data_ptr())
            if storage not in used and self._fits(entry, target):
                direct[entry.blob] = target
                used.add(storage)
        return direct

    def _fits(self, entry: fmt.TensorEntry, target: torch.Tensor) -> bool:
        nbytes = target.numel() * itemsize(target.dtype)
        return (
            entry.offset == 0
            and target.dtype == entry.dtype
            and tuple(target.shape) == entry.shape
            and _contiguous(entry.shape, entry.stride)
            and target.layout == torch.strided
            and target.is_contiguous()
            and target.device.type in ("cpu", "cuda")
            and nbytes > 0
            and self.layout.blobs[entry.blob].nbytes == nbytes
        )


class _PositionalReader:
    """``seek`` and ``readinto`` over ``os.preadv``, so that threads can share one descriptor."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._position = 0

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            raise ValueError("only absolute seeks")
        self._position = position
        return position

    def readinto(self, buffer: memoryview) -> int:
        count = os.preadv(self._fd, [buffer], self._position)
        self._position += count
        return count


def _module_tensors(objects: Mapping[str, Any]) -> dict[tuple[Any, ...], torch.Tensor]:
    """Key path in the state → an existing tensor the checkpoint's bytes may be read into.

    A module's parameters and buffers, and an optimizer's existing state (its moments survive
    ``load_state_dict``, which keeps tensors of the right dtype and device as they are).
    """
    found: dict[tuple[Any, ...], torch.Tensor] = {}
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            for key, value in obj.state_dict().items():
                if isinstance(value, torch.Tensor):
                    found[(name, key)] = value
        elif isinstance(obj, torch.optim.Optimizer):
            found.update(_optimizer_tensors(name, obj))
    return found


def _optimizer_tensors(name: str, optimizer: torch.optim.Optimizer) -> dict[tuple[Any, ...], torch.Tensor]:
    """The optimizer's state tensors under their ``state_dict()`` paths.

    ``state_dict()`` numbers parameters in param-group order; walking ``state`` in that order
    gives the same paths without calling it (some optimizers, e.g. ZeroRedundancyOptimizer,
    refuse ``state_dict()`` until consolidated).
    """
    found: dict[tuple[Any, ...], torch.Tensor] = {}
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for index, param in enumerate(params):
        per_param = optimizer.state.get(param)
        if isinstance(per_param, Mapping):
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor):
                    found[(name, "state", index, key)] = value
    return found


def _tensor_refs(tree: Any) -> list[tuple[tuple[Any, ...], fmt.TensorRef]]:
    found = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, fmt.TensorRef):
            found.append((path, node))
        elif isinstance(node, dict):
            stack.extend(((*path, k), v) for k, v in node.items())
        elif isinstance(node, list | tuple):
            stack.extend(((*path, i), v) for i, v in enumerate(node))
    found.reverse()  # document order, so the first of two paths to one tensor wins
    return found


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


# --------------------------------------------------------------------------- rollback


def _rollback(root: Path, request: _Request, *, on_corrupt: OnCorrupt, log: Log | None) -> LoadResult:
    if on_corrupt not in ("fallback", "fail"):
        raise ValueError(f"on_corrupt must be 'fallback' or 'fail', got {on_corrupt!r}")
    found = _discover(root)
    if not found.candidates:
        summary = f"no checkpoints in {root}" + _ignored_note(found)
        _emit(log, summary, None, failed=False)
        raise NoValidCheckpointError(summary, [])
    failures: list[tuple[_Candidate, Diagnostic]] = []
    for candidate in found.candidates:
        try:
            loaded = _load_candidate(candidate, request)
        except CheckpointError as exc:
            failures.append((candidate, _diagnose(candidate.path, exc)))
            if on_corrupt == "fail":
                _report(root, found, failures, None, log)
                raise
            continue
        summary = _report(root, found, failures, (candidate, loaded), log)
        return LoadResult(
            state=loaded.state,
            step=loaded.step,
            path=candidate.path,
            version=loaded.version,
            source="fallback" if failures else "primary",
            diagnostics=[d for _, d in failures],
            summary=summary,
            metadata=loaded.metadata,
        )
    summary = _report(root, found, failures, None, log)
    raise NoValidCheckpointError(
        f"no valid checkpoint in {root}: {summary}; failures are listed in {root / FAILED_LOG_NAME}",
        [d for _, d in failures],
    )


def _diagnose(path: Path, exc: CheckpointError) -> Diagnostic:
    kind: Literal["corrupted", "incompatible"] = (
        "incompatible" if isinstance(exc, IncompatibleCheckpointError) else "corrupted"
    )
    reason = " ".join(str(exc).removeprefix(f"{path}: ").split())
    return Diagnostic(str(path), kind, reason, _now())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _report(
    root: Path,
    found: _Found,
    failures: list[tuple[_Candidate, Diagnostic]],
    chosen: tuple[_Candidate, _Loaded] | None,
    log: Log | None,
) -> str:
    """Record the failures, then log and return the summary."""
    _record_failures(root, [d for _, d in failures])
    summary = _summary(found, failures, chosen)
    _emit(log, summary, chosen, failed=bool(failures), diagnostics=[d for _, d in failures])
    return summary


def _summary(
    found: _Found, failures: list[tuple[_Candidate, Diagnostic]], chosen: tuple[_Candidate, _Loaded] | None
) -> str:
    total = len(found.candidates)
    counts = {"valid": int(chosen is not None), "corrupted": 0, "incompatible": 0}
    for _, diagnostic in failures:
        counts[diagnostic.kind] += 1
    counts["not checked"] = total - len(failures) - counts["valid"]
    parts = [f"{n} {what}" for what, n in counts.items() if n or what == "valid"]
    text = f"found {_count(total, 'checkpoint')} ({', '.join(parts)})"
    failed = "; ".join(f"step {c.step} {d.kind}: {d.reason}" for c, d in failures)
    if chosen is None:
        stopped = counts["not checked"] > 0  # on_corrupt="fail"
        text += (
            f"; stopped at the first failure: {failed}" if stopped else f"; no usable checkpoint: {failed}"
        )
        return text + _ignored_note(found)
    loaded = chosen[1]
    details = [f"legacy format {LEGACY_VERSION}"] if loaded.version == LEGACY_VERSION else []
    details += [f"fallback: {failed}"] if failures else []
    text += f"; resuming from step {loaded.step}" + (f" ({', '.join(details)})" if details else "")
    if loaded.notes:
        text += f"; dtype differences (converted on load): {'; '.join(loaded.notes)}"
    return text + _ignored_note(found)


def _ignored_note(found: _Found) -> str:
    if not found.ignored:
        return ""
    names = ", ".join(c.path.name for c in found.ignored)
    return f"; ignored legacy files without a readable step: {names}"


def _emit(
    log: Log | None,
    summary: str,
    chosen: tuple[_Candidate, _Loaded] | None,
    *,
    failed: bool,
    diagnostics: list[Diagnostic] | None = None,
) -> None:
    if log is None:
        logger = structlog.get_logger("asyncckpt")
        log = logger.warning if failed else logger.info
    log(
        SUMMARY_EVENT,
        summary=summary,
        step=chosen[1].step if chosen else None,
        path=str(chosen[0].path) if chosen else None,
        version=chosen[1].version if chosen else None,
        failures=[{"path": str(d.path), "kind": d.kind, "reason": d.reason} for d in diagnostics or []],
    )


def _record_failures(root: Path, diagnostics: list[Diagnostic]) -> None:
    """Append ``{path}|{reason}|{timestamp}`` lines; a directory that cannot be written only warns."""
    if not diagnostics:
        return
    lines = "".join(f"{_path_field(d.path)}|{_reason_field(d.reason)}|{d.timestamp}\n" for d in diagnostics)
    target = root / FAILED_LOG_NAME
    try:
        with open(target, "a", encoding="utf-8") as file:
            file.write(lines)
    except OSError as exc:
        warnings.warn(f"cannot record failed checkpoints in {target}: {exc}", RuntimeWarning, stacklevel=4)


def _reason_field(text: str) -> str:
    return " ".join(text.replace("|", "/").split())


def _path_field(path: str) -> str:
    return path.replace("%", "%25").replace("|", "%7C").replace("\n", "%0A").replace("\r", "%0D")


# --------------------------------------------------------------------------- checking


def _check(candidate: _Candidate, *, full: bool) -> CandidateReport:
    path, size = candidate.path, candidate.size
    try:
        if candidate.error is not None:
            raise candidate.error
        version, step = _verify(path, full=full)
    except CheckpointError as exc:
        diagnostic = _diagnose(path, exc)
        return CandidateReport(candidate.step, path, size, None, diagnostic.kind, diagnostic.reason)
    return CandidateReport(candidate.step if step is None else step, path, size, version, "valid", None)


def _verify(path: Path, *, full: bool) -> tuple[str, int | None]:
    try:
        with _open(path) as file:
            head = file.read(fmt.SNIFF_BYTES)
            if fmt.sniff(head, path=path) is fmt.FileKind.V1:
                layout = fmt.read_layout(file, str(path))
                if full:
                    scratch = memoryview(bytearray(fmt.CHUNK))
                    for i in range(len(layout.blobs)):
                        fmt.check_blob(file, layout, i, path=str(path), scratch=scratch)
                return layout.version, layout.step
    except OSError as exc:
        raise CorruptedCheckpointError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    state = load_legacy(path, mmap=not full and is_zip_torch_save(head))
    return LEGACY_VERSION, legacy_step(state, path)
