"""Run a worker function on N ranks (gloo, CPU) in fresh processes, bounded in time.

Each rank is a child of a forkserver that imported torch once (so a world of 4 starts in well
under a second on 2 cores), joins a process group on a fresh free port, runs
``worker(rank, world_size, *args)`` and leaves its result (or its error's type, text and
fields) in a file. ``run_world`` waits for every rank up to ``deadline`` seconds, then kills
whatever is left (SIGKILL) and fails: no process outlives the test.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(
    [
        "torch",
        "torch.distributed.checkpoint",
        "torch.distributed.fsdp",
        "asyncckpt.dist",
        "dist_workers",
        "ckpt_workers",
        "contract_workers",
        "share_workers",
        "remote_workers",
        "dicts_workers",
    ]
)
PG_TIMEOUT_S = 30.0


@dataclass
class RankResult:
    """What one rank left behind: its exit code and its worker's value or error."""

    rank: int
    exitcode: int | None
    value: Any = None
    error: str | None = None  # the error's class name
    message: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)  # the error's class and its bases

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and self.error is None

    def raised(self, name: str) -> bool:
        """Whether the worker raised an exception of the class named ``name`` (or a subclass)."""
        return name in self.classes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_world(
    worker: Callable[..., Any], world_size: int, *args: Any, deadline: float = 60.0
) -> list[RankResult]:
    """Run ``worker`` on ``world_size`` ranks; every rank's result, by rank.

    Raises ``TimeoutError`` (after killing every rank) when a rank is still running at ``deadline``.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="asyncckpt-world-") as out:
        paths = [Path(out) / f"rank-{rank}.pickle" for rank in range(world_size)]
        procs = [
            _CONTEXT.Process(
                target=_entry, args=(worker, rank, world_size, port, str(paths[rank]), args), daemon=True
            )
            for rank in range(world_size)
        ]
        try:
            for proc in procs:
                proc.start()
            end = time.monotonic() + deadline
            for proc in procs:
                proc.join(max(end - time.monotonic(), 0.0))
            stuck = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
            if stuck:
                raise TimeoutError(f"ranks {stuck} still running after {deadline} s (killed)")
        finally:
            for proc in procs:
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
                proc.join(5)
        return [
            _result(rank, proc.exitcode, path)
            for rank, (proc, path) in enumerate(zip(procs, paths, strict=True))
        ]


def _result(rank: int, exitcode: int | None, path: Path) -> RankResult:
    result = RankResult(rank, exitcode)
    if path.exists():
        with open(path, "rb") as file:
            kind, *rest = pickle.load(file)  # written by our own child processes
        if kind == "ok":
            result.value = rest[0]
        else:
            result.error, result.message, result.fields, result.classes = rest
    return result


def _entry(
    worker: Callable[..., Any], rank: int, world_size: int, port: int, out: str, args: tuple[Any, ...]
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=PG_TIMEOUT_S))
    dist.barrier()  # every rank has connected before any may exit
    try:
        outcome: tuple[Any, ...] = ("ok", worker(rank, world_size, *args))
    except BaseException as exc:  # report everything, including CheckpointException (a BaseException)
        fields = {k: getattr(exc, k, None) for k in ("rank", "step", "path", "key")}
        classes = [cls.__name__ for cls in type(exc).__mro__]
        outcome = ("error", type(exc).__name__, str(exc), fields, classes)
    with open(out + ".tmp", "wb") as file:
        pickle.dump(outcome, file)
    os.rename(out + ".tmp", out)
    # No destroy_process_group: a rank whose peer died would wait on it. Exit at once.
    os._exit(0)
