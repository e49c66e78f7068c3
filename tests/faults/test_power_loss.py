"""Power loss, simulated: replay a crash at every point of the recorded OS calls.

:class:`asyncckpt.testing.PowerLossOps` records every call the write path makes and rebuilds what
a power cut after each call may leave (file data only up to its last fsync, directory entries only
up to the last directory fsync, and the weaker in-between outcomes). In every one of those
directories every file under a final name must be complete and exact, and ``load_latest`` must
resume from the newest checkpoint whose save had been reported committed, or a newer one. This
checks the *order* of the protocol, which a kill -9 cannot: the mutants at the end show that a
missing file or directory fsync is caught.
"""

from __future__ import annotations

import errno
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import asyncckpt
from asyncckpt import AsyncCheckpointer, CheckpointWriteError
from asyncckpt.catalog import checkpoint_name, parse_checkpoint_name
from asyncckpt.errors import NoValidCheckpointError
from asyncckpt.loading import load_latest
from asyncckpt.storage import FileOps
from asyncckpt.testing import CrashState, FaultyOps, PowerLossOps, deterministic_state, states_equal


def small_state(step: int, version: int = 0) -> dict[str, Any]:
    state = deterministic_state(step * 10 + version, tensors=2, numel=300)
    state["extra"]["step"] = step
    return state


def quiet(*_: object, **__: object) -> None:
    """A ``log`` for load_latest that drops the summary."""


@dataclass
class History:
    """What was saved, in order, and where in the call sequence each save was reported committed."""

    ops: PowerLossOps
    saves: list[tuple[int, Any]] = field(default_factory=list)  # (step, state) per save
    initial: dict[int, Any] = field(default_factory=dict)  # step -> state already on disk

    def watch(self, handle: asyncckpt.SaveHandle, state: Any) -> None:
        """Mark the point where ``handle`` reports committed (its future settles in the writer)."""
        index = len(self.saves)
        self.saves.append((handle.step, state))
        future = handle._future
        assert future is not None

        def settled(done: Any) -> None:
            if done.exception() is None:
                self.ops.mark(f"committed {index}")

        future.add_done_callback(settled)

    def committed_before(self, point: int) -> list[int]:
        """Indexes of the saves reported committed before ``point``."""
        found = []
        for index in range(len(self.saves)):
            at = self.ops.point_of(f"committed {index}")
            if at is not None and at < point:
                found.append(index)
        return found

    def check(self, state: CrashState, directory: Path) -> list[str]:
        """What is wrong with the directory ``state`` left; empty when the promise holds."""
        committed = self.committed_before(state.point)
        problems = []
        for name in state.files:
            step = parse_checkpoint_name(name)
            if step is None:
                continue
            accepted = self._accepted(step, committed)
            try:
                loaded = asyncckpt.load(directory / name).state
            except asyncckpt.CheckpointError as exc:
                problems.append(f"{name} is torn: {exc}")
                continue
            if not any(states_equal(loaded, want) for want in accepted):
                problems.append(f"{name} holds content that is not the newest committed or a later save")
        newest = max((self.saves[i][0] for i in committed), default=max(self.initial, default=None))
        try:
            result = load_latest(directory, log=quiet)
        except NoValidCheckpointError as exc:
            if newest is not None:
                problems.append(f"nothing to resume from, step {newest} was committed: {exc}")
            return problems
        if newest is not None and result.step < newest:
            problems.append(f"resumed from step {result.step}, step {newest} was committed")
        if result.diagnostics:
            problems.append(f"the loader had to fall back: {result.summary}")
        return problems

    def _accepted(self, step: int, committed: list[int]) -> list[Any]:
        """The contents a file of ``step`` may hold: the newest committed save of it, or later ones."""
        indexes = [i for i, (s, _) in enumerate(self.saves) if s == step]
        done = [i for i in indexes if i in committed]
        if done:
            return [self.saves[i][1] for i in indexes if i >= done[-1]]
        return [self.saves[i][1] for i in indexes] + ([self.initial[step]] if step in self.initial else [])


def replay_every_crash(history: History, scratch: Path, faults: Counter[str]) -> list[str]:
    """Check every directory a power cut at any point may leave; return the problems found."""
    problems = []
    for point in range(history.ops.points):
        for number, state in enumerate(history.ops.crash_states(point)):
            directory = state.materialize(scratch / f"crash-{point}-{number}")
            problems += [f"point {point} ({state.variant}): {p}" for p in history.check(state, directory)]
            shutil.rmtree(directory)
            faults["power loss: crash states replayed"] += 1
        faults["power loss: crash points"] += 1
    return problems


def run_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    directory.mkdir()
    return directory


def test_every_crash_point_leaves_the_old_or_the_new_checkpoint(tmp_path: Path, faults: Counter[str]) -> None:
    directory = run_dir(tmp_path)
    asyncckpt.save(directory / checkpoint_name(0), small_state(0), step=0)  # from an earlier run
    (directory / f".{checkpoint_name(9)}.tmp-0badf00d").write_bytes(b"torn by an earlier crash")
    history = History(PowerLossOps(directory), initial={0: small_state(0)})
    with AsyncCheckpointer(directory, keep_last=2, max_pending=2, ops=history.ops) as ckpt:
        for step in range(1, 6):
            state = small_state(step)
            history.watch(ckpt.save(step, state), state)
    assert [c.step for c in asyncckpt.list_checkpoints(directory)] == [4, 5]
    assert history.ops.points > 60
    assert replay_every_crash(history, tmp_path / "scratch", faults) == []


def test_overwriting_a_step_leaves_one_whole_version(tmp_path: Path, faults: Counter[str]) -> None:
    directory = run_dir(tmp_path)
    history = History(PowerLossOps(directory))
    with AsyncCheckpointer(directory, ops=history.ops) as ckpt:
        for version in range(3):
            state = small_state(7, version)
            history.watch(ckpt.save(7, state), state)
            ckpt.flush()
    assert replay_every_crash(history, tmp_path / "scratch", faults) == []


def test_the_synchronous_save_is_crash_safe_too(tmp_path: Path, faults: Counter[str]) -> None:
    directory = run_dir(tmp_path)
    history = History(PowerLossOps(directory))
    for step in (1, 2, 2):
        state = small_state(step, len(history.saves))
        history.saves.append((step, state))
        asyncckpt.save(directory / checkpoint_name(step), state, step=step, ops=history.ops)
        history.ops.mark(f"committed {len(history.saves) - 1}")
    assert replay_every_crash(history, tmp_path / "scratch", faults) == []


@pytest.mark.parametrize("op", ["write", "fsync", "rename", "fsync_dir"])
def test_a_failed_save_never_leaves_unknown_content_under_a_final_name(
    tmp_path: Path, op: str, faults: Counter[str]
) -> None:
    directory = run_dir(tmp_path)
    faulty = FaultyOps(op, err=errno.EIO, nth=2 if op in ("write", "fsync_dir") else 1)
    history = History(PowerLossOps(directory, inner=faulty))
    with AsyncCheckpointer(directory, keep_last=2, ops=history.ops) as ckpt:
        for step in (1, 2, 3):
            state = small_state(step)
            handle = ckpt.save(step, state)
            history.watch(handle, state)
            try:
                handle.result(timeout=30)
            except CheckpointWriteError:
                faults[f"power loss: {op} failed (EIO) during the replayed run"] += 1
    assert faulty.failures == 1
    assert replay_every_crash(history, tmp_path / "scratch", faults) == []


class RandomFaults(FileOps):
    """Real OS calls, each failing with EIO with probability ``p`` (seeded)."""

    def __init__(self, p: float, seed: int) -> None:
        self.p = p
        self.rng = random.Random(seed)
        self.failures: Counter[str] = Counter()

    def maybe_fail(self, name: str) -> None:
        if self.rng.random() < self.p:
            self.failures[name] += 1
            raise OSError(errno.EIO, f"injected Input/output error in {name}")

    def open_exclusive(self, path: Path) -> int:
        self.maybe_fail("open_exclusive")
        return super().open_exclusive(path)

    def write(self, fd: int, data: memoryview | bytes) -> int:
        self.maybe_fail("write")
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self.maybe_fail("fsync")
        super().fsync(fd)

    def rename(self, src: Path, dst: Path) -> None:
        self.maybe_fail("rename")
        super().rename(src, dst)

    def unlink(self, path: Path) -> None:
        self.maybe_fail("unlink")
        super().unlink(path)

    def fsync_dir(self, directory: Path) -> None:
        self.maybe_fail("fsync_dir")
        super().fsync_dir(directory)


def random_faults_then_power_loss(tmp_path: Path, seed: int, faults: Counter[str]) -> None:
    directory = run_dir(tmp_path)
    flaky = RandomFaults(0.05, seed)
    history = History(PowerLossOps(directory, inner=flaky))
    succeeded = 0
    with AsyncCheckpointer(directory, keep_last=2, ops=history.ops) as ckpt:
        for step in range(1, 9):
            state = small_state(step)
            handle = ckpt.save(step, state)
            history.watch(handle, state)
            try:
                handle.result(timeout=30)
                succeeded += 1
            except CheckpointWriteError:
                pass
        assert ckpt.stats().committed == succeeded
    for name, count in flaky.failures.items():
        faults[f"power loss: random EIO in {name} during the replayed run"] += count
    assert replay_every_crash(history, tmp_path / "scratch", faults) == []


@pytest.mark.parametrize("seed", range(4))
def test_random_faults_then_power_loss_at_every_point(
    tmp_path: Path, seed: int, faults: Counter[str]
) -> None:
    random_faults_then_power_loss(tmp_path, seed, faults)


@pytest.mark.stress
@pytest.mark.parametrize("seed", range(4, 64))
def test_random_faults_then_power_loss_stress(tmp_path: Path, seed: int, faults: Counter[str]) -> None:
    random_faults_then_power_loss(tmp_path, seed, faults)


# --------------------------------------------------------------------------- the model itself


def test_the_model_keeps_data_to_the_last_fsync_and_entries_to_the_last_directory_fsync(
    tmp_path: Path,
) -> None:
    ops = PowerLossOps(tmp_path)
    fd = ops.open_exclusive(tmp_path / "a")
    ops.write(fd, b"synced")
    ops.fsync(fd)
    ops.write(fd, b"+lost")
    ops.close(fd)
    ops.fsync_dir(tmp_path)
    ops.rename(tmp_path / "a", tmp_path / "b")
    strict = ops.crash_states(ops.points - 1)[0]
    assert strict.variant == "dir-synced+data-synced"
    assert strict.files == {"a": b"synced"}
    outcomes = {tuple(s.files.items()) for s in ops.crash_states(ops.points - 1)}
    assert (("b", b"synced+lost"),) in outcomes  # the rename and the data reached the disk
    assert (("a", b"synced\0\0\0\0\0"),) in outcomes  # the size did, the data did not
    assert ops.crash_states(0)[0].files == {}


def test_files_present_at_the_start_are_durable(tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(b"old")
    ops = PowerLossOps(tmp_path)
    ops.unlink(tmp_path / "old")
    assert [s.files for s in ops.crash_states(1)] == [{"old": b"old"}, {}]


class NoFileFsync(PowerLossOps):
    """A broken protocol: the file's fsync is skipped."""

    def fsync(self, fd: int) -> None:
        pass


class NoDirectoryFsync(PowerLossOps):
    """A broken protocol: the directory fsync after the rename is skipped."""

    def fsync_dir(self, directory: Path) -> None:
        pass


class RenameBeforeFsync(PowerLossOps):
    """A broken protocol: the file is published before its data is durable."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.last_fd = -1

    def open_exclusive(self, path: Path) -> int:
        self.last_fd = super().open_exclusive(path)
        self.tmp = path
        return self.last_fd

    def fsync(self, fd: int) -> None:
        final = self.tmp.parent / self.tmp.name.split(".tmp-")[0].lstrip(".")
        super().rename(self.tmp, final)
        super().fsync_dir(self.tmp.parent)
        super().fsync(fd)
        super().rename(final, self.tmp)  # put it back so the writer's own rename works


@pytest.mark.parametrize(
    ("mutant", "symptom"),
    [(NoFileFsync, "is torn"), (NoDirectoryFsync, "was committed"), (RenameBeforeFsync, "is torn")],
)
def test_the_replay_catches_a_broken_protocol(
    tmp_path: Path, mutant: type[PowerLossOps], symptom: str
) -> None:
    directory = run_dir(tmp_path)
    history = History(mutant(directory))
    with AsyncCheckpointer(directory, keep_last=2, ops=history.ops) as ckpt:
        for step in (1, 2, 3):
            state = small_state(step)
            history.watch(ckpt.save(step, state), state)
    problems = replay_every_crash(history, tmp_path / "scratch", Counter())
    assert problems, f"{mutant.__name__} went unnoticed"
    assert any(symptom in p for p in problems), problems[:3]


def test_power_loss_ops_refuses_other_directories(tmp_path: Path) -> None:
    ops = PowerLossOps(tmp_path)
    other = tmp_path / "sub"
    other.mkdir()
    with pytest.raises(ValueError, match="models"):
        ops.open_exclusive(other / "x")
    with pytest.raises(ValueError, match="models"):
        ops.fsync_dir(other)
    assert ops.points == 1 and not (other / "x").exists()
