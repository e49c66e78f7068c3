"""Load methods and the read floor, each timed cold (page cache dropped) and warm.

The files come from the save phase: the write floor's file, asyncckpt's, torch.save's,
safetensors' and DCP's checkpoint of the same state.
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import system
from .state import BenchState


@dataclass
class LoadRun:
    seconds: float
    peak_rss_delta: int


class LoadMethod:
    """Reads one file (or directory) back; ``setup``/``close`` are not timed."""

    name = ""
    description = ""
    source = ""  # which save method's file it reads
    is_floor = False

    def __init__(self, state: BenchState, path: Path) -> None:
        self.state = state
        self.path = path

    def setup(self) -> None:
        pass

    def load(self) -> None:
        raise NotImplementedError

    def files(self) -> list[Path]:
        return [self.path]

    def run(self) -> LoadRun:
        before = system.rss_bytes()
        system.reset_peak_rss()
        started = time.perf_counter()
        self.load()
        elapsed = time.perf_counter() - started
        peak = system.peak_rss_bytes()
        return LoadRun(elapsed, max(0, peak - before))


class ReadFloor(LoadMethod):
    """Read floor: ``readinto`` the file's bytes, tensor by tensor, into preallocated buffers."""

    name = "read_floor"
    description = "readinto of the same bytes into preallocated host buffers (read floor)"
    source = "write_floor"
    is_floor = True

    def setup(self) -> None:
        self.buffers = [torch.empty_like(t) for t in self.state.tensors()]
        for buffer in self.buffers:
            buffer.zero_()  # fault the pages in: the floor is the read, not the allocation

    def load(self) -> None:
        with open(self.path, "rb", buffering=0) as file:
            for buffer in self.buffers:
                view = memoryview(buffer.reshape(-1).view(torch.uint8).numpy())
                while view:
                    got = file.readinto(view)
                    if not got:
                        raise EOFError(f"{self.path} is shorter than the state")
                    view = view[got:]


# The read + CRC32C floor is the fastest, round by round, of three plain arrangements of the
# same reads into buffers that exist already, in parts of at most PART_BYTES (small tensors share
# one preadv, big ones are split): parts on CRC_THREADS threads, each checksummed once it landed;
# the same parts each read in slices of SLICE_BYTES, each checksummed as soon as it lands, while
# it is still in the CPU's cache (as asyncckpt.runs reads warm since session 9; these two are the
# faster warm); or one thread reading the file in order while another checksums behind it (the
# kernel's readahead sees one sequential reader: the faster one cold). preadv and crc32c release
# the GIL.
PART_BYTES = 8 << 20
SLICE_BYTES = 1 << 20
CRC_THREADS = min(8, os.cpu_count() or 1)
CRC_FLOORS = ("read_crc_parallel", "read_crc_sliced", "read_crc_pipelined")

Part = tuple[int, list[memoryview]]  # file offset, the buffers' bytes that follow it in the file


class ReadCrcParallel(ReadFloor):
    """The read floor's bytes read in parts on ``CRC_THREADS`` threads, each part checksummed."""

    name = "read_crc_parallel"
    description = (
        f"preadv into preallocated host buffers + crc32c of every byte, {PART_BYTES >> 20} MiB "
        f"parts on {CRC_THREADS} threads"
    )

    def setup(self) -> None:
        super().setup()
        self.parts = plan_parts([_bytes(b) for b in self.buffers], PART_BYTES)

    def load(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            with ThreadPoolExecutor(CRC_THREADS, thread_name_prefix="read-crc-floor") as pool:
                for _ in pool.map(functools.partial(self.read, fd), self.work()):
                    pass
        finally:
            os.close(fd)

    def work(self) -> list[Any]:
        """What each task of the pool reads: a part."""
        return self.parts

    @staticmethod
    def read(fd: int, part: Any) -> None:
        _read_part(fd, part)


class ReadCrcPipelined(ReadCrcParallel):
    """The same parts read in file order by one thread, checksummed by another behind it."""

    name = "read_crc_pipelined"
    description = (
        f"preadv into preallocated host buffers in file order, {PART_BYTES >> 20} MiB parts, "
        "crc32c of each on a second thread"
    )

    def load(self) -> None:
        import crc32c

        fd = os.open(self.path, os.O_RDONLY)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="read-crc-floor") as pool:
                checked = []
                for offset, views in self.parts:
                    _read_part(fd, (offset, views), checksums=False)
                    checked.append(pool.submit(lambda views=views: list(map(crc32c.crc32c, views))))
                for future in checked:
                    future.result()
        finally:
            os.close(fd)


class ReadCrcSliced(ReadCrcParallel):
    """The parallel floor's parts, each read in slices checksummed as soon as they land."""

    name = "read_crc_sliced"
    description = (
        f"preadv into preallocated host buffers + crc32c of every byte, {PART_BYTES >> 20} MiB "
        f"parts on {CRC_THREADS} threads, each read in {SLICE_BYTES >> 20} MiB slices, "
        "each checksummed as it lands"
    )

    def setup(self) -> None:
        super().setup()
        self.sliced = [
            [(offset + start, views) for start, views in plan_parts(part, SLICE_BYTES)]
            for offset, part in self.parts
        ]

    def work(self) -> list[Any]:
        """What each task of the pool reads: a part's slices, in order."""
        return self.sliced

    @staticmethod
    def read(fd: int, part: Any) -> None:
        for piece in part:
            _read_part(fd, piece)


def _bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


MAX_VIEWS = 1024  # buffers per preadv (Linux refuses more: EINVAL)


def plan_parts(views: list[memoryview], part_bytes: int) -> list[Part]:
    """``views``, laid back to back in a file, cut into parts of at most ``part_bytes`` and
    :data:`MAX_VIEWS` buffers each."""
    parts: list[Part] = []
    offset, run, run_bytes = 0, [], 0
    for view in views:
        if run and (run_bytes + len(view) > part_bytes or len(run) >= MAX_VIEWS):
            parts.append((offset - run_bytes, run))
            run, run_bytes = [], 0
        if len(view) > part_bytes:
            parts += [(offset + s, [view[s : s + part_bytes]]) for s in range(0, len(view), part_bytes)]
        else:
            run.append(view)
            run_bytes += len(view)
        offset += len(view)
    if run:
        parts.append((offset - run_bytes, run))
    return parts


def _read_part(fd: int, part: Part, *, checksums: bool = True) -> list[int]:
    import crc32c

    offset, views = part
    got = os.preadv(fd, views, offset)
    if got < sum(len(v) for v in views):
        raise EOFError(f"short read at offset {offset} ({got} bytes)")
    return list(map(crc32c.crc32c, views)) if checksums else []


class AsyncckptLoad(LoadMethod):
    """``asyncckpt.load(path)`` with checksums (new tensors)."""

    name = "asyncckpt_load"
    description = 'asyncckpt.load (verify="full": every CRC32C checked; new tensors)'
    source = "asyncckpt"

    def load(self) -> None:
        import asyncckpt

        asyncckpt.load(self.path)


class AsyncckptLoadTrusted(LoadMethod):
    """``asyncckpt.load(path, verify="structure")``: structure only."""

    name = "asyncckpt_load_novalidate"
    description = 'asyncckpt.load(verify="structure") (structure only; new tensors)'
    source = "asyncckpt"

    def load(self) -> None:
        import asyncckpt

        if "verify" in inspect.signature(asyncckpt.load).parameters:
            asyncckpt.load(self.path, verify="structure")
        else:  # releases before the rename
            asyncckpt.load(self.path, validate=False)


class AsyncckptRestore(LoadMethod):
    """``asyncckpt.restore(dir, {"model": m, "optimizer": o})``: into the model's own tensors."""

    name = "asyncckpt_restore"
    description = "asyncckpt.restore into the existing model + optimizer (checksums on)"
    source = "asyncckpt"

    def files(self) -> list[Path]:
        return [self.path.parent]

    def setup(self) -> None:
        self.restore = restore_function()

    def load(self) -> None:
        self.restore(self.path.parent, self.state.objects())


class TorchLoad(LoadMethod):
    """``torch.load(path)`` (weights_only, no mmap): new tensors."""

    name = "torch_load"
    description = "torch.load (new tensors)"
    source = "torch_save"

    def load(self) -> None:
        torch.load(self.path, map_location="cpu")


class TorchRestore(LoadMethod):
    """``torch.load`` then ``model.load_state_dict`` and ``optimizer.load_state_dict``."""

    name = "torch_restore"
    description = "torch.load + model/optimizer load_state_dict"
    source = "torch_save"

    def load(self) -> None:
        state = torch.load(self.path, map_location="cpu")
        self.state.model.load_state_dict(state["model"])
        self.state.optimizer.load_state_dict(state["optimizer"])


class SafetensorsLoad(LoadMethod):
    name = "safetensors_load"
    description = "safetensors.torch.load_file (new tensors)"
    source = "safetensors"

    def load(self) -> None:
        from safetensors.torch import load_file

        load_file(str(self.path))


class DcpLoad(LoadMethod):
    """``torch.distributed.checkpoint.load`` in place into the model's and optimizer's state dicts."""

    name = "dcp_load"
    description = "torch.distributed.checkpoint.load in place into the state dicts"
    source = "dcp_async"

    def files(self) -> list[Path]:
        return [self.path]

    def load(self) -> None:
        import torch.distributed.checkpoint as dcp

        state = self.state.state_dict()
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(self.path)))


def _drop(*args: Any, **kwargs: Any) -> None:
    """Drops the loader's summary event (keeps stdout clean)."""


def restore_function() -> Any:
    import asyncckpt

    restore = getattr(asyncckpt, "restore", None)
    if restore is None:  # the loader is not re-exported yet
        from asyncckpt.loading import rollback as loader

        restore = loader.restore
    if "log" in inspect.signature(restore).parameters:
        return functools.partial(restore, log=_drop)
    return restore


LOAD_METHODS: dict[str, type[LoadMethod]] = {
    m.name: m
    for m in (
        ReadFloor,
        ReadCrcParallel,
        ReadCrcSliced,
        ReadCrcPipelined,
        AsyncckptLoad,
        AsyncckptLoadTrusted,
        AsyncckptRestore,
        TorchLoad,
        TorchRestore,
        SafetensorsLoad,
        DcpLoad,
    )
}


def file_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return os.path.getsize(path)
