"""Preemption: SIGTERM during a write with ``handle_sigterm=True`` commits what is pending first.

Each case runs a trainer in a subprocess on slow storage, sends SIGTERM once its first write has
started, and checks what the directory holds after it exited. (tests/test_sigterm.py has the
basic case; these add several pending saves, a save() blocked waiting for a slot, a chained
handler of the user's, and a save that fails while the process is being preempted.) Then SIGTERM
at random instants of a trainer saving in a tight loop: the process always exits by the signal,
promptly, and leaves the newest committed checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from crash_child import stepped_state
from trainers import Zygote, check_after_kill, restart_removes_temp_files

import asyncckpt
from asyncckpt.testing import deterministic_state, states_equal, temp_files

TRAINER = textwrap.dedent(
    """
    import errno, os, signal, sys, time
    from pathlib import Path
    from asyncckpt import AsyncCheckpointer
    from asyncckpt.storage import FileOps
    from asyncckpt.testing import deterministic_state

    case, directory, sent = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

    class SlowDisk(FileOps):
        # The first write stalls until the checkpointer has logged the SIGTERM: the signal lands
        # mid-write whatever the machine's speed (a write of this state is one or two calls).
        # A save() waiting for a slot delays that log until the slot is free, which this stalled
        # write holds: there it stalls until the test has sent the signal (it then creates `sent`).
        announced = False
        fsyncs = 0
        def stalled(self, log):
            if case == "blocked":
                return not sent.exists()
            return b'"checkpoint.sigterm"' not in log.read_bytes()
        def write(self, fd, data):
            if not self.announced:
                self.announced = True
                os.write(1, b"writing\\n")
                log, deadline = directory / "events.jsonl", time.monotonic() + 60
                while self.stalled(log) and time.monotonic() < deadline:
                    time.sleep(0.001)  # sleep-ok: a stalled disk, polled by the child itself
            return super().write(fd, data)
        def fsync(self, fd):
            self.fsyncs += 1
            if case == "failing" and self.fsyncs == 2:
                raise OSError(errno.EIO, "injected EIO")
            super().fsync(fd)

    def state(step):
        return deterministic_state(step, tensors=16, numel=16384)

    if case == "chained":
        def users_handler(signum, frame):
            os.write(1, b"user handler\\n")
            sys.exit(0)
        signal.signal(signal.SIGTERM, users_handler)

    options = dict(handle_sigterm=True, max_pending=2, keep_last=10, ops=SlowDisk())
    with AsyncCheckpointer(directory, **options) as ckpt:
        ckpt.save(1, state(1))
        ckpt.save(2, state(2))
        os.write(1, b"saved\\n")
        if case == "blocked":
            ckpt.save(3, state(3))  # both slots busy: waits here when SIGTERM arrives
        signal.pause()
    os.write(1, b"not reached\\n")
    """
)


def state(step: int) -> dict[str, object]:
    return deterministic_state(step, tensors=16, numel=16384)


def preempt(directory: Path, case: str) -> tuple[int, str]:
    sent = directory.with_name(directory.name + ".sent")
    child = subprocess.Popen(
        [sys.executable, "-c", TRAINER, case, str(directory), str(sent)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    # Both saves returned and the first write began (in either order): SIGTERM lands mid-write.
    assert {child.stdout.readline().strip(), child.stdout.readline().strip()} == {"writing", "saved"}
    child.send_signal(signal.SIGTERM)
    sent.touch()  # the stalled write goes on (TRAINER's SlowDisk)
    rest = child.stdout.read()
    return child.wait(timeout=120), rest


def events(directory: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (directory / "events.jsonl").read_text().splitlines()]


def assert_committed_exactly(directory: Path, steps: list[int]) -> None:
    assert [c.step for c in asyncckpt.list_checkpoints(directory)] == steps
    for info in asyncckpt.list_checkpoints(directory):
        assert states_equal(asyncckpt.load(info.path).state, state(info.step))
    assert temp_files(directory) == []


def test_sigterm_commits_every_pending_save_before_exit(tmp_path: Path, faults: Counter[str]) -> None:
    code, rest = preempt(tmp_path, "pending")
    faults["preemption: SIGTERM during a write"] += 1
    assert code == -signal.SIGTERM and "not reached" not in rest
    assert_committed_exactly(tmp_path, [1, 2])
    names = [e["event"] for e in events(tmp_path)]
    assert names.index("checkpoint.sigterm") < names.index("checkpoint.save.committed")
    sigterm = next(e for e in events(tmp_path) if e["event"] == "checkpoint.sigterm")
    assert sigterm["pending"] == 2


def test_sigterm_while_save_waits_for_a_slot(tmp_path: Path, faults: Counter[str]) -> None:
    code, rest = preempt(tmp_path, "blocked")
    faults["preemption: SIGTERM during a write"] += 1
    assert code == -signal.SIGTERM and "not reached" not in rest
    # Steps 1 and 2 were pending. save(3) is committed too when the signal found it waiting for
    # a slot; when the signal came just before the call, step 3 may be cut short by the exit.
    steps = [c.step for c in asyncckpt.list_checkpoints(tmp_path)]
    assert steps[:2] == [1, 2] and set(steps) <= {1, 2, 3}
    for info in asyncckpt.list_checkpoints(tmp_path):
        assert states_equal(asyncckpt.load(info.path).state, state(info.step))


def test_sigterm_then_runs_the_users_own_handler(tmp_path: Path, faults: Counter[str]) -> None:
    code, rest = preempt(tmp_path, "chained")
    faults["preemption: SIGTERM during a write"] += 1
    assert code == 0 and "user handler" in rest and "not reached" not in rest
    assert_committed_exactly(tmp_path, [1, 2])


def test_a_save_failing_during_preemption_is_logged_and_the_rest_committed(
    tmp_path: Path, faults: Counter[str]
) -> None:
    code, _ = preempt(tmp_path, "failing")
    faults["preemption: SIGTERM during a write"] += 1
    faults["preemption: fsync EIO while preempted"] += 1
    assert code == -signal.SIGTERM
    assert_committed_exactly(tmp_path, [1])
    failed = [e for e in events(tmp_path) if e["event"] == "checkpoint.save.failed"]
    assert [e["step"] for e in failed] == [2]


# --------------------------------------------------------------------------- at random instants


def saved_at(step: int) -> dict[str, object]:
    """What a crash_child.py ``sigterm`` trainer saves at ``step``."""
    return deterministic_state(step % 8, numel=64)


def stepped_at(step: int) -> dict[str, object]:
    """What a crash_child.py ``sigterm-stepped`` trainer saves at ``step``."""
    return stepped_state(step, 64)


def sigterm_many(
    zygote: Zygote, root: Path, count: int, faults: Counter[str], seed: int, trainer: str = "sigterm"
) -> None:
    """SIGTERM trainers that save in a tight loop (the signal lands anywhere, also inside save()),
    after a random number of committed saves; each must exit by the signal, promptly."""
    expected = stepped_at if trainer == "sigterm-stepped" else saved_at
    rng = random.Random(seed)
    directory = root / "run"
    directory.mkdir()
    resumed: int | None = None
    for number in range(count):
        first = 0 if resumed is None else resumed + 1
        zygote.send(f"spawn {trainer} {directory} {first} 64")
        pid: int | None = None
        committed: list[int] = []
        lines_before_signal = 1 + rng.randrange(0, 6)  # "started", then some "committed"
        seen = 0
        while pid is None or seen < lines_before_signal:
            kind, _, value = zygote.line().partition(" ")
            if kind == "pid":
                pid = int(value)
            elif kind in ("started", "committed"):
                seen += 1
                committed += [int(value)] if kind == "committed" else []
        time.sleep(rng.random() * 0.02)  # sleep-ok: a random kill instant is the point of the test
        os.kill(pid, signal.SIGTERM)
        status = zygote.reap(pid, committed.append)  # fails if the trainer hangs
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, (number, status)
        newest = max(committed, default=None)
        resumed = check_after_kill(directory, expected, newest, first) or resumed
        loop = "save and optimizer-step loop (overlapped staging)" if trainer != "sigterm" else "save loop"
        faults[f"preemption: SIGTERM at a random instant of a tight {loop}"] += 1
        left = restart_removes_temp_files(directory)
        faults["preemption: temp files left by saves begun after the signal"] += left


def test_sigterm_at_random_instants_never_hangs(zygote: Zygote, tmp_path: Path, faults: Counter[str]) -> None:
    sigterm_many(zygote, tmp_path, 20, faults, seed=7)


def test_sigterm_at_random_instants_while_staging_overlaps(
    zygote: Zygote, tmp_path: Path, faults: Counter[str]
) -> None:
    sigterm_many(zygote, tmp_path, 12, faults, seed=9, trainer="sigterm-stepped")


@pytest.mark.stress
def test_sigterm_stress_while_staging_overlaps(zygote: Zygote, tmp_path: Path, faults: Counter[str]) -> None:
    sigterm_many(zygote, tmp_path, 200, faults, seed=10, trainer="sigterm-stepped")


@pytest.mark.stress
def test_sigterm_at_random_instants_stress(zygote: Zygote, tmp_path: Path, faults: Counter[str]) -> None:
    sigterm_many(zygote, tmp_path, 300, faults, seed=8)
