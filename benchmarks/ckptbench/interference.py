"""Training interference: steps/s of a CPU MLP with and without a checkpoint every K steps.

The MLP is sized (by its batch) for about 50 ms per step on this machine. Each method saves the
model and its Adam state every K steps; before starting a save it waits for its own previous
one (what a trainer must do to bound memory; asyncckpt does it inside ``save()``). Rounds
interleave the methods, each round starting with a run without checkpoints, and the slowdown of
a method is taken against the baseline of its own round.

On a shared VM the baseline itself drifts between runs (by 10% and more over a few seconds), so
each run also gives an in-run figure: every iteration (a step, and the save started after it) is
timed, and the iterations during which no save was started or in flight are the run's own
baseline. The in-run slowdown is the run's time against its step count at that baseline's mean
step: it holds the save's whole cost (stall, and every step slowed while the writer ran) and
none of the drift between runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .saving import SaveMethod
from .state import BenchState

WIDTH = 1024
DEPTH = 8


@dataclass
class Trainer:
    model: torch.nn.Module
    optimizer: torch.optim.Adam
    inputs: torch.Tensor
    targets: torch.Tensor

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(self.model(self.inputs), self.targets)
        loss.backward()
        self.optimizer.step()

    def state(self) -> BenchState:
        tensors = [*self.model.state_dict().values()]
        for per_param in self.optimizer.state_dict()["state"].values():
            tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        return BenchState(self.model, self.optimizer, nbytes, len(tensors))  # type: ignore[arg-type]


def make_trainer(batch: int, *, width: int = WIDTH, depth: int = DEPTH, seed: int = 0) -> Trainer:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(width, width))
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    trainer = Trainer(model, optimizer, torch.randn(batch, width), torch.randn(batch, width))
    trainer.step()  # Adam's state exists from here on
    return trainer


def calibrate(target_s: float, *, width: int = WIDTH, depth: int = DEPTH) -> tuple[int, float]:
    """A batch size whose step takes about ``target_s``; returns (batch, measured step seconds)."""
    batch = 64
    for _ in range(4):
        trainer = make_trainer(batch, width=width, depth=depth)
        step_s = time_steps(trainer, 5) / 5
        batch = max(1, min(8192, round(batch * target_s / step_s)))
    trainer = make_trainer(batch, width=width, depth=depth)
    return batch, time_steps(trainer, 5) / 5


def time_steps(trainer: Trainer, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    return time.perf_counter() - started


@dataclass
class InterferenceRun:
    seconds: float
    steps: int
    saves: int
    stall_s: list[float]
    writer_ms: list[float]  # asyncckpt: each save's writer time, first write to commit
    clean_step_s: float  # mean time of the iterations with no save started or in flight
    clean_steps: int

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds

    @property
    def in_run_slowdown_pct(self) -> float | None:
        """The run's time against ``steps`` iterations at its own clean mean, in percent; None
        when fewer than a quarter of the iterations were clean (a save that cannot say it is done
        is in flight until it is waited for)."""
        if self.clean_steps < self.steps / 4:
            return None
        return 100.0 * (self.seconds / (self.steps * self.clean_step_s) - 1.0)


def train(trainer: Trainer, steps: int, every: int, method: SaveMethod | None) -> InterferenceRun:
    """Run ``steps`` steps, saving at steps every/2, every/2 + every, … (so that each save's
    background work falls inside the timed window); the last save is waited for afterwards,
    outside the window."""
    stalls: list[float] = []
    writer_ms: list[float] = []
    clean: list[float] = []
    pending = None
    started = time.perf_counter()
    for step in range(1, steps + 1):
        began = time.perf_counter()
        busy = pending is not None and not pending.done()
        trainer.step()
        if method is not None and step % every == every // 2:
            saving = time.perf_counter()
            if pending is not None:
                pending.wait()
                writer_ms += _writer_ms(method)
            pending = method.begin(step)
            stalls.append(time.perf_counter() - saving)
            busy = True
        elif pending is not None and not pending.done():
            busy = True
        if not busy:
            clean.append(time.perf_counter() - began)
    elapsed = time.perf_counter() - started
    if pending is not None and method is not None:
        pending.wait()
        writer_ms += _writer_ms(method)
    clean_mean = sum(clean) / len(clean) if clean else elapsed / steps
    return InterferenceRun(elapsed, steps, len(stalls), stalls, writer_ms, clean_mean, len(clean))


def _writer_ms(method: SaveMethod) -> list[float]:
    """The last save's writer time (first write to commit), where the method reports one."""
    value = method.extra().get("writer_total_ms")
    return [] if value is None else [float(value)]


def cleanup(methods: list[SaveMethod]) -> None:
    for method in methods:
        method.cleanup()


def method_dirs(root: Path) -> Path:
    path = root / "interference"
    path.mkdir(parents=True, exist_ok=True)
    return path
