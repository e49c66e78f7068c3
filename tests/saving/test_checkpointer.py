"""AsyncCheckpointer in sync use: staging reuse, error hand-back, flush on exit, busy policy."""

from __future__ import annotations

import errno
import json
import signal
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import asyncckpt
from asyncckpt import AsyncCheckpointer, CheckpointWriteError
from asyncckpt.errors import UnsupportedValueError, UsageError
from asyncckpt.testing import FaultyOps, GatedOps, deterministic_state, states_equal


def events(directory: Path) -> list[dict[str, object]]:
    lines = (directory / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def event_names(directory: Path) -> list[str]:
    return [str(e["event"]) for e in events(directory)]


def test_save_commits_one_file_per_step_and_loads_back(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path, keep_last=10) as ckpt:
        handles = [ckpt.save(step, deterministic_state(step)) for step in (10, 20, 30)]
        paths = [h.result(timeout=30) for h in handles]
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [10, 20, 30]
    assert paths == [c.path for c in asyncckpt.list_checkpoints(tmp_path)]
    for step, path in zip((10, 20, 30), paths, strict=True):
        assert path is not None
        loaded = asyncckpt.load(path)
        assert loaded.step == step
        assert states_equal(loaded.state, deterministic_state(step))


def test_save_returns_a_snapshot_later_mutation_does_not_leak(tmp_path: Path) -> None:
    state = {"w": torch.zeros(1000)}
    with AsyncCheckpointer(tmp_path) as ckpt:
        handle = ckpt.save(1, state)
        state["w"].add_(1.0)  # the copy happened inside save(): this must not reach the file
        path = handle.result(timeout=30)
    assert path is not None
    assert torch.equal(asyncckpt.load(path).state["w"], torch.zeros(1000))


def test_same_layout_reuses_staging_buffers(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path, max_pending=2) as ckpt:
        for step in range(8):
            ckpt.save(step, deterministic_state(step)).result(timeout=30)
        assert ckpt.stats().staging_allocations == 1
        ckpt.save(100, deterministic_state(100, numel=2048)).result(timeout=30)
        stats = ckpt.stats()
    assert stats.staging_allocations == 2
    assert stats.committed == 9


def test_saving_an_existing_step_replaces_it(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(5, {"v": torch.zeros(3)})
        ckpt.flush()
        ckpt.save(5, {"v": torch.ones(3)})
    [info] = asyncckpt.list_checkpoints(tmp_path)
    assert torch.equal(asyncckpt.load(info.path).state["v"], torch.ones(3))


def test_unstorable_value_raises_type_error_before_queueing(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match=r"state\['extra'\]\['fn'\]") as info:
            ckpt.save(1, {"extra": {"fn": print}})
        assert isinstance(info.value, UnsupportedValueError) and info.value.key == "state['extra']['fn']"
        assert ckpt.stats().saves == 0
    assert asyncckpt.list_checkpoints(tmp_path) == []


@pytest.mark.parametrize("mode", ["structure", "full", "none"])
def test_verify_modes_commit(tmp_path: Path, mode: str) -> None:
    with AsyncCheckpointer(tmp_path, verify=mode) as ckpt:  # type: ignore[arg-type]
        path = ckpt.save(1, deterministic_state(1)).result(timeout=30)
    assert path is not None and asyncckpt.load(path).step == 1


def test_background_failure_is_raised_at_next_save(tmp_path: Path) -> None:
    ops = FaultyOps("fsync", err=errno.EIO)
    with AsyncCheckpointer(tmp_path, ops=ops) as ckpt:
        handle = ckpt.save(1, deterministic_state(1))
        assert handle.wait(timeout=30)
        with pytest.raises(CheckpointWriteError, match="injected") as info:
            ckpt.save(2, deterministic_state(2))
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.step == 1
        ckpt.save(3, deterministic_state(3)).result(timeout=30)  # training goes on
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [3]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert "checkpoint.save.failed" in event_names(tmp_path)


def test_failure_seen_through_the_handle_is_not_raised_twice(tmp_path: Path) -> None:
    ops = FaultyOps("write", err=errno.ENOSPC)
    with AsyncCheckpointer(tmp_path, ops=ops) as ckpt:
        with pytest.raises(CheckpointWriteError, match="No space left"):
            ckpt.save(1, deterministic_state(1)).result(timeout=30)
        ckpt.save(2, deterministic_state(2)).result(timeout=30)
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [2]


def test_failure_is_raised_at_flush_and_at_exit(tmp_path: Path) -> None:
    ops = FaultyOps("rename")
    with AsyncCheckpointer(tmp_path, ops=ops) as ckpt:
        ckpt.save(1, deterministic_state(1))
        with pytest.raises(CheckpointWriteError):
            ckpt.flush()
    with pytest.raises(CheckpointWriteError), AsyncCheckpointer(tmp_path, ops=FaultyOps("rename")) as ckpt:
        ckpt.save(1, deterministic_state(1))


def test_exit_flushes_pending_saves_even_when_the_body_raises(tmp_path: Path) -> None:
    ops = GatedOps()
    with pytest.raises(KeyboardInterrupt), AsyncCheckpointer(tmp_path, ops=ops) as ckpt:
        handle = ckpt.save(7, deterministic_state(7))
        assert ops.entered.wait(30)
        assert not handle.done()
        ops.release()
        raise KeyboardInterrupt
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [7]


def test_exit_failure_does_not_hide_the_body_exception(tmp_path: Path) -> None:
    faulty = FaultyOps("fsync")
    with pytest.raises(ValueError, match="boom") as info, AsyncCheckpointer(tmp_path, ops=faulty) as ckpt:
        ckpt.save(1, deterministic_state(1))
        raise ValueError("boom")
    assert any("pending checkpoint failed" in note for note in info.value.__notes__)


def test_when_busy_skip_drops_the_save_and_says_so(tmp_path: Path) -> None:
    ops = GatedOps()
    with AsyncCheckpointer(tmp_path, when_busy="skip", ops=ops) as ckpt:
        first = ckpt.save(1, deterministic_state(1))
        assert ops.entered.wait(30)
        second = ckpt.save(2, deterministic_state(2))
        assert second.skipped and second.done() and second.result() is None
        ops.release()
        assert first.result(timeout=30) is not None
        assert ckpt.stats().skipped == 1
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [1]
    skipped = [e for e in events(tmp_path) if e["event"] == "checkpoint.save.skipped"]
    assert skipped and skipped[0]["step"] == 2


def test_when_busy_wait_blocks_until_a_slot_frees(tmp_path: Path) -> None:
    ops = GatedOps()
    with AsyncCheckpointer(tmp_path, when_busy="wait", ops=ops) as ckpt:
        ckpt.save(1, deterministic_state(1))
        assert ops.entered.wait(30)
        second: list[asyncckpt.SaveHandle] = []
        saver = threading.Thread(target=lambda: second.append(ckpt.save(2, deterministic_state(2))))
        saver.start()
        saver.join(0.05)
        assert saver.is_alive()  # still waiting for the only slot
        ops.release()
        saver.join(30)
        assert second[0].result(timeout=30) is not None
        assert ckpt.stats().waits == 1
    waited = [e for e in events(tmp_path) if e["event"] == "checkpoint.save.waited"]
    assert waited and waited[0]["step"] == 2 and float(waited[0]["wait_ms"]) > 0  # type: ignore[arg-type]


def test_flush_timeout_raises_and_saves_go_on(tmp_path: Path) -> None:
    ops = GatedOps()
    with AsyncCheckpointer(tmp_path, ops=ops) as ckpt:
        handle = ckpt.save(1, deterministic_state(1))
        with pytest.raises(TimeoutError, match="1 checkpoint saves still pending"):
            ckpt.flush(timeout=0.01)
        ops.release()
        ckpt.flush()
        assert handle.done()


def test_retention_keeps_last_and_every(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path, keep_last=2, keep_every=4) as ckpt:
        for step in range(1, 11):
            ckpt.save(step, {"s": torch.tensor(step)})
            ckpt.flush()
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [4, 8, 9, 10]
    pruned = [e["step"] for e in events(tmp_path) if e["event"] == "checkpoint.pruned"]
    assert pruned == [1, 2, 3, 5, 6, 7]


def test_retention_never_deletes_the_just_committed_checkpoint(tmp_path: Path) -> None:
    asyncckpt.save(tmp_path / "step-0000000500.ckpt", {"s": 500}, step=500)  # from an earlier run
    with AsyncCheckpointer(tmp_path, keep_last=1) as ckpt:
        ckpt.save(410, {"s": 410}).result(timeout=30)
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [410, 500]


def test_retention_does_not_follow_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / "precious.ckpt"
    precious.write_bytes(b"keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / "step-0000000001.ckpt").symlink_to(precious)
    with AsyncCheckpointer(run, keep_last=1) as ckpt:
        for step in (2, 3):
            ckpt.save(step, {"s": step}).result(timeout=30)
    assert precious.read_bytes() == b"keep me"
    assert (run / "step-0000000001.ckpt").is_symlink()


def test_leftover_temp_files_are_removed_at_the_first_save(tmp_path: Path) -> None:
    leftover = tmp_path / ".step-0000000001.ckpt.tmp-deadbeef"
    leftover.write_bytes(b"torn")
    with AsyncCheckpointer(tmp_path) as ckpt:
        assert leftover.exists()  # opening removes nothing: read-only use must not
        ckpt.save(2, {"s": 2}).result(timeout=30)
    assert not leftover.exists()
    removed = [e for e in events(tmp_path) if e["event"] == "checkpoint.tmp_removed"]
    assert removed and removed[0]["path"] == str(leftover)


def test_events_carry_the_documented_fields(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, deterministic_state(1)).result(timeout=30)
    by_name = {e["event"]: e for e in events(tmp_path)}
    staged, committed = by_name["checkpoint.save.staged"], by_name["checkpoint.save.committed"]
    assert {"step", "stall_ms", "bytes", "timestamp", "level"} <= staged.keys()
    assert {"bytes", "write_ms", "fsync_ms", "total_ms", "mb_s", "path", "step"} <= committed.keys()
    assert str(committed["timestamp"]).endswith("Z")


def test_the_staged_event_is_written_off_the_trainers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An append to the event log can wait behind a busy disk (or the writer's own event):
    # save() hands its event to the writer's loop, which logs it before the writer's events.
    writers: list[threading.Thread] = []
    msg = asyncckpt.events.JsonLinesFile.msg

    def recording(self: asyncckpt.events.JsonLinesFile, message: str) -> None:
        if "checkpoint.save.staged" in message:
            writers.append(threading.current_thread())
        msg(self, message)

    monkeypatch.setattr(asyncckpt.events.JsonLinesFile, "info", recording)
    with AsyncCheckpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, deterministic_state(step)).result(timeout=30)
    assert len(writers) == 2 and threading.main_thread() not in writers
    names = [e["event"] for e in events(tmp_path) if e.get("step") == 2]
    assert names.index("checkpoint.save.staged") < names.index("checkpoint.save.committed")


def test_stats_report_the_last_save(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(3, deterministic_state(3)).result(timeout=30)
        stats = ckpt.stats()
    assert stats.saves == 1 and stats.committed == 1 and stats.last_step == 3
    assert stats.last_bytes > 0 and stats.last_total_ms > 0 and stats.last_stall_ms > 0
    assert stats.pending == 0


def test_save_outside_the_context_is_a_usage_error(tmp_path: Path) -> None:
    ckpt = AsyncCheckpointer(tmp_path)
    with pytest.raises(UsageError, match="not open") as info:
        ckpt.save(1, {})
    assert info.value.exit_code == 1 and not isinstance(info.value, asyncckpt.CheckpointError)


def test_module_and_optimizer_are_saved_through_state_dict(tmp_path: Path) -> None:
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    with AsyncCheckpointer(tmp_path) as ckpt:
        path = ckpt.save(1, {"model": model, "optimizer": optimizer}).result(timeout=30)
    assert path is not None
    state = asyncckpt.load(path).state
    assert states_equal(state["model"], model.state_dict())
    assert states_equal(state["optimizer"], optimizer.state_dict())


def test_restore_on_a_fresh_directory_returns_none(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2)
    with AsyncCheckpointer(tmp_path / "new") as ckpt:
        assert ckpt.restore({"model": model}) is None


def test_restore_resumes_from_the_newest_checkpoint_and_logs_the_summary(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    with AsyncCheckpointer(tmp_path) as ckpt:
        ckpt.save(10, {"model": model, "optimizer": optimizer})
    fresh = torch.nn.Linear(4, 2)
    fresh_optimizer = torch.optim.Adam(fresh.parameters())
    with AsyncCheckpointer(tmp_path) as ckpt:
        result = ckpt.restore({"model": fresh, "optimizer": fresh_optimizer})
    assert result is not None and result.step == 10 and result.source == "primary"
    assert states_equal(fresh.state_dict(), model.state_dict())
    assert states_equal(fresh_optimizer.state_dict(), optimizer.state_dict())
    assert "checkpoint.load.summary" in event_names(tmp_path)


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"when_busy": "drop"}, "when_busy must be 'wait' or 'skip'"),
        ({"verify": "skip"}, "verify must be 'full', 'structure' or 'none'"),
        ({"keep_last": 0}, "keep_last must be >= 1"),
        ({"keep_every": 0}, "keep_every must be >= 1 or None"),
        ({"max_pending": 0}, "max_pending must be >= 1"),
        ({"close_timeout": -1.0}, "close_timeout must be >= 0 or None"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path: Path, options: dict[str, Any], pattern: str) -> None:
    with pytest.raises(UsageError, match=pattern) as info:
        AsyncCheckpointer(tmp_path, **options)
    assert info.value.exit_code == 1 and not isinstance(info.value, ValueError)


def test_entering_an_open_checkpointer_is_a_usage_error(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path) as ckpt:
        with pytest.raises(UsageError, match="already open"):
            ckpt.__enter__()
        ckpt.save(1, {"s": 1})
    assert [c.step for c in asyncckpt.list_checkpoints(tmp_path)] == [1]


def test_handle_sigterm_off_the_main_thread_is_a_usage_error_that_starts_nothing(tmp_path: Path) -> None:
    ckpt = AsyncCheckpointer(tmp_path, handle_sigterm=True)
    before = signal.getsignal(signal.SIGTERM)
    raised: list[BaseException] = []

    def enter() -> None:
        try:
            ckpt.__enter__()
        except BaseException as exc:  # handed to the test thread
            raised.append(exc)

    opener = threading.Thread(target=enter)
    opener.start()
    opener.join(30)
    [error] = raised
    assert isinstance(error, UsageError) and "main thread" in str(error)
    assert signal.getsignal(signal.SIGTERM) is before
    assert not any(t.name == "asyncckpt-sigterm" for t in threading.enumerate())
    assert not (tmp_path / "events.jsonl").exists()  # the writer never started
    with pytest.raises(UsageError, match="not open"):
        ckpt.save(1, {})
    with ckpt:  # the main thread may open it
        ckpt.save(1, {"s": 1}).result(timeout=30)
    assert signal.getsignal(signal.SIGTERM) is before


def test_close_of_a_checkpointer_never_opened_does_nothing(tmp_path: Path) -> None:
    AsyncCheckpointer(tmp_path / "never").close()
    assert not (tmp_path / "never").exists()


def test_aflush_also_works_in_sync_use(tmp_path: Path) -> None:
    with AsyncCheckpointer(tmp_path) as ckpt:
        handle = ckpt.save(1, deterministic_state(1))
        anyio.run(ckpt.aflush)
        assert handle.done()


class _SlowDelete(asyncckpt.storage.FileOps):
    """Holds every unlink of a committed checkpoint until ``release``: a filesystem that
    discards freed blocks takes a fraction of a second per GiB there."""

    def __init__(self) -> None:
        self.deleting = threading.Event()
        self.release = threading.Event()

    def unlink(self, path: Path) -> None:
        if path.name.startswith("step-"):
            self.deleting.set()
            assert self.release.wait(30)
        super().unlink(path)


def test_the_handle_resolves_before_older_checkpoints_are_deleted_and_flush_waits_for_them(
    tmp_path: Path,
) -> None:
    ops = _SlowDelete()
    with AsyncCheckpointer(tmp_path, keep_last=1, ops=ops) as ckpt:
        ckpt.save(1, deterministic_state(1)).result(timeout=30)
        second = ckpt.save(2, deterministic_state(2))
        assert second.result(timeout=30) == tmp_path / "step-0000000002.ckpt"  # while step 1 is held
        assert ops.deleting.wait(30)
        with pytest.raises(TimeoutError, match="retention"):
            ckpt.flush(timeout=0.05)
        assert (tmp_path / "step-0000000001.ckpt").exists()
        ops.release.set()
        ckpt.flush()
        assert not (tmp_path / "step-0000000001.ckpt").exists()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000000002.ckpt"]


def test_a_retention_that_fails_after_the_commit_is_logged_and_the_save_stands(tmp_path: Path) -> None:
    class BrokenListing(asyncckpt.storage.FileOps):
        listings = 0

        def scandir(self, folder: Path) -> Any:
            BrokenListing.listings += 1
            if BrokenListing.listings > 2:  # the first start and first save list fine
                raise OSError(errno.EIO, "injected EIO")
            return super().scandir(folder)

    with AsyncCheckpointer(tmp_path, keep_last=1, ops=BrokenListing()) as ckpt:
        ckpt.save(1, deterministic_state(1)).result(timeout=30)
        assert ckpt.save(2, deterministic_state(2)).result(timeout=30) == tmp_path / "step-0000000002.ckpt"
        ckpt.flush()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "checkpoint.prune_failed" and "injected EIO" in e["error"] for e in events)
    assert (tmp_path / "step-0000000002.ckpt").exists()
