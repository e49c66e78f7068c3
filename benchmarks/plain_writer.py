"""The interference floor: the least CPU a background checkpoint writer needs on this machine.

:class:`PlainWriter` writes the training state's tensors, straight from their memory, to one
file per checkpoint and fsyncs it, in a plain thread: no staging copy, no encoding, no checksum,
no read-back, no rename. Its thread CPU time (user + system, ``time.thread_time``) per checkpoint
is what the kernel needs to take the bytes into the page cache and start their write-back; when
training keeps every core busy, any background writer takes at least that from training. Divided
by the training time between two checkpoints it is the least slowdown a background writer can
cause here (write-back done by the kernel's own threads and the disk itself are not counted, so
this is a floor). The file's bytes are inconsistent (training goes on while they are written):
this measures a cost, it does not make a checkpoint.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import crc32c
import torch


class PlainWriter:
    """One background thread per checkpoint, at most one at a time (as ``max_pending=1``).

    ``checksum=True``: the thread also computes each tensor's CRC32C before writing it (as
    every asyncckpt file carries one per blob), for a floor closer to what a checkpoint must do.
    """

    def __init__(self, directory: Path, *, checksum: bool = False) -> None:
        self.directory = directory
        self.checksum = checksum
        self.cpu_s: list[float] = []  # the writing thread's CPU time per checkpoint
        self._thread: threading.Thread | None = None

    def save(self, step: int, tensors: Iterable[torch.Tensor]) -> None:
        """Start writing ``tensors`` (waits for the previous write first)."""
        self.join()
        views = [t.detach().reshape(-1).view(torch.uint8).numpy() for t in tensors]
        path = self.directory / f"plain-{step:010d}.bin"
        self._thread = threading.Thread(target=self._write, args=(path, views), name="plain-writer")
        self._thread.start()

    def join(self) -> None:
        """Wait for the write in progress, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _write(self, path: Path, views: list[object]) -> None:
        started = time.thread_time()
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for array in views:
                view = memoryview(array).cast("B")  # type: ignore[arg-type]
                if self.checksum:
                    crc32c.crc32c(view)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.cpu_s.append(time.thread_time() - started)


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors a checkpoint holds: the parameters and buffers (tied ones once) and the
    optimizer's state tensors."""
    tensors = list({id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


class Copy:
    """The tensors copied into one reused flat buffer: what staging a consistent checkpoint costs
    the trainer's thread (a floor that writes the live tensors skips it, and its bytes mix steps)."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy ``tensors`` into the buffer; return their copies (views of it)."""
        sizes = [t.numel() * t.element_size() for t in tensors]
        if self.buffer is None or self.buffer.numel() != sum(sizes):
            self.buffer = torch.empty(sum(sizes), dtype=torch.uint8)
        parts = self.buffer.split(sizes)
        views = [part.view(t.dtype).view(t.shape) for part, t in zip(parts, tensors, strict=True)]
        with torch.no_grad():
            torch._foreach_copy_(views, [t.detach() for t in tensors])
        return views
