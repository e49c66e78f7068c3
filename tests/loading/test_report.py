"""Reporting: failed_checkpoints.txt, the summary text and the checkpoint.load.summary event."""

from __future__ import annotations

import io
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch

import asyncckpt
from asyncckpt import reader as reader_module
from asyncckpt.catalog import checkpoint_name
from asyncckpt.errors import CorruptedCheckpointError, NoValidCheckpointError
from asyncckpt.loading import FAILED_LOG_NAME, SUMMARY_EVENT, Diagnostic, check_candidates, load_latest
from asyncckpt.loading.report import record_failures
from asyncckpt.storage import PosixStorage

from .helpers import Recorder, failed_lines, flip_blob_byte, make_state, truncate, write, write_steps


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


# --------------------------------------------------------------------------- unverified legacy files


def raw_pickle_save(state: Any, path: Path) -> None:
    """The pre-zip torch.save format: nothing in it can be verified."""
    torch.save(state, path, _use_new_zipfile_serialization=False)


def test_an_unverified_legacy_file_is_never_chosen_silently(tmp_path: Path) -> None:
    # Issue 17, item 4: a legacy file of the same step as a broken v1 file is chosen, and the
    # summary says it is unverified and what it replaced.
    [newest] = write_steps(tmp_path, 300)
    flip_blob_byte(newest)
    raw_pickle_save({**make_state(300), "step": 300}, tmp_path / "backup_300.pt")
    result = load_latest(tmp_path, log=Recorder())
    assert (result.step, result.version, result.path.name) == (300, "0.x", "backup_300.pt")
    assert result.source == "fallback"
    assert result.summary.startswith(
        "found 2 checkpoints (1 valid, 1 corrupted); resuming from step 300 (legacy format 0.x, "
        "unverified, chosen over the failed asyncckpt file of the same step, fallback: step 300 "
        "corrupted: checksum mismatch"
    )


def test_a_v1_file_is_preferred_to_a_legacy_file_of_the_same_step(tmp_path: Path) -> None:
    write_steps(tmp_path, 300)
    raw_pickle_save({**make_state(1), "step": 300}, tmp_path / "backup_300.pt")
    result = load_latest(tmp_path, log=Recorder())
    assert (result.step, result.version, result.source) == (300, "1.0", "primary")
    assert result.summary == "found 2 checkpoints (1 valid, 1 not checked); resuming from step 300"


def test_a_legacy_file_says_unverified_unless_its_checksums_were_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.save({**make_state(250), "step": 250}, tmp_path / "model.pt")  # zip: CRC32 per member
    checked_zip = load_latest(tmp_path, log=Recorder())
    assert checked_zip.summary.endswith("resuming from step 250 (legacy format 0.x)")
    unchecked = load_latest(tmp_path, log=Recorder(), verify="structure")
    assert unchecked.summary.endswith("(legacy format 0.x, unverified)")
    raw_pickle_save({**make_state(260), "step": 260}, tmp_path / "older_format.pt")  # no checksums
    assert load_latest(tmp_path, log=Recorder()).summary.endswith("(legacy format 0.x, unverified)")
    checked: list[str] = []

    def verified(handle: Any, kind: Any, where: str) -> bool:
        checked.append(where)
        return True

    monkeypatch.setattr(reader_module, "_verify_legacy", verified)
    result = load_latest(tmp_path, log=Recorder())
    assert result.summary.endswith("resuming from step 260 (legacy format 0.x)")
    assert checked == [str(tmp_path / "older_format.pt")]
    load_latest(tmp_path, log=Recorder(), verify="structure")
    assert len(checked) == 1  # the hook runs where full verification happens only


def test_a_flipped_byte_in_a_legacy_zip_file_is_caught(tmp_path: Path) -> None:
    # Issue 17, item 4: legacy files carry zip CRC32s; a flip in tensor data used to load wrong values.
    write_steps(tmp_path, 100)
    legacy = tmp_path / "model.pt"
    torch.save({"step": 250, "w": torch.arange(4096, dtype=torch.float32)}, legacy)
    data = bytearray(legacy.read_bytes())
    at = data.index(torch.arange(4096, dtype=torch.float32).numpy().tobytes()[4000:4016])
    data[at] ^= 0x01
    legacy.write_bytes(bytes(data))
    result = load_latest(tmp_path, log=Recorder())
    assert (result.step, result.source) == (100, "fallback")
    [diagnostic] = result.diagnostics
    assert (diagnostic.path, diagnostic.kind, diagnostic.step) == (str(legacy), "corrupted", 250)
    assert diagnostic.reason.startswith("checksum mismatch in legacy torch.save member")
    [report, _] = check_candidates(tmp_path)
    assert (report.status, report.reason) == ("corrupted", diagnostic.reason)
    with pytest.raises(CorruptedCheckpointError, match="checksum mismatch in legacy torch.save member"):
        asyncckpt.load(legacy)
    assert asyncckpt.load(legacy, verify="structure").step == 250  # unverified: the flip goes through


def test_a_failed_legacy_verification_is_a_corrupted_candidate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_steps(tmp_path, 100)
    torch.save({**make_state(250), "step": 250}, tmp_path / "model.pt")

    def mismatch(handle: Any, kind: Any, where: str) -> bool:
        raise CorruptedCheckpointError("checksum mismatch in legacy torch.save member 'data/0'", path=where)

    monkeypatch.setattr(reader_module, "_verify_legacy", mismatch)
    result = load_latest(tmp_path, log=Recorder())
    assert (result.step, result.source) == (100, "fallback")
    [diagnostic] = result.diagnostics
    assert (diagnostic.kind, diagnostic.reason, diagnostic.step) == (
        "corrupted",
        "checksum mismatch in legacy torch.save member 'data/0'",
        250,
    )


# --------------------------------------------------------------------------- failure log lines


def test_a_path_that_is_not_utf8_is_escaped_in_the_failure_log(tmp_path: Path) -> None:
    storage = PosixStorage(tmp_path)
    odd = "run-\udcff|x\n"  # a Linux name holding the byte 0xff, a bar and a newline
    stamp = "2026-01-01T00:00:00Z"
    diagnostic = Diagnostic(f"/data/{odd}/step-0000000001.ckpt", "corrupted", "a|b\nc", stamp)
    record_failures(storage, [diagnostic])
    [line] = (tmp_path / FAILED_LOG_NAME).read_text(encoding="utf-8").splitlines()
    assert line == "/data/run-%FF%7Cx%0A/step-0000000001.ckpt|a/b c|2026-01-01T00:00:00Z"


def non_utf8_directory(tmp_path: Path) -> Path:
    """A run directory whose name is not valid UTF-8 (Linux names are bytes), with a good step 1
    and a broken step 2."""
    directory = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"run-\xff")))
    directory.mkdir()
    write_steps(directory, 1)
    (directory / checkpoint_name(2)).write_bytes(b"ASYNCKPT" + bytes(100))
    return directory


def test_a_fallback_in_a_non_utf8_directory_reports_to_a_strict_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Finding P1: the summary event (structlog's default logger prints to stdout) raised
    # UnicodeEncodeError on a stdout that does not write lone surrogates.
    directory = non_utf8_directory(tmp_path)
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)

    result = load_latest(directory)

    assert result.step == 1 and result.source == "fallback"
    out.flush()
    printed = out.buffer.getvalue().decode("ascii")  # type: ignore[attr-defined]
    assert "run-\\xff" in printed and SUMMARY_EVENT in printed
    assert failed_lines(directory)[0][0].endswith("run-%FF/" + checkpoint_name(2))


def test_the_event_fields_are_printable_and_the_diagnostics_keep_the_real_path(tmp_path: Path) -> None:
    directory = non_utf8_directory(tmp_path)
    recorder = Recorder()
    result = load_latest(directory, log=recorder)
    ((_, fields),) = recorder.calls
    assert fields["path"].endswith("run-\\xff/" + checkpoint_name(1))
    assert fields["failures"][0]["path"].endswith("run-\\xff/" + checkpoint_name(2))
    assert result.diagnostics[0].path == str(directory / checkpoint_name(2))  # openable as it is


def test_a_log_that_cannot_print_only_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = non_utf8_directory(tmp_path)
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    out.close()  # writing raises ValueError
    monkeypatch.setattr(sys, "stdout", out)
    with pytest.warns(RuntimeWarning, match="cannot log checkpoint.load.summary"):
        assert load_latest(directory).step == 1


def test_a_legacy_nested_tensor_loads_and_validates_alike(tmp_path: Path) -> None:
    # Finding P2: the loader's tensor index asked a nested tensor for its shape (RuntimeError).
    write_steps(tmp_path, 1)
    nested = torch.nested.nested_tensor([torch.zeros(2), torch.ones(3)])
    torch.save({"nested": nested, "step": 5}, tmp_path / "model-5.pt")

    result = load_latest(tmp_path, log=Recorder())
    reports = check_candidates(tmp_path)

    assert result.step == 5 and result.state["nested"].is_nested
    assert [(r.step, r.status) for r in reports] == [(5, "valid"), (1, "valid")]
    with pytest.raises(asyncckpt.IncompatibleCheckpointError, match="nested is a nested tensor"):
        load_latest(tmp_path, expect={"nested": torch.zeros(5)}, on_corrupt="fail", log=Recorder())
