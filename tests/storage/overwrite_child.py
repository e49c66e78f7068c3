"""Child of test_replaced.py's kill tests: ``asyncckpt.save`` over an existing file, SIGKILLed by
itself just before the first call of one file operation (or not at all: ``none``).

    python overwrite_child.py <target> <op>
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

import asyncckpt
from asyncckpt.storage import FileOps
from asyncckpt.testing import deterministic_state


class KillBefore(FileOps):
    """Real OS calls; the process kills itself (SIGKILL) before the first call of ``op``."""

    def __init__(self, op: str) -> None:
        self.op = op

    def _at(self, op: str) -> None:
        if op == self.op:
            os.kill(os.getpid(), signal.SIGKILL)

    def open_exclusive(self, path: Path) -> int:
        self._at("open_exclusive")
        return super().open_exclusive(path)

    def fsync(self, fd: int) -> None:
        self._at("fsync")
        super().fsync(fd)

    def link(self, src: Path, dst: Path) -> None:
        self._at("link")
        super().link(src, dst)

    def rename(self, src: Path, dst: Path) -> None:
        self._at("rename")
        super().rename(src, dst)

    def fsync_dir(self, directory: Path) -> None:
        self._at("fsync_dir")
        super().fsync_dir(directory)

    def unlink(self, path: Path) -> None:
        self._at("unlink")  # the old file's hidden name, on the one-shot save's own thread
        super().unlink(path)


if __name__ == "__main__":
    torch.set_num_threads(1)
    asyncckpt.save(sys.argv[1], deterministic_state(2), step=2, ops=KillBefore(sys.argv[2]))
