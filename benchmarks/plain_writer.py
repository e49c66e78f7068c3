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

import torch


class PlainWriter:
    """One background thread per checkpoint, at most one at a time (as ``max_pending=1``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
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
