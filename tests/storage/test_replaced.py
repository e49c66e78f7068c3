"""A commit over an existing file: the old file keeps a hidden temp name through the rename (so
the rename does not pay for freeing its blocks) and is deleted afterwards, by drop_replaced
(the checkpointer: after the handle resolves; the one-shot save: on a thread of its own).
Refused hard links fall back to the plain rename; clean-up removes a dead writer's hidden file;
no listing shows one."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import asyncckpt
import asyncckpt.oneshot
from asyncckpt import AsyncCheckpointer
from asyncckpt.catalog import committed
from asyncckpt.errors import CheckpointWriteError
from asyncckpt.saving.handles import SaveHandle
from asyncckpt.storage import FileOps, PosixStorage, is_temp_name
from asyncckpt.storage.temps import is_replaced_name, writer_id
from asyncckpt.testing import FaultyOps, PowerLossOps, RecordingOps, deterministic_state, temp_files

OLD, NEW = b"old bytes " * 1000, b"new bytes " * 2000
CHILD = Path(__file__).with_name("overwrite_child.py")


def body_of(data: bytes) -> Callable[..., int]:
    def body(sink: object) -> int:
        sink.write(data)  # type: ignore[attr-defined]
        return len(data)

    return body


def _exited_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def hidden(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


def test_a_commit_over_a_file_keeps_it_aside_until_drop_replaced(tmp_dir: Path) -> None:
    storage = PosixStorage(tmp_dir, ops=(ops := RecordingOps()))
    storage.commit(storage.write("a.ckpt", body_of(OLD)))
    before = os.stat(tmp_dir / "a.ckpt").st_ino
    written = storage.write("a.ckpt", body_of(NEW))
    del ops.calls[:]

    storage.commit(written)

    assert ops.names() == ["link", "rename", "fsync_dir"]  # no unlink inside the commit
    [kept] = hidden(tmp_dir)
    assert is_temp_name(kept) and is_replaced_name(kept) and kept.startswith(".a.ckpt.")
    assert os.stat(tmp_dir / kept).st_ino == before and (tmp_dir / "a.ckpt").read_bytes() == NEW
    assert storage.has_replaced and [o.name for o in storage.ls()] == ["a.ckpt"]
    assert storage.unfinished() == [] and storage.leftovers() == []  # not a write, not abandoned

    storage.drop_replaced()

    assert ops.names()[-1] == "unlink" and os.listdir(tmp_dir) == ["a.ckpt"]
    assert not storage.has_replaced


def test_a_commit_of_a_new_name_links_nothing(tmp_dir: Path) -> None:
    storage = PosixStorage(tmp_dir, ops=(ops := RecordingOps()))

    storage.commit(storage.write("a.ckpt", body_of(NEW)))

    assert "link" not in ops.names() and not storage.has_replaced
    assert os.listdir(tmp_dir) == ["a.ckpt"]


REFUSALS = [errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.EMLINK]


@pytest.mark.parametrize("err", REFUSALS, ids=[errno.errorcode[e] for e in REFUSALS])
def test_refused_hard_links_fall_back_to_the_plain_rename(tmp_dir: Path, err: int) -> None:
    (tmp_dir / "a.ckpt").write_bytes(OLD)
    storage = PosixStorage(tmp_dir, ops=(ops := FaultyOps("link", err=err)))

    storage.commit(storage.write("a.ckpt", body_of(NEW)))

    assert ops.failures == 1 and ops.names()[-3:] == ["link", "rename", "fsync_dir"]
    assert (tmp_dir / "a.ckpt").read_bytes() == NEW and os.listdir(tmp_dir) == ["a.ckpt"]
    assert not storage.has_replaced


def test_a_failed_rename_removes_the_hidden_name_and_keeps_the_old_file(tmp_dir: Path) -> None:
    (tmp_dir / "a.ckpt").write_bytes(OLD)
    storage = PosixStorage(tmp_dir, ops=FaultyOps("rename"))
    written = storage.write("a.ckpt", body_of(NEW))

    with pytest.raises(CheckpointWriteError):
        storage.commit(written)

    assert (tmp_dir / "a.ckpt").read_bytes() == OLD and os.listdir(tmp_dir) == ["a.ckpt"]
    assert not storage.has_replaced


def test_a_dead_writers_hidden_file_is_a_leftover_no_listing_shows(tmp_dir: Path) -> None:
    asyncckpt.save(tmp_dir / "step-0000000001.ckpt", deterministic_state(1), step=1)
    dead = _exited_pid()
    host = writer_id().rpartition("-")[0]
    kept = f".step-0000000001.ckpt.replaced.tmp-{host}-{dead}-ab12"  # its writer is gone
    os.link(tmp_dir / "step-0000000001.ckpt", tmp_dir / kept)
    storage = PosixStorage(tmp_dir)

    assert [o.name for o in storage.ls()] == ["step-0000000001.ckpt"]
    assert [c.step for c in committed(storage)] == [1] and storage.unfinished() == []
    assert storage.leftovers() == [kept] and temp_files(tmp_dir) == [tmp_dir / kept]

    with AsyncCheckpointer(tmp_dir, keep_last=None) as ckpt:  # its first save cleans up
        ckpt.save(2, deterministic_state(2)).result()

    assert hidden(tmp_dir) == [] and [o.name for o in storage.ls() if o.name.endswith(".ckpt")] == [
        "step-0000000001.ckpt",
        "step-0000000002.ckpt",
    ]


class LinkGate(RecordingOps):
    """Holds the commit's link until ``release`` (so the test holds the handle first); records,
    for each unlink of a hidden old file, whether the save's handle had resolved then."""

    def __init__(self) -> None:
        super().__init__()
        self.handle: SaveHandle | None = None
        self.gate = threading.Event()
        self.resolved_at_unlink: list[bool] = []

    def link(self, src: Path, dst: Path) -> None:
        self.gate.wait()
        super().link(src, dst)

    def unlink(self, path: Path) -> None:
        if is_replaced_name(path.name):
            self.resolved_at_unlink.append(self.handle is not None and self.handle.done())
        super().unlink(path)


def test_the_checkpointer_deletes_the_replaced_file_after_the_handle_resolves(tmp_dir: Path) -> None:
    ops = LinkGate()
    with AsyncCheckpointer(tmp_dir, keep_last=None, ops=ops) as ckpt:
        ckpt.save(1, deterministic_state(1), name="last.ckpt").result()
        ops.handle = ckpt.save(2, deterministic_state(2), name="last.ckpt")
        ops.gate.set()
        assert ops.handle.result() == tmp_dir / "last.ckpt"
        ckpt.flush()  # waits for what follows the commit: retention, the replaced file

        assert ops.resolved_at_unlink == [True]
        assert hidden(tmp_dir) == [] and "last.ckpt" in os.listdir(tmp_dir)
    assert asyncckpt.load(tmp_dir / "last.ckpt").step == 2


def test_the_one_shot_save_deletes_the_replaced_file_on_another_thread(tmp_dir: Path) -> None:
    class Threads(RecordingOps):
        def unlink(self, path: Path) -> None:
            self.record("unlink-thread", threading.current_thread().name)
            super().unlink(path)

    path = asyncckpt.save(tmp_dir / "model.ckpt", {"v": 1}, step=1)
    ops = Threads()

    asyncckpt.save(path, {"v": 2}, step=2, ops=ops)
    asyncckpt.oneshot.wait_replaced_dropped()

    assert [t for name, t in ops.calls if name == "unlink-thread"] == ["asyncckpt-drop-replaced"]
    assert ops.names()[-6:] == ["close", "link", "rename", "fsync_dir", "unlink-thread", "unlink"]
    assert os.listdir(tmp_dir) == ["model.ckpt"] and asyncckpt.load(path).state == {"v": 2}


def test_a_power_loss_at_any_point_of_an_overwrite_leaves_the_old_or_the_new_file(tmp_dir: Path) -> None:
    old = asyncckpt.save(tmp_dir / "model.ckpt", {"v": 1}, step=1).read_bytes()
    ops = PowerLossOps(tmp_dir)

    asyncckpt.save(tmp_dir / "model.ckpt", {"v": 2}, step=2, ops=ops)
    asyncckpt.oneshot.wait_replaced_dropped()

    new = (tmp_dir / "model.ckpt").read_bytes()
    kinds = {call.kind for call in ops.calls}
    assert {"link", "rename", "fsync_dir", "unlink"} <= kinds
    for point in range(ops.points):
        for state in ops.crash_states(point):
            visible = {n: d for n, d in state.files.items() if not is_temp_name(n)}
            assert visible in ({"model.ckpt": old}, {"model.ckpt": new}), (point, state.variant)


# kill -9 before the first call of each op (or after the save, "none"): the step the target holds
KILLS = [
    ("open_exclusive", 1),
    ("fsync", 1),
    ("link", 1),
    ("rename", 1),
    ("fsync_dir", 2),
    ("unlink", 2),
    ("none", 2),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("op", "expected"), KILLS)
def test_a_kill_at_any_step_of_an_overwrite_leaves_the_old_or_the_new_file(
    tmp_dir: Path, op: str, expected: int
) -> None:
    target = tmp_dir / "model.ckpt"
    asyncckpt.save(target, deterministic_state(1), step=1)

    done = subprocess.run(
        [sys.executable, str(CHILD), str(target), op], capture_output=True, text=True, timeout=100
    )

    killed = op != "none"
    assert done.returncode == (-9 if killed else 0), done.stderr
    assert asyncckpt.load(target).step == expected  # complete, every checksum
    storage = PosixStorage(tmp_dir)
    assert [o.name for o in storage.ls()] == ["model.ckpt"]
    left = sorted(os.listdir(tmp_dir))
    assert storage.leftovers() == [n for n in left if n != "model.ckpt"]  # the writer is gone
    assert (left == ["model.ckpt"]) == (op in ("open_exclusive", "none"))
    storage.remove_leftovers(storage.leftovers())
    assert os.listdir(tmp_dir) == ["model.ckpt"] and asyncckpt.load(target).step == expected


AT_EXIT_OVER = """
import atexit, sys
import torch
import asyncckpt

path = sys.argv[1]
asyncckpt.save(path, {"w": torch.zeros(1000)}, step=1)

def save() -> None:  # at exit no new thread may start: the replaced file is deleted here
    asyncckpt.save(path, {"w": torch.ones(1000)}, step=2)
    print("saved", flush=True)

atexit.register(save)
"""


def test_a_save_over_a_file_from_an_atexit_hook_succeeds_and_leaves_no_hidden_file(tmp_path: Path) -> None:
    script = tmp_path / "at_exit.py"
    script.write_text(AT_EXIT_OVER)
    target = tmp_path / "run" / "last.ckpt"
    target.parent.mkdir()
    done = subprocess.run(
        [sys.executable, str(script), str(target)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "saved" in done.stdout and "Traceback" not in done.stderr
    assert asyncckpt.load(target).step == 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_when_no_thread_may_start_the_replaced_file_is_deleted_before_save_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python 3.12+ refuses new threads while the interpreter shuts down (a save from an atexit
    # hook): the save has committed by then and must not fail for its clean-up.
    target = tmp_path / "last.ckpt"
    asyncckpt.save(target, {"w": torch.zeros(10)}, step=1)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    asyncckpt.save(target, {"w": torch.ones(10)}, step=2)
    assert asyncckpt.load(target).step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_platform_without_linkat_falls_back_to_the_plain_rename(tmp_path: Path) -> None:
    class NoLinkat(FileOps):
        def link(self, src: Path, dst: Path) -> None:
            raise NotImplementedError("link: follow_symlinks unavailable on this platform")

    storage = PosixStorage(tmp_path, ops=NoLinkat())
    for step in (1, 2):
        storage.commit(storage.write("x.bin", lambda sink, s=step: (sink.write(bytes([s]) * 10), 10)[1]))
    assert (tmp_path / "x.bin").read_bytes() == bytes([2]) * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
