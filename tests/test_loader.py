"""The rollback loader: candidates, fallback with diagnostics, expect checks, restore, checking."""

from __future__ import annotations

import os
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt import loader as loader_module
from asyncckpt.catalog import checkpoint_name
from asyncckpt.errors import (
    CorruptedCheckpointError,
    IncompatibleCheckpointError,
    NoValidCheckpointError,
    UsageError,
)
from asyncckpt.loader import (
    FAILED_LOG_NAME,
    SUMMARY_EVENT,
    Diagnostic,
    LoadResult,
    check_candidates,
    load_latest,
    restore,
)
from asyncckpt.storage.posix import temp_name

# --------------------------------------------------------------------------- helpers


def make_state(step: int, *, width: int = 8) -> dict[str, Any]:
    """A small state whose every value depends on ``step``."""
    base = torch.arange(width * 4, dtype=torch.float32).reshape(width, 4)
    return {
        "model": {
            "layers.0.weight": base + step,
            "layers.0.bias": torch.full((width,), float(step)),
            "layers.1.weight": (base.t() * step).contiguous(),
        },
        "optimizer": {"state": {0: {"exp_avg": base * 0.5}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "step": step,
    }


def write(directory: Path, step: int, state: Any = None) -> Path:
    return asyncckpt.save(
        directory / checkpoint_name(step), make_state(step) if state is None else state, step=step
    )


def write_steps(directory: Path, *steps: int) -> list[Path]:
    return [write(directory, step) for step in steps]


def layout_of(path: Path) -> fmt.Layout:
    with open(path, "rb") as file:
        return fmt.read_layout(file, str(path))


def blob_of(path: Path, key: str) -> fmt.BlobEntry:
    layout = layout_of(path)
    entry = next(t for t in layout.tensors if t.key == key)
    return layout.blobs[entry.blob]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_blob_byte(path: Path, key: str = "model.layers.0.weight", at: int = 5) -> int:
    offset = blob_of(path, key).offset + at
    flip_byte(path, offset)
    return offset


def truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as file:
        file.truncate(keep)


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != FAILED_LOG_NAME}


def failed_lines(directory: Path) -> list[list[str]]:
    text = (directory / FAILED_LOG_NAME).read_text(encoding="utf-8")
    return [line.split("|") for line in text.splitlines()]


def assert_same_state(got: Any, want: Any) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for key in want:
            assert_same_state(got[key], want[key])
    elif isinstance(want, list | tuple):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same_state(g, w)
    else:
        assert got == want


class Recorder:
    """A ``log`` callable that keeps its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.calls.append((event, fields))


def mlp(width: int = 8, *, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


def trained(
    width: int = 8, *, seed: int = 0, steps: int = 2
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = mlp(width, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    return model, optimizer


def save_objects(
    directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> Path:
    state = {"model": model, "optimizer": optimizer, "step": step}
    return asyncckpt.save(directory / checkpoint_name(step), state, step=step)


# --------------------------------------------------------------------------- primary and fallback


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
    with pytest.raises(ValueError, match="on_corrupt"):
        load_latest(tmp_path, on_corrupt="ignore")  # type: ignore[arg-type]


def test_all_broken_raises_with_every_diagnosis(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200, 300)
    flip_blob_byte(paths[0])
    truncate(paths[1], 10)
    flip_byte(paths[2], 9)  # the prelude's version: its checksum fails
    with pytest.raises(NoValidCheckpointError, match="no valid checkpoint in") as caught:
        load_latest(tmp_path)
    diagnostics = caught.value.diagnostics
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
    with pytest.raises(NoValidCheckpointError, match="no checkpoints in") as caught:
        load_latest(directory)
    assert caught.value.diagnostics == []
    assert directory.exists() == exists
    assert not (directory / FAILED_LOG_NAME).exists()


def test_temp_files_and_symlinks_are_never_candidates(tmp_path: Path) -> None:
    write_steps(tmp_path, 100)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    newer = write(outside, 900)
    temp = temp_name(tmp_path / checkpoint_name(800))
    temp.write_bytes(newer.read_bytes())
    (tmp_path / checkpoint_name(700)).symlink_to(newer)
    (tmp_path / "link_600.pt").symlink_to(newer)
    result = load_latest(tmp_path)
    assert (result.step, result.source) == (100, "primary")
    assert result.summary.startswith("found 1 checkpoint (1 valid)")
    assert temp.read_bytes() == newer.read_bytes()


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


def test_validate_false_checks_structure_only(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200)
    flip_blob_byte(paths[-1])
    assert load_latest(tmp_path, validate=False).step == 200
    assert load_latest(tmp_path, validate=True).step == 100
    flip_byte(paths[-1], layout_of(paths[0]).header_offset + 1)
    unchecked = load_latest(tmp_path, validate=False)
    assert (unchecked.step, unchecked.diagnostics[0].kind) == (100, "corrupted")


def test_the_loader_changes_nothing_but_the_failure_log(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200, 300)
    flip_blob_byte(paths[2])
    truncate(paths[1], 4096)
    before = contents(tmp_path)
    assert load_latest(tmp_path).step == 100
    assert contents(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, FAILED_LOG_NAME])


# --------------------------------------------------------------------------- failed_checkpoints.txt


def test_failures_are_appended_one_line_each(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200)
    flip_blob_byte(paths[-1])
    odd = tmp_path / checkpoint_name(300)
    odd.write_bytes(b"XX|\nYY" + bytes(200))  # a bad magic that holds '|' and a newline
    load_latest(tmp_path)
    load_latest(tmp_path)
    lines = failed_lines(tmp_path)
    assert len(lines) == 4
    assert all(len(fields) == 3 for fields in lines)
    assert [fields[0] for fields in lines] == [str(odd), str(paths[-1])] * 2
    assert lines[0][1].startswith("not a checkpoint (bad magic")
    assert lines[1][1].startswith("checksum mismatch in model.layers.0.weight")
    for _, _, stamp in lines:
        parsed = datetime.fromisoformat(stamp)
        assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        assert abs((datetime.now(UTC) - parsed).total_seconds()) < 3600


def test_failure_log_timestamps_match_the_diagnostics(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200)
    flip_blob_byte(paths[-1])
    result = load_latest(tmp_path)
    [[path, reason, stamp]] = failed_lines(tmp_path)
    [diagnostic] = result.diagnostics
    assert (path, reason, stamp) == (str(diagnostic.path), diagnostic.reason, diagnostic.timestamp)


def test_an_unwritable_failure_log_only_warns(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200)
    flip_blob_byte(paths[-1])
    (tmp_path / FAILED_LOG_NAME).mkdir()  # opening it for appending fails like a read-only one
    with pytest.warns(RuntimeWarning, match="cannot record failed checkpoints"):
        result = load_latest(tmp_path)
    assert (result.step, result.source) == (100, "fallback")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_only_warns(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200)
    flip_blob_byte(paths[-1])
    tmp_path.chmod(0o555)
    try:
        with pytest.warns(RuntimeWarning, match="cannot record failed checkpoints"):
            result = load_latest(tmp_path)
    finally:
        tmp_path.chmod(0o755)
    assert result.step == 100
    assert not (tmp_path / FAILED_LOG_NAME).exists()


# --------------------------------------------------------------------------- the summary event


def test_the_summary_is_logged_through_log(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200)
    flip_blob_byte(paths[-1])
    recorder = Recorder()
    result = load_latest(tmp_path, log=recorder)
    [(event, fields)] = recorder.calls
    assert event == SUMMARY_EVENT
    assert fields["summary"] == result.summary and fields["step"] == 100
    assert fields["failures"][0]["kind"] == "corrupted"


def test_the_summary_goes_to_the_asyncckpt_logger_by_default(tmp_path: Path) -> None:
    write_steps(tmp_path, 100)
    with structlog.testing.capture_logs() as logs:
        result = load_latest(tmp_path)
    [entry] = logs
    assert (entry["event"], entry["log_level"], entry["step"]) == (SUMMARY_EVENT, "info", 100)
    assert entry["summary"] == result.summary


def test_a_failed_load_logs_its_summary_too(tmp_path: Path) -> None:
    truncate(write(tmp_path, 100), 10)
    recorder = Recorder()
    with pytest.raises(NoValidCheckpointError):
        load_latest(tmp_path, log=recorder)
    [(event, fields)] = recorder.calls
    assert event == SUMMARY_EVENT and fields["step"] is None
    assert fields["summary"].startswith("found 1 checkpoint (0 valid, 1 corrupted); no usable checkpoint")


# --------------------------------------------------------------------------- legacy files


def test_a_newer_legacy_file_takes_part(tmp_path: Path) -> None:
    write_steps(tmp_path, 100, 200)
    legacy = {**make_state(250), "step": 250}
    torch.save(legacy, tmp_path / "model.pt")
    result = load_latest(tmp_path)
    assert (result.step, result.version, result.path.name) == (250, "0.x", "model.pt")
    assert "resuming from step 250 (legacy format 0.x)" in result.summary
    assert_same_state(result.state, legacy)


def test_a_legacy_step_can_come_from_the_file_name(tmp_path: Path) -> None:
    write_steps(tmp_path, 100)
    torch.save(make_state(7)["model"], tmp_path / "ckpt_500.pth")
    result = load_latest(tmp_path)
    assert (result.step, result.version) == (500, "0.x")


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


def test_a_legacy_file_without_a_step_is_ignored_and_said_so(tmp_path: Path) -> None:
    write_steps(tmp_path, 100)
    torch.save({"weights": torch.ones(2)}, tmp_path / "weights.pt")
    result = load_latest(tmp_path)
    assert result.step == 100 and result.diagnostics == []
    assert result.summary.endswith("; ignored legacy files without a readable step: weights.pt")


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


# --------------------------------------------------------------------------- expect


def test_expect_lists_every_mismatch(tmp_path: Path) -> None:
    write(tmp_path, 100)
    changed = make_state(200, width=6)
    del changed["model"]["layers.1.weight"]
    changed["model"]["extra.bias"] = torch.zeros(3)
    write(tmp_path, 200, changed)
    result = load_latest(tmp_path, expect=make_state(0))
    assert (result.step, result.source) == (100, "fallback")
    [diagnostic] = result.diagnostics
    assert diagnostic.kind == "incompatible"
    assert "5 mismatches" in diagnostic.reason
    assert "shape of model.layers.0.weight is [6, 4] in the checkpoint, [8, 4] expected" in diagnostic.reason
    assert "shape of model.layers.0.bias is [6] in the checkpoint, [8] expected" in diagnostic.reason
    assert (
        "shape of optimizer.state.0.exp_avg is [6, 4] in the checkpoint, [8, 4] expected" in diagnostic.reason
    )
    assert "missing model.layers.1.weight" in diagnostic.reason
    assert "unexpected model.extra.bias" in diagnostic.reason


def test_expect_reports_dtype_differences_without_failing(tmp_path: Path) -> None:
    write(tmp_path, 100)
    expected = make_state(0)
    expected["model"]["layers.0.bias"] = expected["model"]["layers.0.bias"].double()
    result = load_latest(tmp_path, expect=expected)
    assert (result.step, result.source) == (100, "primary")
    assert "dtype differences" in result.summary
    assert "model.layers.0.bias is float32 in the checkpoint, float64 expected" in result.summary


def test_expect_is_scoped_to_its_top_level_keys(tmp_path: Path) -> None:
    write(tmp_path, 100)
    assert load_latest(tmp_path, expect={"model": make_state(0)["model"]}).step == 100
    with pytest.raises(NoValidCheckpointError) as caught:
        load_latest(tmp_path, expect={"model": make_state(0)["model"], "ema": torch.zeros(1)})
    assert caught.value.diagnostics[0].reason.startswith(
        "does not fit the expected state (1 mismatch: missing 'ema'"
    )


def test_expect_takes_modules_and_optimizers(tmp_path: Path) -> None:
    model, optimizer = trained(8)
    save_objects(tmp_path, 100, model, optimizer)
    fresh, fresh_opt = trained(8, seed=1, steps=0)
    assert load_latest(tmp_path, expect={"model": fresh, "optimizer": fresh_opt}).step == 100
    wide, wide_opt = trained(9, seed=1, steps=0)
    with pytest.raises(NoValidCheckpointError) as caught:
        load_latest(tmp_path, expect={"model": wide})
    assert "shape of model.0.weight is [8, 4] in the checkpoint, [9, 4] expected" in str(caught.value)
    fewer = torch.optim.Adam(list(fresh.parameters())[:2])
    with pytest.raises(
        NoValidCheckpointError, match=r"parameter groups of sizes \[4\] in the checkpoint, \[2\]"
    ):
        load_latest(tmp_path, expect={"optimizer": fewer})


# --------------------------------------------------------------------------- restore


def test_restore_loads_modules_and_optimizers(tmp_path: Path) -> None:
    model, optimizer = trained()
    save_objects(tmp_path, 100, model, optimizer)
    fresh, fresh_opt = trained(seed=1, steps=0)
    result = restore(tmp_path, {"model": fresh, "optimizer": fresh_opt})
    assert (result.step, result.source) == (100, "primary")
    assert_same_state(fresh.state_dict(), model.state_dict())
    assert_same_state(fresh_opt.state_dict(), optimizer.state_dict())
    assert result.state["step"] == 100


def test_restore_reads_straight_into_the_module_memory(tmp_path: Path) -> None:
    model, optimizer = trained()
    save_objects(tmp_path, 100, model, optimizer)
    fresh, fresh_opt = trained(seed=1, steps=0)
    pointers = {name: p.data_ptr() for name, p in fresh.state_dict().items()}
    result = restore(tmp_path, {"model": fresh, "optimizer": fresh_opt})
    for name, tensor in fresh.state_dict().items():
        assert tensor.data_ptr() == pointers[name]
        assert result.state["model"][name].data_ptr() == pointers[name]  # no second copy was made
        assert torch.equal(tensor, model.state_dict()[name])


def test_restore_reads_straight_into_an_optimizers_existing_state(tmp_path: Path) -> None:
    model, optimizer = trained()
    save_objects(tmp_path, 100, model, optimizer)
    fresh, fresh_opt = trained(seed=1, steps=2)  # its Adam state exists: an in-process rollback
    before = {
        (i, key): value.data_ptr()
        for i, per_param in fresh_opt.state_dict()["state"].items()
        for key, value in per_param.items()
    }
    assert before
    result = restore(tmp_path, {"model": fresh, "optimizer": fresh_opt})
    after = fresh_opt.state_dict()["state"]
    for (i, key), pointer in before.items():
        assert after[i][key].data_ptr() == pointer
        assert result.state["optimizer"]["state"][i][key].data_ptr() == pointer  # no second copy
    assert_same_state(fresh_opt.state_dict(), optimizer.state_dict())
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_restore_into_an_optimizer_whose_state_dict_refuses(tmp_path: Path) -> None:
    class Unconsolidated(torch.optim.Adam):  # like ZeroRedundancyOptimizer before consolidation
        def state_dict(self) -> dict[str, Any]:
            raise RuntimeError("optimizer state has not been consolidated")

    model, optimizer = trained()
    save_objects(tmp_path, 100, model, optimizer)
    fresh, _ = trained(seed=1, steps=0)
    target = Unconsolidated(fresh.parameters())
    result = restore(tmp_path, {"model": fresh, "optimizer": target})
    assert result.step == 100
    saved = optimizer.state_dict()["state"]
    for index, param in enumerate(fresh.parameters()):
        assert torch.equal(target.state[param]["exp_avg"], saved[index]["exp_avg"])


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


def test_restore_checks_shapes_before_touching_the_model(tmp_path: Path) -> None:
    save_objects(tmp_path, 100, *trained(8))
    wide, wide_opt = trained(9, seed=3, steps=0)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(NoValidCheckpointError) as caught:
        restore(tmp_path, {"model": wide, "optimizer": wide_opt})
    [diagnostic] = caught.value.diagnostics
    assert diagnostic.kind == "incompatible"
    assert "shape of model.0.weight is [8, 4] in the checkpoint, [9, 4] expected" in diagnostic.reason
    assert_same_state(wide.state_dict(), before)


def test_restore_needs_every_object_in_the_checkpoint(tmp_path: Path) -> None:
    model, optimizer = trained()
    save_objects(tmp_path, 100, model, optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    with pytest.raises(NoValidCheckpointError, match="missing 'scheduler'"):
        restore(tmp_path, {"model": model, "scheduler": scheduler})


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


def test_restore_keeps_tied_weights_tied(tmp_path: Path) -> None:
    def tied(seed: int) -> torch.nn.ModuleDict:
        torch.manual_seed(seed)
        model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 4), "head": torch.nn.Linear(4, 10)})
        model["head"].weight = model["embed"].weight
        return model

    saved = tied(0)
    asyncckpt.save(tmp_path / checkpoint_name(1), {"model": saved}, step=1)
    fresh = tied(1)
    restore(tmp_path, {"model": fresh})
    assert fresh["head"].weight is fresh["embed"].weight
    assert_same_state(fresh.state_dict(), saved.state_dict())


def test_restore_converts_other_dtypes(tmp_path: Path) -> None:
    model, optimizer = trained()
    save_objects(tmp_path, 100, model, optimizer)
    fresh = mlp(seed=1).double()
    result = restore(tmp_path, {"model": fresh})
    assert result.step == 100
    for name, tensor in fresh.state_dict().items():
        assert tensor.dtype == torch.float64
        assert torch.equal(tensor, model.state_dict()[name].double())


def test_restore_from_a_legacy_file(tmp_path: Path) -> None:
    model, optimizer = trained()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 7}, tmp_path / "a.pt"
    )
    fresh, fresh_opt = trained(seed=1, steps=0)
    result = restore(tmp_path, {"model": fresh, "optimizer": fresh_opt})
    assert (result.step, result.version) == (7, "0.x")
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_restore_of_an_empty_directory_has_no_diagnostics(tmp_path: Path) -> None:
    model, optimizer = trained(steps=0)
    with pytest.raises(NoValidCheckpointError, match="no checkpoints in") as caught:
        restore(tmp_path, {"model": model, "optimizer": optimizer})
    assert caught.value.diagnostics == []


def test_restore_refuses_objects_without_load_state_dict(tmp_path: Path) -> None:
    write(tmp_path, 100)
    with pytest.raises(TypeError, match=r"objects\['step'\] \(int\) has no load_state_dict"):
        restore(tmp_path, {"step": 5})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_restore_into_a_cuda_module(tmp_path: Path) -> None:
    model, optimizer = trained()
    save_objects(tmp_path, 100, model, optimizer)
    fresh = mlp(seed=1).cuda()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    pointers = {name: p.data_ptr() for name, p in fresh.state_dict().items()}
    result = restore(tmp_path, {"model": fresh, "optimizer": fresh_opt})
    for name, tensor in fresh.state_dict().items():
        assert tensor.is_cuda and tensor.data_ptr() == pointers[name]
        assert result.state["model"][name].data_ptr() == pointers[name]
        assert torch.equal(tensor.cpu(), model.state_dict()[name])
    assert fresh_opt.state_dict()["state"][0]["exp_avg"].is_cuda
    loaded = load_latest(tmp_path, map_location="cuda")
    assert loaded.state["model"]["0.weight"].is_cuda


@pytest.fixture
def parallel_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make even tiny files be read by several threads."""
    monkeypatch.setattr(loader_module, "PARALLEL_READ_MIN_BYTES", 0)
    monkeypatch.setattr(loader_module.os, "cpu_count", lambda: 4)


def deep_mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)])


@pytest.mark.usefixtures("parallel_reads")
def test_parallel_reads_load_every_blob(tmp_path: Path) -> None:
    saved = deep_mlp(0)
    asyncckpt.save(tmp_path / checkpoint_name(3), {"model": saved, "extra": make_state(3)}, step=3)
    loaded = load_latest(tmp_path)
    assert_same_state(loaded.state["model"], saved.state_dict())
    assert_same_state(loaded.state["extra"], make_state(3))
    fresh = deep_mlp(1)
    pointers = [p.data_ptr() for p in fresh.parameters()]
    restore(tmp_path, {"model": fresh})
    assert [p.data_ptr() for p in fresh.parameters()] == pointers
    assert_same_state(fresh.state_dict(), saved.state_dict())


@pytest.mark.usefixtures("parallel_reads")
def test_parallel_reads_report_the_lowest_broken_blob(tmp_path: Path) -> None:
    path = asyncckpt.save(tmp_path / checkpoint_name(3), {"model": deep_mlp(0)}, step=3)
    for key in ("model.4.weight", "model.1.bias", "model.5.bias"):
        flip_blob_byte(path, key, at=2)
    for _ in range(5):
        with pytest.raises(NoValidCheckpointError) as caught:
            restore(tmp_path, {"model": deep_mlp(1)}, log=Recorder())
        assert "checksum mismatch in model.1.bias " in caught.value.diagnostics[0].reason


# --------------------------------------------------------------------------- check_candidates


def test_check_candidates_reports_every_file(tmp_path: Path) -> None:
    paths = write_steps(tmp_path, 100, 200, 300)
    flip_blob_byte(paths[1])
    data = bytearray(paths[2].read_bytes())
    data[8:24] = b"3.1".ljust(16, b"\0")
    paths[2].write_bytes(bytes(data))
    torch.save({"step": 150}, tmp_path / "old.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "nostep.pt")
    full = check_candidates(tmp_path, verify="full")
    assert [(r.step, r.path.name, r.status, r.version) for r in full] == [
        (300, paths[2].name, "incompatible", None),
        (200, paths[1].name, "corrupted", None),
        (150, "old.pt", "valid", "0.x"),
        (100, paths[0].name, "valid", "1.0"),
        (None, "nostep.pt", "valid", "0.x"),
    ]
    assert full[0].reason is not None and "format 3.1" in full[0].reason
    assert full[1].reason is not None and "checksum mismatch in model.layers.0.weight" in full[1].reason
    assert full[3].reason is None and full[3].size == paths[0].stat().st_size
    quick = check_candidates(tmp_path, verify="structure")
    assert [r.status for r in quick] == ["incompatible", "valid", "valid", "valid", "valid"]
    assert not (tmp_path / FAILED_LOG_NAME).exists()


def test_check_candidates_checks_one_file(tmp_path: Path) -> None:
    path = write(tmp_path, 42)
    [report] = check_candidates(path, verify="full")
    assert (report.step, report.status, report.version) == (42, "valid", "1.0")
    truncate(path, 9000)
    [report] = check_candidates(path, verify="structure")
    assert report.status == "corrupted" and report.reason is not None and "truncated" in report.reason


def test_check_candidates_of_a_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        check_candidates(tmp_path / "nope.ckpt", verify="full")


def test_check_candidates_verifies_fully_by_default_and_refuses_other_values(tmp_path: Path) -> None:
    path = write(tmp_path, 42)
    flip_blob_byte(path)
    [report] = check_candidates(path)
    assert report.status == "corrupted"
    with pytest.raises(UsageError, match="'full' or 'structure'"):
        check_candidates(path, verify="none")  # type: ignore[arg-type]


def test_no_warnings_on_a_clean_load(tmp_path: Path) -> None:
    write_steps(tmp_path, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_latest(tmp_path).source == "primary"


# --------------------------------------------------------------------------- named checkpoints


def write_named(directory: Path, name: str, step: int, *, mtime_ns: int) -> Path:
    path = directory / name
    asyncckpt.save(path, make_state(step), step=step)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def test_any_ckpt_file_is_a_candidate_with_its_step_read_from_its_header(tmp_path: Path) -> None:
    write_named(tmp_path, "epoch=0-step=4.ckpt", 4, mtime_ns=1_000)
    write_named(tmp_path, "epoch=1-step=8.ckpt", 8, mtime_ns=2_000)
    newest = write_named(tmp_path, "last.ckpt", 8, mtime_ns=3_000)  # the same step, written later
    write(tmp_path, 6)
    result = load_latest(tmp_path)
    assert (result.step, result.path, result.source) == (8, newest, "primary")
    assert_same_state(result.state, make_state(8))
    reports = check_candidates(tmp_path, verify="full")
    assert [(r.path.name, r.step) for r in reports] == [
        ("last.ckpt", 8),
        ("epoch=1-step=8.ckpt", 8),
        ("step-0000000006.ckpt", 6),
        ("epoch=0-step=4.ckpt", 4),
    ]


def test_a_broken_named_checkpoint_falls_back_with_its_diagnosis(tmp_path: Path) -> None:
    write_named(tmp_path, "epoch=0-step=4.ckpt", 4, mtime_ns=1_000)
    broken = write_named(tmp_path, "epoch=1-step=8.ckpt", 8, mtime_ns=2_000)
    truncate(broken, os.path.getsize(broken) // 2)
    result = load_latest(tmp_path)
    assert (result.step, result.source) == (4, "fallback")
    [diagnostic] = result.diagnostics
    assert diagnostic.path == str(broken)
    assert diagnostic.kind == "corrupted"
