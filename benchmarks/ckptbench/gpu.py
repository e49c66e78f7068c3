"""GPU figures (only when CUDA is present).

1. Device→host bandwidth: asyncckpt's staging (side stream, non_blocking copies into its pinned
   buffer set, per tensor) vs one large pinned ``copy_`` of the same byte count (the PCIe floor)
   vs per-tensor ``copy_`` into preallocated pinned buffers.
2. Overlap: extra wall time per checkpoint in a GPU training loop whose forward/backward is
   longer than the copy, with asyncckpt's lazy optimizer pre-hook (``save()`` returns after
   enqueueing; only the next ``optimizer.step`` waits for the copy) vs an eager synchronized copy
   (the same ``save()`` followed by ``torch.cuda.synchronize()``).
3. Restore into a CUDA model: asyncckpt.restore vs torch.load(map_location="cuda") + load_state_dict.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from . import system
from .state import BenchState, build_state


def _sync() -> None:
    torch.cuda.synchronize()


def to_cuda(state: BenchState) -> BenchState:
    state.model.cuda()
    for per_param in state.optimizer.state.values():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and key != "step":
                per_param[key] = value.cuda()
    return state


def _median(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def bandwidth(nbytes: int, n_tensors: int, repeat: int) -> dict[str, Any]:
    """D2H GB/s: asyncckpt staging vs one large pinned copy_ vs per-tensor pinned copy_."""
    from asyncckpt.saving.snapshot import flatten
    from asyncckpt.saving.staging import StagingPool

    from .internals import stage_once

    state = to_cuda(build_state(nbytes, n_tensors))
    snapshot = flatten(state.objects())
    total = snapshot.nbytes
    pool = StagingPool(1, pin_memory=True)
    buffers = pool.acquire(snapshot.layout_key())
    assert buffers is not None
    side = torch.cuda.Stream()
    big_src = torch.empty(total, dtype=torch.uint8, device="cuda")
    big_dst = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    tensors = state.tensors()
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    ours, ours_enqueue, floor, per_tensor = [], [], [], []
    for r in range(repeat + 1):  # the first round warms up and is dropped
        _sync()
        started = time.perf_counter()
        staged = stage_once(snapshot, buffers, side_stream=side)
        enqueued = time.perf_counter()
        staged.wait()
        done = time.perf_counter()
        _sync()
        started_floor = time.perf_counter()
        big_dst.copy_(big_src, non_blocking=True)
        _sync()
        done_floor = time.perf_counter()
        started_pt = time.perf_counter()
        for dst, src in zip(pinned, tensors, strict=True):
            dst.copy_(src, non_blocking=True)
        _sync()
        done_pt = time.perf_counter()
        if r:
            ours.append(total / (done - started) / 1e9)
            ours_enqueue.append((enqueued - started) * 1e3)
            floor.append(total / (done_floor - started_floor) / 1e9)
            per_tensor.append(total / (done_pt - started_pt) / 1e9)
    ratios = [o / f for o, f in zip(ours, floor, strict=True)]
    result = {
        "bytes": total,
        "tensors": len(tensors),
        "asyncckpt_staging_gb_s": _median(ours),
        "asyncckpt_enqueue_ms": _median(ours_enqueue),
        "single_pinned_copy_gb_s": _median(floor),
        "per_tensor_pinned_copy_gb_s": _median(per_tensor),
        "ratio_to_floor": _median(ratios),
    }
    del state, snapshot, buffers, pool, big_src, big_dst, pinned, tensors
    torch.cuda.empty_cache()
    return result


class _GpuTrainer:
    def __init__(self, width: int, depth: int, batch: int) -> None:
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for _ in range(depth - 1):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        layers.append(torch.nn.Linear(width, width))
        self.model = torch.nn.Sequential(*layers).cuda()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-5)
        self.x = torch.randn(batch, width, device="cuda")
        self.y = torch.randn(batch, width, device="cuda")
        self.step()
        _sync()

    def forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(self.model(self.x), self.y).backward()

    def step(self) -> None:
        self.forward_backward()
        self.optimizer.step()

    def objects(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer}

    def state_bytes(self) -> int:
        n = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return 3 * n


def _time(fn: Any, n: int = 3) -> float:
    fn()
    _sync()
    started = time.perf_counter()
    for _ in range(n):
        fn()
    _sync()
    return (time.perf_counter() - started) / n


def overlap(directory: Path, *, width: int, depth: int, steps: int, repeat: int) -> dict[str, Any]:
    """Extra time per checkpoint: lazy pre-hook vs eager synchronized copy."""
    import asyncckpt

    batch = 1024
    while True:
        trainer = _GpuTrainer(width, depth, batch)
        host = torch.empty(trainer.state_bytes(), dtype=torch.uint8, pin_memory=True)
        device = torch.empty(trainer.state_bytes(), dtype=torch.uint8, device="cuda")
        copy_s = _time(lambda h=host, d=device: h.copy_(d, non_blocking=True))
        del host, device
        fwd_bwd_s = _time(trainer.forward_backward)
        if fwd_bwd_s >= 1.5 * copy_s or batch >= 1 << 16:
            break
        del trainer
        torch.cuda.empty_cache()
        batch *= 2
    step_s = _time(trainer.step)
    directory.mkdir(parents=True, exist_ok=True)
    windows: dict[str, list[float]] = {"baseline": [], "lazy": [], "eager": []}
    stalls: dict[str, list[float]] = {"lazy": [], "eager": []}
    with asyncckpt.AsyncCheckpointer(directory, keep_last=1) as ckpt:
        ckpt.save(0, trainer.objects()).result()  # pins the staging buffers once
        n = 0
        for _ in range(repeat + 1):  # the first round warms up and is dropped
            for mode in ("baseline", "lazy", "eager"):
                _sync()
                started = time.perf_counter()
                # The save comes after a step is queued, as in a training loop: the host's own
                # work in save() overlaps the GPU running that step.
                trainer.step()
                handle = None
                if mode != "baseline":
                    n += 1
                    called = time.perf_counter()
                    handle = ckpt.save(n, trainer.objects())
                    if mode == "eager":
                        _sync()  # the copy (and everything before it) finished before going on
                    stalls[mode].append(time.perf_counter() - called)
                for _ in range(steps - 1):
                    trainer.step()
                _sync()
                windows[mode].append(time.perf_counter() - started)
                if handle is not None:
                    handle.result()  # untimed: the write itself is not what this measures
        for key in windows:
            windows[key] = windows[key][1:]
        for key in stalls:
            stalls[key] = stalls[key][1:]
    extra = {
        mode: [(w - b) * 1e3 for w, b in zip(windows[mode], windows["baseline"], strict=True)]
        for mode in ("lazy", "eager")
    }
    result = {
        "model": f"MLP {depth}x{width}, batch {batch}, Adam",
        "state_bytes": trainer.state_bytes(),
        "copy_ms_single_pinned": copy_s * 1e3,
        "forward_backward_ms": fwd_bwd_s * 1e3,
        "step_ms": step_s * 1e3,
        "steps_per_window": steps,
        "extra_ms_per_checkpoint": {k: _median(v) for k, v in extra.items()},
        "save_call_ms": {k: _median([s * 1e3 for s in v]) for k, v in stalls.items()},
    }
    del trainer
    torch.cuda.empty_cache()
    return result


def restore_cuda(directory: Path, nbytes: int, n_tensors: int, repeat: int) -> dict[str, Any]:
    """Warm restore into a CUDA model: asyncckpt.restore vs torch.load(cuda) + load_state_dict."""
    import asyncckpt

    state = to_cuda(build_state(nbytes, n_tensors))
    directory.mkdir(parents=True, exist_ok=True)
    asyncckpt.save(directory / "step-0000000001.ckpt", state.objects(), step=1)
    torch_path = directory.parent / "restore_cuda.pt"
    torch.save(state.state_dict(), torch_path)
    system.warm([directory, torch_path])
    from .loading import restore_function

    restore = restore_function()
    ours, theirs = [], []
    for r in range(repeat + 1):
        _sync()
        started = time.perf_counter()
        restore(directory, state.objects(), map_location="cuda")
        _sync()
        middle = time.perf_counter()
        loaded = torch.load(torch_path, map_location="cuda")
        state.model.load_state_dict(loaded["model"])
        state.optimizer.load_state_dict(loaded["optimizer"])
        del loaded
        _sync()
        done = time.perf_counter()
        if r:
            ours.append(middle - started)
            theirs.append(done - middle)
    speedup = [t / o for o, t in zip(ours, theirs, strict=True)]
    result = {
        "bytes": state.nbytes,
        "tensors": state.n_tensors,
        "asyncckpt_restore_s": _median(ours),
        "torch_load_restore_s": _median(theirs),
        "speedup": _median(speedup),
    }
    del state
    torch.cuda.empty_cache()
    return result
