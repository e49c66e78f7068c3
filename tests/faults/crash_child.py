"""Zygote for the kill -9 tests: imports torch and asyncckpt once, then forks trainers on request.

Importing torch takes seconds; forking a process that has imported it (and run nothing) takes
milliseconds, so each kill gets a fresh trainer process cheaply. Protocol on stdin/stdout, one
line each:

    spawn <kind> <directory> <first step> <numel>  ->  pid <pid>
    reap <pid> <timeout s>                         ->  reaped <pid> <wait status>  or  hung <pid>

A trainer saves ``deterministic_state(step)`` for step = first, first + 1, ... with
AsyncCheckpointer and writes ``committed <step>`` once that save is committed, straight to fd 1
(one write per line). ``kill`` trainers wait for each save and also write ``op <name>`` before
each file operation of the write path; the parent SIGKILLs them at a moment of its choosing.
``stepped`` trainers are ``kill`` trainers whose state is a model and its SGD optimizer, so
that staging overlaps and each save is followed by an optimizer step that waits for the copy.
``sigterm`` trainers save ``deterministic_state(step % 8)`` in a tight loop with
``handle_sigterm=True`` (so that the signal lands anywhere, also inside ``save()``); the parent
sends SIGTERM. A trainer still alive after
``<timeout s>`` is reported ``hung`` and killed.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from pathlib import Path
from typing import Any

from asyncckpt.storage import FileOps

MAX_STEPS = 100_000  # a trainer whose parent died stops on its own eventually
SIGTERM_STATES = 8  # a sigterm trainer saves deterministic_state(step % 8): no time spent making states


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


def stepped_trainer(numel: int) -> tuple[Any, Any]:
    """A model and a plain SGD optimizer (lr=1) whose parameters ``step_to`` sets exactly."""
    import torch

    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.zeros(numel))
    model.bias = torch.nn.Parameter(torch.zeros(8))
    return model, torch.optim.SGD(model.parameters(), lr=1.0)


def parameters_at(step: int, numel: int) -> dict[str, Any]:
    """The parameters a ``stepped`` trainer has after reaching ``step``: small integers, exact."""
    import torch

    return {
        "weight": torch.arange(numel, dtype=torch.float32).remainder_(1000).add_(step % 1000),
        "bias": torch.full((8,), float(-(step % 1000))),
    }


def stepped_state(step: int, numel: int) -> dict[str, Any]:
    """The state a ``stepped`` or ``sigterm-stepped`` trainer saves at ``step`` (for checking)."""
    import torch

    model, optimizer = stepped_trainer(numel)
    with torch.no_grad():
        for name, value in parameters_at(step, numel).items():
            getattr(model, name).copy_(value)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def step_to(model: Any, optimizer: Any, step: int, numel: int) -> None:
    """One real optimizer step (through the pre-hooks) that lands on ``parameters_at(step)``.

    With lr=1 and grad = p - target, SGD computes p - (p - target); for these small integers in
    float32 that is exactly the target.
    """
    target = parameters_at(step, numel)
    for name, param in model.named_parameters():
        param.grad = param.detach() - target[name]
    optimizer.step()


def train_stepped(directory: Path, first: int, numel: int) -> None:
    """Like ``train``, but the state is a model and its optimizer, so staging overlaps: each save
    is followed at once by the optimizer step to the next state, which must wait for the copy."""
    import torch

    from asyncckpt import AsyncCheckpointer

    torch.set_num_threads(1)
    model, optimizer = stepped_trainer(numel)
    step_to(model, optimizer, first, numel)
    with AsyncCheckpointer(directory, keep_last=2, max_pending=2, ops=AnnouncingOps()) as ckpt:
        for step in range(first, first + MAX_STEPS):
            handle = ckpt.save(step, {"model": model, "optimizer": optimizer})
            step_to(model, optimizer, step + 1, numel)
            handle.result()
            say(f"committed {step}")


def train_until_sigterm(directory: Path, first: int, numel: int) -> None:
    import torch

    from asyncckpt import AsyncCheckpointer, SaveHandle
    from asyncckpt.testing import deterministic_state

    torch.set_num_threads(1)
    outstanding: list[SaveHandle] = []
    with AsyncCheckpointer(
        directory, keep_last=2, max_pending=2, when_busy="skip", handle_sigterm=True
    ) as ckpt:
        say("started")
        states = [deterministic_state(k, numel=numel) for k in range(SIGTERM_STATES)]
        for step in range(first, first + MAX_STEPS):
            outstanding.append(ckpt.save(step, states[step % SIGTERM_STATES]))
            ckpt.stats()
            for handle in [h for h in outstanding if h.done()]:
                outstanding.remove(handle)
                if not handle.skipped:
                    handle.result()
                    say(f"committed {handle.step}")


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
                trainer = TRAINERS[args[0]]
                try:
                    trainer(Path(args[1]), int(args[2]), int(args[3]))
                except BaseException as exc:  # report, never fall back into the zygote's loop
                    os.write(2, f"trainer failed: {exc!r}\n".encode())
                    code = 1
                os._exit(code)
            say(f"pid {pid}")
        elif command == "reap":
            pid, timeout = int(args[0]), float(args[1])
            exited = os.pidfd_open(pid)  # readable once the process has exited
            try:
                ready, _, _ = select.select([exited], [], [], timeout)
            finally:
                os.close(exited)
            if not ready:
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            say(f"reaped {pid} {status}" if ready else f"hung {pid}")


def train_stepped_until_sigterm(directory: Path, first: int, numel: int) -> None:
    """Like ``train_until_sigterm``, with a model and its optimizer: every save is followed at once
    by the optimizer step to the next state (which waits for the overlapped copy)."""
    import torch

    from asyncckpt import AsyncCheckpointer, SaveHandle

    torch.set_num_threads(1)
    model, optimizer = stepped_trainer(numel)
    step_to(model, optimizer, first, numel)
    outstanding: list[SaveHandle] = []
    with AsyncCheckpointer(
        directory, keep_last=2, max_pending=2, when_busy="skip", handle_sigterm=True
    ) as ckpt:
        say("started")
        for step in range(first, first + MAX_STEPS):
            outstanding.append(ckpt.save(step, {"model": model, "optimizer": optimizer}))
            step_to(model, optimizer, step + 1, numel)
            for handle in [h for h in outstanding if h.done()]:
                outstanding.remove(handle)
                if not handle.skipped:
                    handle.result()
                    say(f"committed {handle.step}")


TRAINERS = {
    "kill": train,
    "stepped": train_stepped,
    "sigterm": train_until_sigterm,
    "sigterm-stepped": train_stepped_until_sigterm,
}

if __name__ == "__main__":
    serve()
