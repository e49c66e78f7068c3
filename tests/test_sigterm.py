"""handle_sigterm=True: a SIGTERM during a write commits the pending checkpoint, then exits."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import asyncckpt
from asyncckpt.testing import deterministic_state, states_equal

CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from asyncckpt import AsyncCheckpointer
    from asyncckpt.storage import FileOps
    from asyncckpt.testing import deterministic_state

    class SlowDisk(FileOps):
        announced = False
        def write(self, fd, data):
            if not self.announced:
                self.announced = True
                print("writing", flush=True)
            time.sleep(0.005)  # sleep-ok: simulates slow storage, nothing waits on it
            return super().write(fd, data)

    with AsyncCheckpointer(Path(sys.argv[1]), handle_sigterm=True, ops=SlowDisk()) as ckpt:
        ckpt.save(5, deterministic_state(5, tensors=64, numel=65536))
        signal.pause()
    print("not reached", flush=True)
    """
)


def test_sigterm_during_write_commits_before_exit(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGTERM)
    rest = child.stdout.read()
    assert child.wait(timeout=60) == -signal.SIGTERM
    assert "not reached" not in rest
    [info] = asyncckpt.list_checkpoints(tmp_path)
    loaded = asyncckpt.load(info.path)
    assert loaded.step == 5
    assert states_equal(loaded.state, deterministic_state(5, tensors=64, numel=65536))
    events = (tmp_path / "events.jsonl").read_text()
    assert "checkpoint.sigterm" in events
    assert events.index("checkpoint.sigterm") < events.index("checkpoint.save.committed")
