"""Helpers for testing code that uses asyncckpt: fault injection and tiny deterministic states.

``FaultyOps`` and ``GatedOps`` replace the OS calls of the write path (pass them as
``AsyncCheckpointer(..., ops=...)`` or ``asyncckpt.save(..., ops=...)``); ``deterministic_state``
builds a small state whose every byte is a function of the step.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import torch

from .storage import FileOps

OpName = str  # "open_exclusive" | "write" | "fsync" | "close" | "rename" | "unlink" | "fsync_dir"


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

    def unlink(self, path: Path) -> None:
        self.record("unlink", path)
        super().unlink(path)

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
    """Exact equality of two state trees: same types, keys in order, tensors bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and _bytes_equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):  # OrderedDict (state_dict()) is stored as dict
        return list(a) == list(b) and all(states_equal(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a != a:
        return b != b
    return bool(a == b)


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        flat = t.detach().cpu().contiguous().reshape(-1)
        return flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)

    return torch.equal(raw(a), raw(b))


