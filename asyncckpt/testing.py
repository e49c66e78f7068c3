"""Helpers for testing code that uses asyncckpt: fault injection and tiny deterministic states.

``FaultyOps``, ``GatedOps``, ``SlowOps`` and ``PowerLossOps`` replace the OS calls of the write
path (pass them as ``AsyncCheckpointer(..., ops=...)`` or ``asyncckpt.save(..., ops=...)``);
``PowerLossOps`` also replays what a power cut at each point of the recorded calls would leave.
``deterministic_state`` builds a small state whose every byte is a function of the step.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .storage import FileOps, PosixStorage

# "open_exclusive" | "write" | "fsync" | "close" | "rename" | "link" | "unlink" | "fsync_dir" | "mkdir"
# | "rmdir"
OpName = str


class RecordingOps(FileOps):
    """Real OS calls, each also recorded as ``(name, path-or-fd)`` in ``calls``."""

    def __init__(self) -> None:
        self.calls: list[tuple[OpName, Any]] = []
        self._lock = threading.Lock()

    def record(self, name: OpName, target: Any) -> None:
        with self._lock:
            self.calls.append((name, target))

    def names(self) -> list[OpName]:
        with self._lock:
            return [name for name, _ in self.calls]

    def open_exclusive(self, path: Path) -> int:
        self.record("open_exclusive", path)
        return super().open_exclusive(path)

    def write(self, fd: int, data: memoryview | bytes) -> int:
        self.record("write", fd)
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self.record("fsync", fd)
        super().fsync(fd)

    def close(self, fd: int) -> None:
        self.record("close", fd)
        super().close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        self.record("rename", (src, dst))
        super().rename(src, dst)

    def link(self, src: Path, dst: Path) -> None:
        self.record("link", (src, dst))
        super().link(src, dst)

    def unlink(self, path: Path) -> None:
        self.record("unlink", path)
        super().unlink(path)

    def mkdir(self, path: Path) -> None:
        self.record("mkdir", path)
        super().mkdir(path)

    def rmdir(self, path: Path) -> None:
        self.record("rmdir", path)
        super().rmdir(path)

    def fsync_dir(self, directory: Path) -> None:
        self.record("fsync_dir", directory)
        super().fsync_dir(directory)


class FaultyOps(RecordingOps):
    """Raise ``OSError(err)`` from the ``nth`` call (1-based) of ``op``, and from later ones while
    ``sticky``. ``failures`` counts the faults injected."""

    def __init__(self, op: OpName, *, err: int = errno.EIO, nth: int = 1, sticky: bool = False) -> None:
        super().__init__()
        self.op = op
        self.err = err
        self.nth = nth
        self.sticky = sticky
        self.seen = 0
        self.failures = 0
        self.enabled = True

    def record(self, name: OpName, target: Any) -> None:
        super().record(name, target)
        if name != self.op or not self.enabled:
            return
        self.seen += 1
        if self.seen == self.nth or (self.sticky and self.seen > self.nth):
            self.failures += 1
            raise OSError(self.err, f"injected {os.strerror(self.err)} in {name}")


class GatedOps(RecordingOps):
    """Block every ``write`` until ``release()``; ``entered`` is set when a write is waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self._gate = threading.Event()

    def release(self) -> None:
        self._gate.set()

    def write(self, fd: int, data: memoryview | bytes) -> int:
        self.entered.set()
        self._gate.wait()
        return super().write(fd, data)


def deterministic_state(step: int, *, tensors: int = 4, numel: int = 1024) -> dict[str, Any]:
    """A small state whose values are a pure function of ``step`` (for crash and resume tests)."""
    generator = torch.Generator().manual_seed(step)
    return {
        "model": {f"layer{i}.weight": torch.randn(numel, generator=generator) for i in range(tensors)},
        "extra": {"step": step, "name": f"run-{step}", "tuple": (step, float(step) / 3)},
    }


def states_equal(a: Any, b: Any) -> bool:
    """Exact equality of two state trees: same types, keys in order, tensors bit for bit.

    Tensors are equal when their dtype, shape, values (conjugate and negative views by their
    values, not their memory), type (a ``Parameter`` or not) and ``requires_grad`` are. A
    ``dict`` equals an ``OrderedDict`` with the same items in the same order (``state_dict()``
    results load as dicts); other types must match exactly (a namedtuple is not a tuple).
    """
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and type(a) is type(b)
            and a.requires_grad == b.requires_grad
            and a.dtype == b.dtype
            and a.shape == b.shape
            and _bytes_equal(a, b)
        )
    if type(a) in _DICTS and type(b) in _DICTS:  # OrderedDict (state_dict()) is stored as dict
        return list(a) == list(b) and all(states_equal(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a != a:
        return bool(b != b)
    return bool(a == b)


_DICTS = frozenset({dict, OrderedDict})


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        # A conjugate or negative view's memory holds the values before the conjugation or
        # negation: compare what the tensor holds, not its memory.
        flat = t.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        return flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)

    return torch.equal(raw(a), raw(b))


class SlowOps(RecordingOps):
    """Real OS calls, each ``write`` and ``fsync`` taking at least ``delay`` seconds longer
    (simulated slow storage)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def write(self, fd: int, data: memoryview | bytes) -> int:
        time.sleep(self.delay)
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        time.sleep(self.delay)
        super().fsync(fd)


# --------------------------------------------------------------------------- power loss


@dataclass(frozen=True)
class CrashState:
    """One directory a power cut after ``point`` recorded calls may leave: file name → bytes.

    ``variant`` says which of the possible outcomes it is (see :class:`PowerLossOps`).
    """

    point: int
    variant: str
    files: dict[str, bytes]

    def materialize(self, target: Path) -> Path:
        """Write the surviving files into ``target`` (created; it should be empty) and return it."""
        target.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (target / name).write_bytes(data)
        return target


@dataclass(frozen=True)
class _Call:
    kind: str  # create, write, fsync, rename, link, unlink, fsync_dir, mark
    name: str = ""
    inode: int = -1
    offset: int = 0
    data: bytes = b""
    target: str = ""


class PowerLossOps(FileOps):
    """Real OS calls through ``inner``, plus a model of what survives a power cut in ``directory``.

    Every successful call is recorded in order. A crash after the first ``point`` calls keeps:

    - a file's data only up to the last successful ``fsync`` of that file;
    - directory entries (creates, renames, links, unlinks) only up to the last ``fsync_dir``.

    :meth:`crash_states` also yields the weaker outcomes real file systems allow: metadata that
    reached the journal in order (every prefix of the entries changed since the last
    ``fsync_dir``), unsynced data that was written back (all of it, or its length with zeros
    instead of bytes), and the state a ``kill -9`` leaves (everything). A correct protocol leaves
    only complete files under final names in all of them; this tests the *order* of the calls.

    Files already in ``directory`` when the object is made count as durable. ``mark(label)``
    records a point in the sequence (e.g. "step 3 committed") for the test to compare against.
    A failed call is not recorded: its effect is unknown, which is what the model drops.
    """

    def __init__(self, directory: str | os.PathLike[str], *, inner: FileOps | None = None) -> None:
        self.directory = Path(directory)
        self.inner = inner if inner is not None else FileOps()
        self.calls: list[_Call] = []
        self._lock = threading.Lock()
        self._initial_names: dict[str, int] = {}
        self._initial_data: dict[int, bytes] = {}
        self._fds: dict[int, list[int]] = {}  # fd -> [inode, position]
        self._next_inode = 0
        for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
            if entry.is_file(follow_symlinks=False):
                inode = self._new_inode()
                self._initial_names[entry.name] = inode
                self._initial_data[inode] = Path(entry.path).read_bytes()

    def _new_inode(self) -> int:
        self._next_inode += 1
        return self._next_inode

    def _name(self, path: Path) -> str:
        if Path(path).parent != self.directory:
            raise ValueError(f"PowerLossOps models {self.directory} only, not {path}")
        return Path(path).name

    def _record(self, call: _Call) -> None:
        with self._lock:
            self.calls.append(call)

    def mark(self, label: str) -> int:
        """Record ``label`` at the current point; return the point (calls recorded before it)."""
        with self._lock:
            self.calls.append(_Call("mark", name=label))
            return len(self.calls) - 1

    def point_of(self, label: str) -> int | None:
        """The point at which ``label`` was marked, or None."""
        with self._lock:
            return next((i for i, c in enumerate(self.calls) if c.kind == "mark" and c.name == label), None)

    # -- the FileOps calls: the real call first, recorded only when it succeeded

    def open_exclusive(self, path: Path) -> int:
        name = self._name(path)
        fd = self.inner.open_exclusive(path)
        with self._lock:
            inode = self._new_inode()
            self._fds[fd] = [inode, 0]
            self.calls.append(_Call("create", name=name, inode=inode))
        return fd

    def write(self, fd: int, data: memoryview | bytes) -> int:
        written = self.inner.write(fd, data)
        with self._lock:
            inode, position = self._fds[fd]
            chunk = bytes(memoryview(data).cast("B")[:written])
            self.calls.append(_Call("write", inode=inode, offset=position, data=chunk))
            self._fds[fd][1] = position + written
        return written

    def fsync(self, fd: int) -> None:
        self.inner.fsync(fd)
        with self._lock:
            self.calls.append(_Call("fsync", inode=self._fds[fd][0]))

    def close(self, fd: int) -> None:
        with self._lock:
            self._fds.pop(fd, None)
        self.inner.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        source, target = self._name(src), self._name(dst)
        self.inner.rename(src, dst)
        self._record(_Call("rename", name=source, target=target))

    def link(self, src: Path, dst: Path) -> None:
        source, target = self._name(src), self._name(dst)
        self.inner.link(src, dst)
        self._record(_Call("link", name=source, target=target))

    def unlink(self, path: Path) -> None:
        name = self._name(path)
        self.inner.unlink(path)
        self._record(_Call("unlink", name=name))

    def fsync_dir(self, directory: Path) -> None:
        if Path(directory) != self.directory:
            raise ValueError(f"PowerLossOps models {self.directory} only, not {directory}")
        self.inner.fsync_dir(directory)
        self._record(_Call("fsync_dir"))

    # -- replay

    @property
    def points(self) -> int:
        """The number of crash points: before the first call, between calls, after the last."""
        with self._lock:
            return len(self.calls) + 1

    def crash_states(self, point: int) -> list[CrashState]:
        """Every distinct directory a power cut after the first ``point`` calls may leave."""
        with self._lock:
            calls = self.calls[:point]
        names = dict(self._initial_names)
        durable_names = dict(names)
        since_sync: list[dict[str, int]] = []  # the namespace after each unsynced entry change
        data = {inode: bytearray(content) for inode, content in self._initial_data.items()}
        synced = dict(self._initial_data)
        for call in calls:
            if call.kind == "create":
                names[call.name] = call.inode
                data[call.inode] = bytearray()
                synced[call.inode] = b""
            elif call.kind == "write":
                content = data[call.inode]
                if len(content) < call.offset:
                    content.extend(bytes(call.offset - len(content)))
                content[call.offset : call.offset + len(call.data)] = call.data
            elif call.kind == "fsync":
                synced[call.inode] = bytes(data[call.inode])
            elif call.kind == "rename":
                names[call.target] = names.pop(call.name)
            elif call.kind == "link":
                names[call.target] = names[call.name]
            elif call.kind == "unlink":
                names.pop(call.name)
            elif call.kind == "fsync_dir":
                durable_names = dict(names)
                since_sync = []
            if call.kind in ("create", "rename", "link", "unlink"):
                since_sync.append(dict(names))
        written = {inode: bytes(content) for inode, content in data.items()}
        zeroed = {
            inode: synced[inode] + bytes(max(len(content) - len(synced[inode]), 0))
            for inode, content in written.items()
        }
        namespaces = {"dir-synced": durable_names}
        namespaces.update({f"dir-journal-{i + 1}": ns for i, ns in enumerate(since_sync)})
        contents = {"data-synced": synced, "data-zeroed": zeroed, "data-written": written}
        states: list[CrashState] = []
        seen: set[tuple[tuple[str, bytes], ...]] = set()
        for ns_label, namespace in namespaces.items():
            for data_label, content_of in contents.items():
                files = {name: content_of[inode] for name, inode in sorted(namespace.items())}
                key = tuple(files.items())
                if key not in seen:
                    seen.add(key)
                    states.append(CrashState(point, f"{ns_label}+{data_label}", files))
        return states


def temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The temp files writers left in ``directory`` (a crashed or stuck write's), by name."""
    storage = PosixStorage(directory)
    return [storage.path(name) for name in storage.leftovers()]
