"""Save methods and the two limits they are measured against, behind one small interface.

Every method turns the same :class:`~ckptbench.state.BenchState` into a durable file (or, for the
staging floor, into host copies) and reports two times measured on the calling (training) thread:

- ``stall``: until control returns to the trainer;
- ``durable``: until the bytes are on disk (fsync returned) and the method says it is done.

Synchronous methods have ``stall == durable``. Files are deleted between runs by the driver, not
inside the timed region.
"""

from __future__ import annotations

import copy
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import system
from .direct import aligned_copy, write_direct
from .state import BenchState, flat_tensors


class Pending:
    """A started save; ``wait()`` returns once it is durable, ``done()`` says whether it is
    (without ``poll``, a save is in flight until it is waited for)."""

    def __init__(self, wait: Callable[[], Any] | None = None, poll: Callable[[], bool] | None = None) -> None:
        self._wait = wait
        self._poll = poll

    def wait(self) -> None:
        if self._wait is not None:
            self._wait()
            self._wait = None

    def done(self) -> bool:
        if self._wait is None:
            return True
        return self._poll is not None and self._poll()


DONE = Pending()


@dataclass
class SaveRun:
    """One timed save."""

    stall_s: float
    durable_s: float
    peak_rss_delta: int  # high-water RSS during the save minus RSS before it, bytes
    extra: dict[str, Any] = field(default_factory=dict)


class SaveMethod:
    """A way to checkpoint the state; ``setup`` and ``close`` are not timed."""

    name = ""
    description = ""
    is_floor = False

    def __init__(self, state: BenchState, directory: Path) -> None:
        self.state = state
        self.directory = directory / self.name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.last_path: Path | None = None

    def setup(self) -> None:
        """Allocate what a long-running trainer would have allocated already."""

    def begin(self, step: int) -> Pending:
        """Start a save; return when the trainer would get control back."""
        raise NotImplementedError

    def save(self, step: int) -> tuple[float, float]:
        """Save once and wait until durable; return (stall, durable) in seconds from the call."""
        started = time.perf_counter()
        pending = self.begin(step)
        stalled = time.perf_counter()
        pending.wait()
        durable = time.perf_counter()
        return stalled - started, durable - started

    def run(self, step: int) -> SaveRun:
        before = system.rss_bytes()
        system.reset_peak_rss()
        counters = system.vmstat()
        stall, durable = self.save(step)
        peak = system.peak_rss_bytes()
        extra = self.extra() | {"vmstat": system.vmstat_delta(counters)}
        return SaveRun(stall, durable, max(0, peak - before), extra)

    def extra(self) -> dict[str, Any]:
        return {}

    def cleanup(self, keep: Path | None = None) -> None:
        """Delete what the runs wrote, except ``keep`` (untimed)."""
        for child in sorted(self.directory.iterdir()):
            if keep is None or child != keep:
                system.remove(child)

    def close(self) -> None:
        """Release resources (untimed)."""


def _host_views(tensors: list[torch.Tensor]) -> list[memoryview]:
    views = []
    for tensor in tensors:
        flat = tensor.detach().reshape(-1).view(torch.uint8)
        views.append(memoryview(flat.numpy()))
    return views


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


class CopyFloor(SaveMethod):
    """Staging floor: one ``copy_`` per tensor into host buffers allocated once, up front."""

    name = "copy_floor"
    description = "per-tensor copy_ into preallocated host buffers (staging floor)"
    is_floor = True

    def setup(self) -> None:
        self.buffers = [torch.empty_like(t) for t in self.state.tensors()]
        self.begin(0)  # fault the pages in: a trainer's buffers would be warm

    def begin(self, step: int) -> Pending:
        for dest, source in zip(self.buffers, self.state.tensors(), strict=True):
            dest.copy_(source)
        return DONE

    def close(self) -> None:
        self.buffers = []


class WriteFloor(SaveMethod):
    """Durability floor: ``os.write`` the tensors' bytes, in order, to a new file; ``fsync`` it."""

    name = "write_floor"
    description = "os.write of the same bytes to a new file + fsync (durability floor)"
    is_floor = True

    def begin(self, step: int) -> Pending:
        path = self.directory / f"floor-{step}.bin"
        views = _host_views(self.state.tensors())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for view in views:
                _write_all(fd, view)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.last_path = path
        return DONE


class DirectWriteFloor(SaveMethod):
    """The disk's own floor: the same bytes, laid out once (untimed) in page-aligned memory,
    written to a new file with ``O_DIRECT`` in 8 MiB pieces, then ``fsync``. Through the page
    cache where the filesystem refuses ``O_DIRECT``. asyncckpt's direct writes aim at it."""

    name = "write_floor_direct"
    description = "O_DIRECT write of the same bytes from page-aligned memory + fsync (disk floor)"
    is_floor = True

    def setup(self) -> None:
        self.area = aligned_copy(_host_views(self.state.tensors()))

    def begin(self, step: int) -> Pending:
        path = self.directory / f"floor-direct-{step}.bin"
        write_direct(self.area, path)
        self.last_path = path
        return DONE

    def close(self) -> None:
        self.area = memoryview(b"")


class ThreadFloor(SaveMethod):
    """The floor of a background checkpoint: the tensors copied on the trainer's thread into
    page-aligned memory allocated once (a consistent snapshot; the copy floor as stall), then a
    plain thread computes each tensor's CRC32C and writes the bytes with ``O_DIRECT`` (as
    ``write_floor_direct``) and fsyncs them. No encoding, no header, no read-back, no rename: the
    least work a consistent, checksummed, durable background save does, so its training
    interference is the least any such save can cause here."""

    name = "thread_floor"
    description = (
        "copy on the trainer thread, then CRC32C + O_DIRECT write + fsync in a thread (background floor)"
    )

    def setup(self) -> None:
        tensors = self.state.tensors()
        sizes = [t.numel() * t.element_size() for t in tensors]
        starts = []
        end = 0
        for size in sizes:  # each copy on a 64-byte boundary, as asyncckpt's blobs
            starts.append(end)
            end += -(-size // 64) * 64
        self.area = memoryview(mmap.mmap(-1, max(-(-end // 4096) * 4096, 4096)))
        flat = torch.frombuffer(self.area, dtype=torch.uint8)
        self.copies = [
            flat[start : start + size].view(t.dtype).view(t.shape)
            for start, size, t in zip(starts, sizes, tensors, strict=True)
        ]
        self.saves = 0
        self.begin(0).wait()  # fault the pages in: a trainer's would be warm

    def begin(self, step: int) -> Pending:
        with torch.no_grad():
            torch._foreach_copy_(self.copies, [t.detach() for t in self.state.tensors()])
        self.saves += 1
        path = self.directory / f"thread-floor-{step}-{self.saves}.bin"
        thread = threading.Thread(target=self._write, args=(path,), name="thread-floor")
        thread.start()
        self.last_path = path
        return Pending(thread.join, lambda: not thread.is_alive())

    def _write(self, path: Path) -> None:
        import crc32c

        for view in _host_views(self.copies):
            crc32c.crc32c(view)
        write_direct(self.area, path)

    def close(self) -> None:
        self.copies = []
        self.area = memoryview(b"")


class AsyncCheckpointerSave(SaveMethod):
    """``AsyncCheckpointer.save``: stall = ``save()`` returns; durable = ``handle.result()`` returns.

    With overlap (the default) the parameters and Adam state are copied in the background and the
    next optimizer step waits for that copy. ``step_wait`` is that wait when the step comes at
    once (no forward/backward to hide the copy behind), measured with ``wait_staged()``: the
    worst case a trainer sees on top of the stall.
    """

    name = "asyncckpt"
    description = "asyncckpt.AsyncCheckpointer.save (background writer, overlapped staging)"
    overlap = True
    background_nice: int | None = None  # None: the library's default
    keep_last = 1 << 30  # retention off: files are removed between runs by the driver

    def options(self) -> dict[str, Any]:
        """The checkpointer's options that make this method."""
        nice = {} if self.background_nice is None else {"background_nice": self.background_nice}
        return {"overlap": self.overlap, **nice}

    def setup(self) -> None:
        import asyncckpt

        self.ckpt = asyncckpt.AsyncCheckpointer(self.directory, keep_last=self.keep_last, **self.options())
        self.ckpt.__enter__()
        self.ckpt.save(0, self.state.objects()).result()  # sizes the staging pool once
        self.step_wait_s = 0.0

    def begin(self, step: int) -> Pending:
        handle = self.ckpt.save(step, self.state.objects())
        self.last_path = handle.path
        return Pending(handle.result, handle.done)

    def save(self, step: int) -> tuple[float, float]:
        started = time.perf_counter()
        pending = self.begin(step)
        stalled = time.perf_counter()
        self.ckpt.wait_staged()
        self.step_wait_s = time.perf_counter() - stalled
        pending.wait()
        durable = time.perf_counter()
        return stalled - started, durable - started

    def extra(self) -> dict[str, Any]:
        stats = self.ckpt.stats()
        return {
            "staging_bytes": stats.staging_bytes,
            "write_ms": stats.last_write_ms,
            "fsync_ms": stats.last_fsync_ms,
            "writer_total_ms": stats.last_total_ms,
            "step_wait_s": self.step_wait_s,
        }

    def cleanup(self, keep: Path | None = None) -> None:
        for child in sorted(self.directory.glob("step-*.ckpt")):
            if keep is None or child != keep:
                system.remove(child)

    def close(self) -> None:
        self.ckpt.close()


class AsyncCheckpointerEagerSave(AsyncCheckpointerSave):
    """``AsyncCheckpointer(overlap=False).save``: every tensor is copied before ``save()`` returns."""

    name = "asyncckpt_eager"
    description = "asyncckpt.AsyncCheckpointer(overlap=False).save (all copies inside save())"
    overlap = False


class AsyncCheckpointerNice10Save(AsyncCheckpointerSave):
    """``AsyncCheckpointer(background_nice=10).save``: the writer's threads 10 nice levels down."""

    name = "asyncckpt_nice10"
    description = "asyncckpt.AsyncCheckpointer(background_nice=10).save (writer lowered)"
    background_nice = 10


class AsyncCheckpointerEagerNice10Save(AsyncCheckpointerEagerSave):
    """``AsyncCheckpointer(overlap=False, background_nice=10).save``."""

    name = "asyncckpt_eager_nice10"
    description = "asyncckpt.AsyncCheckpointer(overlap=False, background_nice=10).save"
    background_nice = 10


class AsyncCheckpointerKeep1Save(AsyncCheckpointerSave):
    """``AsyncCheckpointer(keep_last=1).save``: each commit deletes the checkpoint before it
    (after the handle resolves; the driver's rounds leave time for the deletion)."""

    name = "asyncckpt_keep1"
    description = "asyncckpt.AsyncCheckpointer(keep_last=1).save (retention deletes the previous file)"
    keep_last = 1

    def cleanup(self, keep: Path | None = None) -> None:
        """Nothing: retention deletes each previous checkpoint (what this method measures)."""


class AsyncCheckpointerBudgetSave(AsyncCheckpointerSave):
    """``AsyncCheckpointer(staging_budget=state / N).save``: the state streams through a buffer
    of 1/N of its size while the writer writes (``save()`` returns once the tensors the step
    hook does not guard are copied; the step waits for the rest)."""

    name = "asyncckpt_budget4"
    description = "asyncckpt.AsyncCheckpointer(staging_budget=state/4).save (streamed staging)"
    fraction = 4

    def options(self) -> dict[str, Any]:
        return {"staging_budget": max(self.state.nbytes // self.fraction, 64 << 10)}


class AsyncCheckpointerBudget16Save(AsyncCheckpointerBudgetSave):
    """The same with a buffer of 1/16 of the state."""

    name = "asyncckpt_budget16"
    description = "asyncckpt.AsyncCheckpointer(staging_budget=state/16).save (streamed staging)"
    fraction = 16


class SyncSave(SaveMethod):
    """``asyncckpt.save``: the synchronous, durable save (issue #2)."""

    name = "asyncckpt_sync"
    description = "asyncckpt.save (synchronous, durable)"

    def begin(self, step: int) -> Pending:
        import asyncckpt

        path = self.directory / f"step-{step:010d}.ckpt"
        asyncckpt.save(path, self.state.objects(), step=step)
        self.last_path = path
        return DONE


class TorchSave(SaveMethod):
    """``torch.save(state_dict, path)``: stall = it returns (no fsync); durable = after fsync."""

    name = "torch_save"
    description = "torch.save (synchronous; durable after an added fsync of file and directory)"

    def begin(self, step: int) -> Pending:
        path = self.directory / f"step-{step}.pt"
        torch.save(self.state.state_dict(), path)
        self.last_path = path
        # The fsync is left to wait(): stall is what a plain torch.save costs a training loop.
        return Pending(lambda: system.fsync_path(path))


class TorchSaveThread(SaveMethod):
    """Hand-rolled async: ``copy.deepcopy`` the state dict, ``torch.save`` + fsync it in a thread."""

    name = "torch_save_thread"
    description = "deepcopy of the state dict + torch.save and fsync in a thread (hand-rolled async)"

    def begin(self, step: int) -> Pending:
        path = self.directory / f"step-{step}.pt"
        snapshot = copy.deepcopy(self.state.state_dict())
        thread = threading.Thread(target=_save_and_fsync, args=(snapshot, path))
        thread.start()
        self.last_path = path
        return Pending(thread.join, lambda: not thread.is_alive())


def _save_and_fsync(state: Any, path: Path) -> None:
    torch.save(state, path)
    system.fsync_path(path)


class DcpAsyncSave(SaveMethod):
    """``torch.distributed.checkpoint.async_save`` with ``FileSystemWriter(sync_files=True)``.

    Single process in a gloo process group of world size 1; stall = ``async_save`` returns,
    durable = its future completes.
    """

    name = "dcp_async"
    description = "torch.distributed.checkpoint.async_save, FileSystemWriter(sync_files=True), gloo world=1"

    def setup(self) -> None:
        ensure_process_group()

    def begin(self, step: int) -> Pending:
        import torch.distributed.checkpoint as dcp

        path = self.directory / f"step-{step}"
        writer = dcp.FileSystemWriter(str(path), sync_files=True)
        future = dcp.async_save(self.state.state_dict(), storage_writer=writer)
        self.last_path = path
        return Pending(future.result, future.done)


def ensure_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        init = f"tcp://127.0.0.1:{system.free_port()}"
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)


class SafetensorsSave(SaveMethod):
    """safetensors ``save_file`` of the flat tensor dict (the state has no shared tensors), + fsync."""

    name = "safetensors"
    description = "safetensors.torch.save_file of the flattened tensors + fsync"

    def begin(self, step: int) -> Pending:
        from safetensors.torch import save_file

        path = self.directory / f"step-{step}.safetensors"
        save_file(flat_tensors(self.state.state_dict()), str(path))
        system.fsync_path(path)
        self.last_path = path
        return DONE


def _available_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _available_dcp() -> bool:
    try:
        import torch.distributed as dist
        import torch.distributed.checkpoint  # noqa: F401
    except ImportError:
        return False
    return bool(dist.is_available())


SAVE_METHODS: dict[str, type[SaveMethod]] = {
    m.name: m
    for m in (
        CopyFloor,
        WriteFloor,
        DirectWriteFloor,
        ThreadFloor,
        AsyncCheckpointerSave,
        AsyncCheckpointerEagerSave,
        AsyncCheckpointerNice10Save,
        AsyncCheckpointerEagerNice10Save,
        AsyncCheckpointerKeep1Save,
        AsyncCheckpointerBudgetSave,
        AsyncCheckpointerBudget16Save,
        SyncSave,
        TorchSave,
        TorchSaveThread,
        DcpAsyncSave,
        SafetensorsSave,
    )
}

AVAILABLE: dict[str, Callable[[], bool]] = {
    "safetensors": _available_safetensors,
    "dcp_async": _available_dcp,
}


def available(name: str) -> bool:
    check = AVAILABLE.get(name)
    return check is None or check()
