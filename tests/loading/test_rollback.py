"""Rollback (load_latest, restore): newest first, fallback with diagnoses, on_corrupt, verify,
and readers racing retention."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncckpt import AsyncCheckpointer
from asyncckpt.catalog import checkpoint_name
from asyncckpt.errors import (
    CorruptedCheckpointError,
    IncompatibleCheckpointError,
    NoValidCheckpointError,
    UsageError,
)
from asyncckpt.loading import (
    FAILED_LOG_NAME,
    Diagnostic,
    LoadResult,
    load_latest,
    restore,
)
from asyncckpt.loading import rollback as rollback_module
from asyncckpt.storage import PosixFile, PosixStorage, StoredObject

from .helpers import (
    PruningStorage,
    Recorder,
    assert_same_state,
    contents,
    failed_lines,
    flip_blob_byte,
    flip_byte,
    layout_of,
    make_state,
    save_objects,
    trained,
    truncate,
    write,
    write_steps,
)


def test_newest_checkpoint_loads_as_primary(tmp_path: Path) -> None:
    write_steps(tmp_path, 100, 200, 300)
    result = load_latest(tmp_path)
    assert isinstance(result, LoadResult)
    assert (result.step, result.source, result.version) == (300, "primary", "1.0")
    assert result.path == tmp_path / checkpoint_name(300)
    assert result.diagnostics == []
    assert result.summary == "found 3 checkpoints (1 valid, 2 not checked); resuming from step 300"
    assert_same_state(result.state, make_state(300))
    assert not (tmp_path / FAILED_LOG_NAME).exists()


def test_checksum_failure_falls_back_and_names_key_and_offset(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200, 300)
    offset = flip_blob_byte(paths[-1], "model.layers.1.weight")
    blob_offset = offset - 5
    result = load_latest(tmp_path)
    assert (result.step, result.source) == (200, "fallback")
    assert_same_state(result.state, make_state(200))
    [diagnostic] = result.diagnostics
    assert isinstance(diagnostic, Diagnostic)
    assert (diagnostic.path, diagnostic.kind) == (str(paths[-1]), "corrupted")
    assert "checksum mismatch in model.layers.1.weight" in diagnostic.reason
    assert f"at offset {blob_offset}" in diagnostic.reason
    assert result.summary.startswith(
        "found 3 checkpoints (1 valid, 1 corrupted, 1 not checked); resuming from step 200 "
        "(fallback: step 300 corrupted: checksum mismatch in model.layers.1.weight"
    )


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda p: truncate(p, p.stat().st_size - 100), "truncated"),
        (lambda p: truncate(p, 0), "truncated"),
        (lambda p: truncate(p, 5000), "truncated"),
        (lambda p: flip_byte(p, layout_of(p).header_offset + 3), "header checksum mismatch"),
        (lambda p: flip_byte(p, 0), "bad magic"),
        (lambda p: flip_byte(p, p.stat().st_size - 1), "trailer"),
    ],
    ids=["truncated-tail", "empty", "truncated-in-blobs", "header", "magic", "trailer"],
)
def test_broken_primary_falls_back(tmp_path: Path, damage: Any, words: str) -> None:
    paths = write_steps(tmp_path, 100, 200)
    damage(paths[-1])
    result = load_latest(tmp_path)
    assert (result.step, result.source) == (100, "fallback")
    [diagnostic] = result.diagnostics
    assert diagnostic.kind == "corrupted"
    assert words in diagnostic.reason
    assert "\n" not in diagnostic.reason


def test_fail_mode_raises_the_first_failure_at_once(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200)
    flip_blob_byte(paths[-1])
    before = contents(tmp_path)
    recorder = Recorder()
    with pytest.raises(CorruptedCheckpointError, match="checksum mismatch in model.layers.0") as caught:
        load_latest(tmp_path, on_corrupt="fail", log=recorder)
    assert str(paths[-1]) in str(caught.value)
    [(_, fields)] = recorder.calls
    assert fields["summary"].startswith(
        "found 2 checkpoints (0 valid, 1 corrupted, 1 not checked); stopped at the first failure: step 200"
    )
    [[path, reason, _]] = failed_lines(tmp_path)
    assert path == str(paths[-1]) and reason.startswith("checksum mismatch")
    assert contents(tmp_path) == before


def test_fail_mode_raises_on_an_incompatible_newest(tmp_path: Path) -> None:
    write(tmp_path, 100)
    write(tmp_path, 200, make_state(200, width=6))
    with pytest.raises(IncompatibleCheckpointError, match="shape of model.layers.0.weight"):
        load_latest(tmp_path, on_corrupt="fail", expect=make_state(0))


def test_on_corrupt_must_be_fallback_or_fail(tmp_path: Path) -> None:
    write(tmp_path, 100)
    with pytest.raises(UsageError, match="on_corrupt"):
        load_latest(tmp_path, on_corrupt="ignore")  # type: ignore[arg-type]


def test_verify_must_be_full_structure_or_none(tmp_path: Path) -> None:
    write(tmp_path, 100)
    with pytest.raises(UsageError, match="verify must be 'full' or 'structure' or 'none', got True"):
        load_latest(tmp_path, verify=True)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="verify must be"):
        restore(tmp_path, {}, verify="skip")  # type: ignore[arg-type]


def test_all_broken_raises_with_every_diagnosis(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200, 300)
    flip_blob_byte(paths[0])
    truncate(paths[1], 10)
    flip_byte(paths[2], 9)  # the prelude's version: its checksum fails
    with pytest.raises(NoValidCheckpointError, match="no valid checkpoint: ") as caught:
        load_latest(tmp_path)
    assert caught.value.path == str(tmp_path)
    assert str(caught.value).endswith(f"; failures are listed in {tmp_path / FAILED_LOG_NAME}")
    diagnostics = caught.value.diagnostics
    assert [d.step for d in diagnostics] == [300, 200, 100]
    assert [d.path for d in diagnostics] == [str(p) for p in paths[::-1]]
    assert all(d.kind == "corrupted" for d in diagnostics)
    assert "found 3 checkpoints (0 valid, 3 corrupted)" in str(caught.value)
    assert len(failed_lines(tmp_path)) == 3


@pytest.mark.parametrize("exists", [True, False], ids=["empty", "missing"])
def test_no_checkpoints_raises_without_diagnostics(tmp_path: Path, exists: bool) -> None:
    directory = tmp_path / "run"
    if exists:
        directory.mkdir()
        (directory / "notes.txt").write_text("not a checkpoint")
    recorder = Recorder()
    with pytest.raises(NoValidCheckpointError, match="no checkpoints") as caught:
        load_latest(directory, log=recorder)
    assert caught.value.diagnostics == []
    assert (str(caught.value), caught.value.reason) == (f"{directory}: no checkpoints", "no checkpoints")
    assert recorder.calls[0][1]["summary"] == f"no checkpoints in {directory}"
    assert directory.exists() == exists
    assert not (directory / FAILED_LOG_NAME).exists()


def test_unsupported_version_is_incompatible(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200)
    data = bytearray(paths[-1].read_bytes())
    data[8:24] = b"2.0".ljust(16, b"\0")
    paths[-1].write_bytes(bytes(data))
    result = load_latest(tmp_path)
    assert result.step == 100
    [diagnostic] = result.diagnostics
    assert diagnostic.kind == "incompatible"
    assert "checkpoint format 2.0 is not supported" in diagnostic.reason


def test_verify_structure_checks_structure_only(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200)
    flip_blob_byte(paths[-1])
    assert load_latest(tmp_path, verify="structure").step == 200
    assert load_latest(tmp_path, verify="none").step == 200  # the same reads: structure is always checked
    assert load_latest(tmp_path, verify="full").step == 100
    assert load_latest(tmp_path).step == 100  # "full" is the default
    flip_byte(paths[-1], layout_of(paths[0]).header_offset + 1)
    unchecked = load_latest(tmp_path, verify="structure")
    assert (unchecked.step, unchecked.diagnostics[0].kind) == (100, "corrupted")


def test_the_loader_changes_nothing_but_the_failure_log(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200, 300)
    flip_blob_byte(paths[2])
    truncate(paths[1], 4096)
    before = contents(tmp_path)
    assert load_latest(tmp_path).step == 100
    assert contents(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, FAILED_LOG_NAME])


def test_an_older_legacy_file_is_a_fallback(tmp_path: Path) -> None:
    [newest] = write_steps(tmp_path, 300)
    legacy = make_state(1)
    del legacy["step"]
    torch.save({**legacy, "global_step": 50}, tmp_path / "old.pt")
    flip_blob_byte(newest)
    result = load_latest(tmp_path)
    assert (result.step, result.source, result.version) == (50, "fallback", "0.x")


def test_a_broken_legacy_file_is_diagnosed(tmp_path: Path) -> None:
    write_steps(tmp_path, 100)
    (tmp_path / "model_900.pt").write_bytes(b"PK\x03\x04" + bytes(100))
    result = load_latest(tmp_path)
    assert result.step == 100
    [diagnostic] = result.diagnostics
    assert Path(diagnostic.path).name == "model_900.pt" and diagnostic.kind == "corrupted"
    assert "legacy torch.save file refused" in diagnostic.reason


def test_a_legacy_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    write_steps(tmp_path, 100)

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, ("echo pwned > pwned.txt",))

    torch.save({"step": 999, "payload": Evil()}, tmp_path / "evil_999.pt")
    result = load_latest(tmp_path)
    assert result.step == 100
    assert Path(result.diagnostics[0].path).name == "evil_999.pt"
    assert not (tmp_path / "pwned.txt").exists() and not Path("pwned.txt").exists()


def test_restore_falls_back_past_a_corrupted_checkpoint(tmp_path: Path) -> None:
    old_model, old_opt = trained(steps=1)
    save_objects(tmp_path, 100, old_model, old_opt)
    new_model, new_opt = trained(steps=3)
    newest = save_objects(tmp_path, 200, new_model, new_opt)
    flip_blob_byte(newest, "model.2.weight", at=1)  # after model.0.* were read into the model
    fresh, fresh_opt = trained(seed=1, steps=0)
    result = restore(tmp_path, {"model": fresh, "optimizer": fresh_opt})
    assert (result.step, result.source) == (100, "fallback")
    assert "checksum mismatch in model.2.weight" in result.diagnostics[0].reason
    assert_same_state(fresh.state_dict(), old_model.state_dict())
    assert_same_state(fresh_opt.state_dict(), old_opt.state_dict())


def test_restore_falls_back_when_load_state_dict_refuses(tmp_path: Path) -> None:
    write(tmp_path, 100)
    write(tmp_path, 200, {**make_state(200), "custom": {"version": 2}})
    write(tmp_path, 100, {**make_state(100), "custom": {"version": 1}})

    class Custom:
        loaded: Any = None

        def load_state_dict(self, state: Any) -> None:
            if state["version"] != 1:
                raise ValueError(f"cannot read version {state['version']}")
            self.loaded = state

    custom = Custom()
    result = restore(tmp_path, {"custom": custom})
    assert (result.step, custom.loaded) == (100, {"version": 1})
    assert (
        "custom.load_state_dict refused the checkpoint: cannot read version 2" in result.diagnostics[0].reason
    )


def test_restore_of_an_empty_directory_has_no_diagnostics(tmp_path: Path) -> None:
    model, optimizer = trained(steps=0)
    with pytest.raises(NoValidCheckpointError, match="no checkpoints") as caught:
        restore(tmp_path, {"model": model, "optimizer": optimizer})
    assert caught.value.diagnostics == []


def test_restore_refuses_objects_without_load_state_dict(tmp_path: Path) -> None:
    write(tmp_path, 100)
    with pytest.raises(TypeError, match=r"objects\['step'\] \(int\) has no load_state_dict"):
        restore(tmp_path, {"step": 5})


def test_no_warnings_on_a_clean_load(tmp_path: Path) -> None:
    write_steps(tmp_path, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_latest(tmp_path).source == "primary"


# --------------------------------------------------------------------------- name and content disagree


def test_a_file_named_for_another_step_is_never_loaded_as_that_step(tmp_path: Path) -> None:
    # Issue 17, item 3: a copied or renamed file: step-0000000900.ckpt holding step 100, next to
    # a real step 500. The resume falls back to 500; restore agrees; on_corrupt="fail" raises.
    write(tmp_path, 500)
    copied = tmp_path / checkpoint_name(900)
    copied.write_bytes(write(tmp_path, 100).read_bytes())
    (tmp_path / checkpoint_name(100)).unlink()
    result = load_latest(tmp_path)
    assert (result.step, result.source) == (500, "fallback")
    assert_same_state(result.state, make_state(500))
    [diagnostic] = result.diagnostics
    assert (diagnostic.path, diagnostic.kind, diagnostic.step) == (str(copied), "incompatible", 900)
    assert diagnostic.reason.startswith("the file name says step 900 but the checkpoint holds step 100")
    assert "(fallback: step 900 incompatible: the file name says step 900" in result.summary
    restored = restore(tmp_path, {})
    assert (restored.step, restored.diagnostics[0].reason) == (500, diagnostic.reason)
    with pytest.raises(IncompatibleCheckpointError) as caught:
        load_latest(tmp_path, on_corrupt="fail")
    assert (caught.value.path, caught.value.step) == (str(copied), 100)


# --------------------------------------------------------------------------- readers racing retention


def pruning(monkeypatch: pytest.MonkeyPatch, storage: PruningStorage) -> PruningStorage:
    """Make the public functions use ``storage`` for the directory they are given."""
    monkeypatch.setattr(rollback_module, "open_storage", lambda _, **__: storage)
    return storage


def test_a_checkpoint_pruned_between_listing_and_opening_is_skipped_not_diagnosed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 17, item 6: retention removed step 300 after the listing; a newer step 400 was
    # committed first. The loader lists again and loads 400: nothing is called corrupted.
    write_steps(tmp_path, 100, 200, 300)
    newest = checkpoint_name(300)
    storage = pruning(monkeypatch, PruningStorage(tmp_path, {newest}, {newest: 400}))
    recorder = Recorder()
    result = load_latest(tmp_path, log=recorder)
    assert (result.step, result.source, result.diagnostics) == (400, "primary", [])
    assert_same_state(result.state, make_state(400))
    assert result.summary == "found 3 checkpoints (1 valid, 2 not checked); resuming from step 400"
    assert storage.opened == [checkpoint_name(300), checkpoint_name(400)]
    assert recorder.calls[0][1]["failures"] == []
    assert not (tmp_path / FAILED_LOG_NAME).exists()


def test_every_pruned_candidate_is_skipped_until_one_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_steps(tmp_path, 100, 200, 300)
    names = {checkpoint_name(200), checkpoint_name(300)}
    storage = pruning(monkeypatch, PruningStorage(tmp_path, names))
    result = restore(tmp_path, {}, log=Recorder())
    assert (result.step, result.source, result.diagnostics) == (100, "primary", [])
    assert storage.opened == [checkpoint_name(300), checkpoint_name(200), checkpoint_name(100)]
    assert not (tmp_path / FAILED_LOG_NAME).exists()


def test_failures_before_a_pruned_candidate_are_kept_and_not_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_steps(tmp_path, 100, 200, 300)
    flip_blob_byte(paths[2])
    storage = pruning(monkeypatch, PruningStorage(tmp_path, {checkpoint_name(200)}))
    result = load_latest(tmp_path, log=Recorder())
    assert (result.step, result.source) == (100, "fallback")
    assert [d.path for d in result.diagnostics] == [str(paths[2])]
    assert storage.opened == [checkpoint_name(300), checkpoint_name(200), checkpoint_name(100)]
    assert result.summary.startswith("found 2 checkpoints (1 valid, 1 corrupted); resuming from step 100")
    assert [line[0] for line in failed_lines(tmp_path)] == [str(paths[2])]


def test_a_directory_pruned_empty_has_no_checkpoints_and_no_raw_file_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_steps(tmp_path, 100)
    pruning(monkeypatch, PruningStorage(tmp_path, {checkpoint_name(100)}))
    with pytest.raises(NoValidCheckpointError, match="no checkpoints") as caught:
        load_latest(tmp_path, log=Recorder())
    assert caught.value.diagnostics == []


def test_an_empty_listing_is_believed_only_when_the_next_is_empty_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # readdir racing a writer may miss the file renamed in and the one pruned at the same time.
    write_steps(tmp_path, 100)

    class MissesOnce(PosixStorage):
        listings = 0

        def ls(self, under: str = "") -> list[StoredObject]:
            self.listings += 1
            return [] if self.listings == 1 else super().ls(under)

    storage = MissesOnce(tmp_path)
    monkeypatch.setattr(rollback_module, "open_storage", lambda _, **__: storage)
    assert load_latest(tmp_path, log=Recorder()).step == 100
    assert storage.listings == 2
    (tmp_path / checkpoint_name(100)).unlink()
    with pytest.raises(NoValidCheckpointError, match="no checkpoints"):
        load_latest(tmp_path, log=Recorder())
    assert storage.listings == 4


def test_listing_again_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A writer that prunes every candidate the moment it is opened, committing a newer one each
    # time: after MAX_LISTINGS listings the loader stops listing again and skips what vanishes.
    write_steps(tmp_path, 1)

    class Churning(PruningStorage):
        def open(self, name: str) -> PosixFile:
            self.opened.append(name)
            write(self.root, len(self.opened) + 1)
            self.delete([name])
            return PosixStorage.open(self, name)

    storage = pruning(monkeypatch, Churning(tmp_path, set()))
    with pytest.raises(NoValidCheckpointError, match="no checkpoints") as caught:
        load_latest(tmp_path, log=Recorder())
    assert caught.value.diagnostics == []
    assert len(storage.opened) == rollback_module.MAX_LISTINGS


@pytest.mark.stress
def test_loads_racing_a_trainer_with_keep_last_1_always_find_a_committed_step(tmp_path: Path) -> None:
    # Issue 17, item 6, for real: a trainer commits with keep_last=1 while another thread loads.
    # Every load returns a step that was committed, never "corrupted", never FileNotFoundError.
    loaded: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def keep_loading() -> None:
        while not done.is_set():
            try:
                loaded.append(load_latest(tmp_path, log=Recorder()).step)
            except BaseException as exc:  # handed to the test thread below
                errors.append(exc)

    with AsyncCheckpointer(tmp_path, keep_last=1) as ckpt:
        ckpt.save(0, make_state(0)).result(timeout=30)
        reader = threading.Thread(target=keep_loading, daemon=True)
        reader.start()
        for step in range(1, 300):
            ckpt.save(step, make_state(step)).result(timeout=30)
        done.set()
        reader.join(60)
    assert not reader.is_alive() and errors == []
    assert loaded and loaded == sorted(loaded)  # each load: the newest committed step at some instant
    assert not (tmp_path / FAILED_LOG_NAME).exists()


@pytest.mark.parametrize("written_after", [True, False])
def test_a_damaged_file_without_a_step_is_named_only_when_written_after_the_one_loaded(
    tmp_path: Path, written_after: bool
) -> None:
    write_steps(tmp_path, 100, 200)
    damaged = tmp_path / "last.ckpt"
    damaged.write_bytes((tmp_path / checkpoint_name(200)).read_bytes()[:-100])  # no readable step
    loaded_at = os.stat(tmp_path / checkpoint_name(200)).st_mtime
    when = loaded_at + 60 if written_after else loaded_at - 60
    os.utime(damaged, (when, when))
    result = load_latest(tmp_path)
    assert result.step == 200
    if written_after:  # most likely the newest: the resume goes back past it, and says so
        assert result.source == "fallback"
        assert [d.path for d in result.diagnostics] == [str(damaged)]
        assert str(damaged) in (tmp_path / FAILED_LOG_NAME).read_text()
    else:  # older than what loaded: not in the way
        assert (result.source, result.diagnostics) == ("primary", [])
