"""What the ranks of the AsyncCheckpointer multi-rank tests run (imported by the forkserver)."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import dist_workers as w
import torch
import torch.distributed as dist

import asyncckpt
from asyncckpt.errors import UsageError
from asyncckpt.saving.staging import Copier, StagedCopy
from asyncckpt.storage import FileOps
from asyncckpt.testing import FaultyOps

TIMEOUT_S = 10.0


def state_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model, "optimizer": optimizer, "rng": asyncckpt.rng_state()}


def outcome(exc: BaseException) -> dict[str, Any]:
    """What a test needs of an error: its class names, fields and text."""
    return {
        "classes": [cls.__name__ for cls in type(exc).__mro__],
        "rank": getattr(exc, "rank", None),
        "step": getattr(exc, "step", None),
        "message": str(exc),
        "cause": type(exc.__cause__).__name__ if exc.__cause__ is not None else None,
    }


def train_and_save(
    rank: int,
    world: int,
    root: str,
    saves: list[int],
    train_to: int,
    ops: FileOps | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Restore (if there is a step), train an FSDP2 MLP + Adam up to ``train_to`` saving at each
    step of ``saves``; the full state at the end (rank 0), the step restored and its figures."""
    torch.manual_seed(100 + rank)
    model = w.fsdp_mlp(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    options.setdefault("coordination_timeout", TIMEOUT_S)
    if world == 1:  # on more ranks distributed mode is automatic
        options.setdefault("process_group", dist.group.WORLD)
    with asyncckpt.AsyncCheckpointer(root, ops=ops or FileOps(), **options) as ckpt:
        restored = ckpt.restore({"model": model, "optimizer": optimizer})
        start = 1
        if restored is not None:
            asyncckpt.set_rng_state(restored.state["rng"])
            start = restored.step + 1
        for step in range(start, train_to + 1):
            w.train(model, optimizer, step)
            if step in saves:
                ckpt.save(step, state_of(model, optimizer), metadata={"step": step})
        ckpt.flush()
        stats = ckpt.stats()
    return {
        "full": w.full_state(model, optimizer),
        "restored": None if restored is None else restored.step,
        "metadata": None if restored is None else restored.metadata,
        "per_rank_restored": None if restored is None else getattr(restored, "per_rank_restored", None),
        "diagnostics": [] if restored is None else [(d.path, d.kind, d.reason) for d in restored.diagnostics],
        "committed": stats.committed,
    }


class KillInStep(FileOps):
    """SIGKILL this process at its ``nth`` write into a file of ``step``'s folder (mid-save)."""

    def __init__(self, step: int, nth: int = 1) -> None:
        self.folder = f"step-{step:010d}"
        self.armed = False
        self.left = nth

    def open_exclusive(self, path: Path) -> int:
        self.armed = self.armed or path.parent.name == self.folder
        return super().open_exclusive(path)

    def write(self, fd: int, data: memoryview | bytes) -> int:
        if self.armed:
            self.left -= 1
            if self.left <= 0:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().write(fd, data)


def killed_mid_save(rank: int, world: int, root: str, victim: int, saves: list[int], train_to: int) -> Any:
    """``train_and_save``; ``victim`` dies (kill -9) in the middle of writing the last step of
    ``saves``. The others end with the error they got."""
    ops = KillInStep(saves[-1]) if rank == victim else FileOps()
    try:
        return train_and_save(rank, world, root, saves, train_to, ops=ops)
    except BaseException as exc:
        return {"error": outcome(exc)}


def restore_only(rank: int, world: int, root: str) -> dict[str, Any]:
    """Restore into a fresh FSDP2 MLP + Adam through the checkpointer, without saving."""
    model = w.fsdp_mlp(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=TIMEOUT_S) as ckpt:
        restored = ckpt.restore({"model": model, "optimizer": optimizer})
    assert restored is not None
    return {
        "step": restored.step,
        "per_rank_restored": restored.per_rank_restored,  # type: ignore[attr-defined]
        "rng": restored.state.get("rng"),
        "summary": restored.summary,
        "diagnostics": [(d.path, d.kind, d.reason) for d in restored.diagnostics],
        "full": w.full_state(model, optimizer),
        "listing": sorted(os.listdir(root)),
    }


def storage_fault(rank: int, world: int, root: str, faulty_rank: int, op: str, err: int) -> dict[str, Any]:
    """Save step 1; step 2 with ``faulty_rank``'s ``op`` failing with ``err``; then step 3."""
    ops = FaultyOps(op, err=err)  # type: ignore[arg-type]
    ops.enabled = False
    model, optimizer = w.fsdp_trained(1, 1)
    errors: dict[int, Any] = {}
    with asyncckpt.AsyncCheckpointer(root, ops=ops, coordination_timeout=TIMEOUT_S) as ckpt:
        for step in (1, 2, 3):
            w.train(model, optimizer, step)
            ops.enabled = step == 2 and rank == faulty_rank
            ckpt.save(step, state_of(model, optimizer))
            try:
                ckpt.flush()
            except asyncckpt.CheckpointWriteError as exc:
                errors[step] = outcome(exc)
    return {"errors": errors, "injected": ops.failures}


def mismatched_steps(rank: int, world: int, root: str) -> dict[str, Any]:
    """Each rank saves another step: every rank's flush raises, nothing is committed."""
    model, optimizer = w.fsdp_trained(1, 1)
    started = time.monotonic()
    try:
        with asyncckpt.AsyncCheckpointer(root, coordination_timeout=TIMEOUT_S) as ckpt:
            ckpt.save(10 + rank, state_of(model, optimizer))
            ckpt.flush()
    except asyncckpt.CheckpointWriteError as exc:
        return {"error": outcome(exc), "seconds": time.monotonic() - started}
    return {"error": None}


def one_rank_skips(rank: int, world: int, root: str) -> dict[str, Any]:
    """Rank 0 saves a step that rank 1 does not: rank 0's flush raises within the timeout."""
    model = torch.nn.Linear(4, 4)
    error = None
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=2.0) as ckpt:
        if rank == 0:
            ckpt.save(1, {"model": model})
        try:
            ckpt.flush()
        except asyncckpt.CheckpointWriteError as exc:
            error = outcome(exc)
        dist.barrier()  # the trainer's own group: never blocked by asyncckpt's
    return {"error": error}


def save_replicated(rank: int, world: int, root: str) -> dict[str, Any]:
    """A DDP model (the same parameters on every rank), saved through the checkpointer."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    )
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=TIMEOUT_S) as ckpt:
        ckpt.save(1, {"model": model, "rng": asyncckpt.rng_state()})
    return {"param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def usage_errors(rank: int, world: int, root: str) -> list[str]:
    """Options distributed mode refuses, and DTensors in single-file mode (world size 1)."""
    refused = []
    try:
        asyncckpt.AsyncCheckpointer(root, when_busy="skip", process_group=dist.group.WORLD)
    except UsageError as exc:
        refused.append(f"skip: {exc}")
    with asyncckpt.AsyncCheckpointer(root) as ckpt:  # world size 1, no process_group: single files
        try:
            ckpt.save(1, {"model": w.fsdp_mlp(1)})
        except TypeError as exc:
            refused.append(f"dtensor: {exc}")
    return refused


def overlap_race(rank: int, world: int, root: str) -> dict[str, Any]:
    """A parameter changed in place after save() and before its background copy: the step
    fails on every rank, and the next one commits."""
    model, optimizer = w.fsdp_trained(1, 1)
    errors = {}
    with asyncckpt.AsyncCheckpointer(root, coordination_timeout=TIMEOUT_S) as ckpt:
        copier = GatedCopier()
        ckpt._stager.copier = copier  # the seam: the test decides when background copies run
        ckpt.save(1, state_of(model, optimizer))
        if rank == 1:
            with torch.no_grad():
                next(model.parameters()).mul_(2)  # not an optimizer step: nothing waits
        copier.gate.set()
        try:
            ckpt.flush()
        except asyncckpt.CheckpointWriteError as exc:
            errors[1] = outcome(exc)
        w.train(model, optimizer, 2)
        ckpt.save(2, state_of(model, optimizer))
        ckpt.flush()
    return {"errors": errors, "committed": [c.step for c in asyncckpt.list_checkpoints(root)]}


class GatedCopier(Copier):
    """A copier whose background copies start only once ``gate`` is set (or after the timeout)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.staged: list[StagedCopy] = []

    def submit(self, staged: StagedCopy, destinations: Any, sources: Any) -> None:
        self.staged.append(staged)
        super().submit(staged, destinations, sources)

    def run(self, staged: Any, destinations: Any, sources: Any) -> None:
        self.gate.wait(TIMEOUT_S)
        super().run(staged, destinations, sources)


ENOSPC, EIO = errno.ENOSPC, errno.EIO


def save_loop_killed(rank: int, world: int, root: str, victim: int, ops: int, first: int) -> Any:
    """Save steps ``first`` .. ``first + 3`` through the checkpointer (``max_pending=2``);
    ``victim`` dies (kill -9) at its ``ops``-th file operation. The others end with their error."""
    model, optimizer = w.fsdp_trained(1, 1)
    faults = w.KillAfterOps(ops) if rank == victim else FileOps()
    try:
        with asyncckpt.AsyncCheckpointer(
            root, ops=faults, keep_last=2, max_pending=2, coordination_timeout=TIMEOUT_S
        ) as ckpt:
            for step in range(first, first + 4):
                w.train(model, optimizer, step)
                ckpt.save(step, state_of(model, optimizer))
    except BaseException as exc:
        return {"error": outcome(exc)}
    return {"error": None}


def train_with_retention(rank: int, world: int, root: str) -> dict[str, Any]:
    """Saves of steps 1-5 with keep_last=1, keep_every=2."""
    return train_and_save(rank, world, root, [1, 2, 3, 4, 5], 5, keep_last=1, keep_every=2)


def one_rank_opens(rank: int, world: int, root: str) -> dict[str, Any]:
    """Only rank 0 opens a checkpointer: in automatic distributed mode it ends in a clear error
    within the timeout; with a group of its own rank it saves (a multi-rank step of one rank)."""
    error = None
    model = torch.nn.Linear(4, 4)
    started = time.monotonic()
    if rank == 0:
        try:
            with asyncckpt.AsyncCheckpointer(root, coordination_timeout=2.0) as ckpt:
                ckpt.save(1, {"model": model})
        except asyncckpt.CoordinationError as exc:
            error = outcome(exc)
    seconds = time.monotonic() - started
    dist.barrier()
    own = dist.new_group([rank], use_local_synchronization=True)
    if rank == 0:
        with asyncckpt.AsyncCheckpointer(root, process_group=own, coordination_timeout=TIMEOUT_S) as ckpt:
            ckpt.save(2, {"model": model})
    dist.barrier()
    return {"error": error, "seconds": seconds}


def async_saves(rank: int, world: int, root: str) -> dict[str, Any]:
    """``async with`` on several ranks: asave, aflush, a handle awaited, then restore."""
    import anyio

    model, optimizer = w.fsdp_trained(1, 1)

    async def main() -> dict[str, Any]:
        async with asyncckpt.AsyncCheckpointer(root, coordination_timeout=TIMEOUT_S) as ckpt:
            for step in (1, 2):
                w.train(model, optimizer, step)
                handle = await ckpt.asave(step, state_of(model, optimizer))
            path = await handle
            await ckpt.aflush()
            restored = ckpt.restore({"model": model, "optimizer": optimizer})
        return {"path": str(path), "restored": None if restored is None else restored.step}

    return anyio.run(main)
