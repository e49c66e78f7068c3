"""Zygote for the kill -9 tests: imports torch and asyncckpt once, then forks trainers on request.

Importing torch takes seconds; forking a process that has imported it (and run nothing) takes
milliseconds, so each kill gets a fresh trainer process cheaply. Protocol on stdin/stdout, one
line each:

    spawn <directory> <first step> <numel>   ->  pid <pid>
    reap <pid>                               ->  reaped <pid> <wait status>

A trainer saves ``deterministic_state(step)`` for step = first, first + 1, ... with
AsyncCheckpointer and writes ``op <name>`` before each file operation of the write path and
``committed <step>`` once ``handle.result()`` returned, straight to fd 1 (one write per line).
The parent SIGKILLs it at a moment of its choosing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from asyncckpt.storage import FileOps

MAX_STEPS = 100_000  # a trainer whose parent died stops on its own eventually


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


class AnnouncingOps(FileOps):
    """Real OS calls, each announced on stdout before it is made."""

    def open_exclusive(self, path: Path) -> int:
        say("op open_exclusive")
        return super().open_exclusive(path)

    def write(self, fd: int, data: memoryview | bytes) -> int:
        say("op write")
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        say("op fsync")
        super().fsync(fd)

    def rename(self, src: Path, dst: Path) -> None:
        say("op rename")
        super().rename(src, dst)

    def unlink(self, path: Path) -> None:
        say("op unlink")
        super().unlink(path)

    def fsync_dir(self, directory: Path) -> None:
        say("op fsync_dir")
        super().fsync_dir(directory)


def train(directory: Path, first: int, numel: int) -> None:
    import torch

    from asyncckpt import AsyncCheckpointer
    from asyncckpt.testing import deterministic_state

    torch.set_num_threads(1)
    with AsyncCheckpointer(directory, keep_last=2, max_pending=2, ops=AnnouncingOps()) as ckpt:
        for step in range(first, first + MAX_STEPS):
            ckpt.save(step, deterministic_state(step, numel=numel)).result()
            say(f"committed {step}")


def serve() -> None:
    import asyncckpt  # noqa: F401  (the expensive import, done once before any fork)
    import asyncckpt.testing  # noqa: F401

    say("ready")
    for line in sys.stdin:
        command, *args = line.split()
        if command == "spawn":
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    train(Path(args[0]), int(args[1]), int(args[2]))
                except BaseException as exc:  # report, never fall back into the zygote's loop
                    os.write(2, f"trainer failed: {exc!r}\n".encode())
                    code = 1
                os._exit(code)
            say(f"pid {pid}")
        elif command == "reap":
            pid = int(args[0])
            _, status = os.waitpid(pid, 0)
            say(f"reaped {pid} {status}")


if __name__ == "__main__":
    serve()
