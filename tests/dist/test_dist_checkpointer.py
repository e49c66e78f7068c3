"""AsyncCheckpointer in distributed mode (CPU, gloo): FSDP2 MLP + Adam and DDP at world sizes
1, 2 and 4, saving in the background; every world runs under a deadline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ckpt_workers as cw
import contract_workers as ct
import dist_workers as workers
import pytest
import torch
from dist_harness import RankResult, run_world
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

import asyncckpt
from asyncckpt import catalog
from asyncckpt import dist as adist
from asyncckpt import format as fmt
from asyncckpt.errors import UsageError
from asyncckpt.storage import PosixStorage
from asyncckpt.testing import states_equal

pytestmark = pytest.mark.timeout(180)


def all_ok(results: list[RankResult]) -> list[Any]:
    for result in results:
        assert result.ok, f"rank {result.rank} (exit {result.exitcode}): {result.error}: {result.message}"
    return [result.value for result in results]


def committed(root: Path) -> list[int]:
    return [info.step for info in catalog.committed_steps(PosixStorage(root))]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_exact_resume_after_one_rank_is_killed_mid_save(tmp_path: Path, world: int) -> None:
    """A rank dies (kill -9) while it writes step 4: step 4 never commits, the others fail
    within the timeout, and a restart resumes from step 2 bitwise equal to an uninterrupted run."""
    uninterrupted = all_ok(run_world(cw.train_and_save, world, str(tmp_path / "a"), [2, 4], 6))
    victim = world - 1

    results = run_world(cw.killed_mid_save, world, str(tmp_path / "b"), victim, [2, 4], 6)

    assert results[victim].exitcode == -9
    for result in results:
        if result.rank != victim:  # the survivors end in an error, not a hang
            assert result.ok and "error" in result.value, result.value
    assert committed(tmp_path / "b") == [2]
    assert (tmp_path / "b" / catalog.step_folder_name(4)).is_dir()  # uncommitted leftovers

    resumed = all_ok(run_world(cw.train_and_save, world, str(tmp_path / "b"), [4, 6], 6))

    assert {r["restored"] for r in resumed} == {2}
    assert all(r["metadata"] == {"step": 2} and r["per_rank_restored"] for r in resumed)
    assert states_equal(resumed[0]["full"], uninterrupted[0]["full"])
    assert committed(tmp_path / "b") == [2, 4, 6]  # step 4 written again, whole
    assert adist.check_step(tmp_path / "b", 4) == []


def test_retention_prunes_whole_steps_on_one_rank(tmp_path: Path) -> None:
    (tmp_path / "step-0000000009").mkdir(parents=True)  # left by a save that never committed
    (tmp_path / "step-0000000009" / "rank-00000.ckpt").write_bytes(b"partial")
    (tmp_path / ".step-0000000008.ckpt.tmp-00000000").write_bytes(b"partial")  # a dead writer's

    all_ok(run_world(cw.train_with_retention, 2, str(tmp_path)))

    assert committed(tmp_path) == [2, 4, 5]  # keep_last=1, keep_every=2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".step", "step"))) == [
        "step-0000000002",
        "step-0000000004",
        "step-0000000005",
    ]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    pruned = [e for e in events if e["event"] == "checkpoint.pruned"]
    assert [(e["step"], e["rank"]) for e in pruned] == [(1, 0), (3, 0)]  # whole steps, by rank 0 only
    removed = [e for e in events if e["event"] == "checkpoint.tmp_removed"]
    assert sorted(Path(e["path"]).name for e in removed) == [
        ".step-0000000008.ckpt.tmp-00000000",
        "step-0000000009",
    ]
    assert {e["rank"] for e in removed} == {0}  # cleaned up by one rank, once


@pytest.mark.parametrize(("saved_by", "restored_by"), [(2, 1), (2, 4), (4, 2)])
def test_resharding_through_the_checkpointer(tmp_path: Path, saved_by: int, restored_by: int) -> None:
    saved = all_ok(run_world(cw.train_and_save, saved_by, str(tmp_path), [3], 3))[0]["full"]
    if restored_by == 1:  # a plain process without a process group: this one
        model = workers.mlp(5)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
        with asyncckpt.AsyncCheckpointer(tmp_path) as ckpt:
            restored = ckpt.restore({"model": model, "optimizer": optimizer})
        assert restored is not None and restored.step == 3
        got = {
            "model": {k: v.detach() for k, v in model.state_dict().items()},
            "optimizer": get_optimizer_state_dict(model, optimizer),
        }
        per_rank_restored = restored.per_rank_restored  # type: ignore[attr-defined]
        summaries, rngs = [restored.summary], [restored.state.get("rng")]
    else:
        results = all_ok(run_world(cw.restore_only, restored_by, str(tmp_path)))
        assert {r["step"] for r in results} == {3}
        got, per_rank_restored = results[0]["full"], results[0]["per_rank_restored"]
        summaries, rngs = [r["summary"] for r in results], [r["rng"] for r in results]
    assert states_equal(got, saved)
    # per-rank values (the RNG states) are reported, not silently dropped or mixed up
    assert not per_rank_restored and rngs == [None] * restored_by
    dropped = "per-rank values are not restored at another world size"
    assert all(dropped in summary for summary in summaries), summaries
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    logged = [e for e in events if e["event"] == "checkpoint.dist.restore.summary" and e["step"] == 3]
    assert len(logged) == restored_by and all(dropped in e["summary"] for e in logged)


def test_a_per_rank_object_is_restored_to_its_rank_and_left_alone_at_another_world_size(
    tmp_path: Path,
) -> None:
    same = all_ok(run_world(ct.loader_per_rank, 2, str(tmp_path), True))
    other = all_ok(run_world(ct.loader_per_rank, 4, str(tmp_path), False))

    assert [(r["position"], r["loaded"]) for r in same] == [(100, 1), (101, 1)]
    assert [r["state"] for r in same] == [{"loader": {"position": 100 + rank}} for rank in range(2)]
    assert [(r["position"], r["loaded"], r["state"]) for r in other] == [(-1, 0, {})] * 4


def test_a_plain_process_reads_a_multi_rank_directory(tmp_path: Path) -> None:
    saved = all_ok(run_world(cw.train_and_save, 2, str(tmp_path), [2, 3], 3))[0]["full"]

    infos = asyncckpt.list_checkpoints(tmp_path)
    result = asyncckpt.load_latest(tmp_path)

    assert [(i.step, i.path.name) for i in infos] == [(2, "step-0000000002"), (3, "step-0000000003")]
    assert all(i.size > 0 for i in infos)
    assert result.step == 3 and result.path == tmp_path / "step-0000000003"
    assert result.metadata == {"step": 3}
    assert states_equal(result.state["model"], saved["model"])  # unsharded tensors
    assert [set(values) for values in result.per_rank] == [{"rng"}, {"rng"}]  # type: ignore[attr-defined]


def test_corrupted_shard_of_one_rank_makes_every_rank_fall_back(tmp_path: Path) -> None:
    all_ok(run_world(cw.train_and_save, 2, str(tmp_path), [1, 2], 2))
    shard = tmp_path / catalog.shard_name(2, 1)
    with open(shard, "rb") as file:
        layout = fmt.read_layout(file, str(shard))
    with open(shard, "r+b") as file:  # one flipped bit in rank 1's last blob
        file.seek(layout.blobs[-1].offset)
        byte = file.read(1)[0]
        file.seek(layout.blobs[-1].offset)
        file.write(bytes([byte ^ 0x01]))

    results = all_ok(run_world(cw.restore_only, 2, str(tmp_path)))

    assert [r["step"] for r in results] == [1, 1]
    assert results[0]["diagnostics"] == results[1]["diagnostics"]
    [(path, kind, reason)] = results[0]["diagnostics"]
    assert path == str(shard) and kind == "corrupted" and "checksum mismatch" in reason
    lines = (tmp_path / "failed_checkpoints.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{shard}|")  # written once
    assert "step-0000000002" in results[0]["listing"]  # a read-only use removes nothing


@pytest.mark.parametrize(("op", "err"), [("write", cw.ENOSPC), ("fsync", cw.EIO)])
def test_storage_failure_on_one_rank_fails_the_step_on_every_rank(tmp_path: Path, op: str, err: int) -> None:
    results = all_ok(run_world(cw.storage_fault, 2, str(tmp_path), 1, op, err))

    for rank, result in enumerate(results):
        assert list(result["errors"]) == [2], result["errors"]  # steps 1 and 3 commit
        error = result["errors"][2]
        assert "CheckpointWriteError" in error["classes"] and error["step"] == 2
        assert error["rank"] == 1 and "rank 1" in error["message"] and "injected" in error["message"]
        assert result["injected"] == (1 if rank == 1 else 0)
    assert committed(tmp_path) == [1, 3]
    assert not (tmp_path / catalog.commit_record_name(2)).exists()
    assert adist.check_step(tmp_path, 1) == [] and adist.check_step(tmp_path, 3) == []


@pytest.mark.parametrize("where", ["save", "exit"])
def test_a_write_failure_on_one_rank_reaches_every_rank_at_the_next_save_or_exit(
    tmp_path: Path, where: str
) -> None:
    results = all_ok(run_world(ct.storage_fault_seen_at, 2, str(tmp_path), 1, where))

    for result in results:
        error = result["error"]
        assert error is not None and result["raised_at"] == where, result
        assert "CheckpointWriteError" in error["classes"] and error["step"] == 2
        assert error["rank"] == 1 and "rank 1" in error["message"] and "injected" in error["message"]
    assert committed(tmp_path) == [1]  # nothing of step 2, and the failed save() queued nothing
    assert adist.check_step(tmp_path, 1) == []


@pytest.mark.parametrize("world", [2, 4])
def test_background_coordination_runs_on_its_own_gloo_group(tmp_path: Path, world: int) -> None:
    results = all_ok(run_world(ct.trainer_collectives_during_saves, world, str(tmp_path), deadline=120))

    for result in results:
        assert result["own"] and result["backend"] == "gloo", result
        assert result["wrong"] == 0  # the trainer's all-reduces never met the writer's gathers
        assert result["committed"] == [1, 2, 3, 4, 5]


def test_replicated_state_is_written_once(tmp_path: Path) -> None:
    param_bytes = all_ok(run_world(cw.save_replicated, 2, str(tmp_path)))[0]["param_bytes"]

    record = adist.read_record(PosixStorage(tmp_path), 1)
    assert {where.rank for where in record.metadata.storage_data.values()} == {0, 1}  # spread
    on_disk = sum(digest.nbytes for digest in record.shards)
    assert param_bytes <= on_disk < 1.1 * param_bytes  # about one copy, not two


def test_mismatched_steps_fail_on_every_rank_without_a_hang(tmp_path: Path) -> None:
    results = all_ok(run_world(cw.mismatched_steps, 2, str(tmp_path), deadline=60))

    for result in results:
        error = result["error"]
        assert error is not None and "CheckpointWriteError" in error["classes"], result
        assert error["cause"] == "CoordinationError"
        assert "rank 0: save step 10, rank 1: save step 11" in error["message"]
        assert result["seconds"] < cw.TIMEOUT_S  # found at once, not by a timeout
    assert committed(tmp_path) == []


def test_a_restore_against_a_save_fails_on_every_rank_without_a_hang(tmp_path: Path) -> None:
    restoring, saving = all_ok(run_world(ct.restore_against_background_save, 2, str(tmp_path), deadline=60))

    assert restoring["error"] is not None and restoring["error"]["classes"][0] == "CoordinationError"
    assert saving["error"] is not None and "CheckpointWriteError" in saving["error"]["classes"]
    assert saving["error"]["cause"] == "CoordinationError"
    for result in (restoring, saving):
        assert "rank 0: restore, rank 1: save step 1" in result["error"]["message"], result
        assert result["seconds"] < cw.TIMEOUT_S  # found at once, not by a timeout
    assert committed(tmp_path) == []


def test_after_mismatched_steps_the_next_agreed_step_commits(tmp_path: Path) -> None:
    results = all_ok(run_world(ct.mismatch_then_agree, 2, str(tmp_path), deadline=60))

    for result in results:
        assert result["error"] is not None and result["error"]["cause"] == "CoordinationError"
        assert result["restored"] == 12
    assert committed(tmp_path) == [12]


def test_a_directory_of_single_files_is_not_a_fresh_start_for_several_ranks(tmp_path: Path) -> None:
    with asyncckpt.AsyncCheckpointer(tmp_path) as ckpt:  # this plain process: single files
        ckpt.save(5, {"model": workers.mlp(1)})

    results = run_world(cw.restore_only, 2, str(tmp_path))

    for result in results:  # on every rank, naming the file, rather than a silent fresh start
        assert result.raised("NoValidCheckpointError"), f"{result.error}: {result.message}"
        assert "single-process checkpoints and no multi-rank step" in result.message
    assert [info.step for info in asyncckpt.list_checkpoints(tmp_path)] == [5]  # left as it was


def test_a_rank_that_does_not_save_ends_in_an_error_within_the_timeout(tmp_path: Path) -> None:
    results = all_ok(run_world(cw.one_rank_skips, 2, str(tmp_path), deadline=60))

    error = results[0]["error"]
    assert error is not None and "CheckpointWriteError" in error["classes"] and "2 s" in error["message"]
    assert results[1]["error"] is None
    assert committed(tmp_path) == []


def test_a_checkpointer_opened_on_one_rank_only_ends_in_a_clear_error(tmp_path: Path) -> None:
    results = all_ok(run_world(cw.one_rank_opens, 2, str(tmp_path), deadline=60))

    error = results[0]["error"]
    assert error is not None and "CoordinationError" in error["classes"], results[0]
    assert "not every rank joined" in error["message"] and "use_local_synchronization" in error["message"]
    assert results[0]["seconds"] < 20  # bounded by the timeout, not the trainer's 30 minutes
    record = adist.read_record(PosixStorage(tmp_path), 2)  # a group of one rank saves alone
    assert record.world_size == 1 and committed(tmp_path) == [2]


def test_process_group_picks_the_ranks_of_a_checkpointer(tmp_path: Path) -> None:
    results = all_ok(run_world(ct.pairs_save_apart, 4, str(tmp_path), deadline=90))

    assert [r["step"] for r in results] == [3, 3, 4, 4]
    assert [r["state"] for r in results] == [{"rank": {"global": g}} for g in range(4)]
    assert all(r["equal"] for r in results)
    for pair, step in ((0, 3), (1, 4)):
        record = adist.read_record(PosixStorage(tmp_path / f"pair-{pair}"), step)
        assert record.world_size == 2 and [s.rank for s in record.shards] == [0, 1]  # ranks in the group
        assert committed(tmp_path / f"pair-{pair}") == [step]


def test_a_source_changed_before_its_copy_fails_the_step_everywhere(tmp_path: Path) -> None:
    results = all_ok(run_world(cw.overlap_race, 2, str(tmp_path)))

    for result in results:
        error = result["errors"][1]
        assert "CheckpointWriteError" in error["classes"] and error["step"] == 1
        assert result["committed"] == [2]  # the group stays usable: the next step commits
    assert "changed in place" in results[1]["errors"][1]["message"]
    assert "rank 1" in results[0]["errors"][1]["message"]


def test_the_step_after_a_save_waits_for_the_copy_of_dtensor_shards(tmp_path: Path) -> None:
    results = all_ok(run_world(ct.step_waits_for_the_copy, 2, str(tmp_path)))

    for result in results:  # the local shards went to the background copy, the step waited
        assert result["deferred"] > 0 and not result["done_at_return"]
        assert result["seen"] == [True]
    saved = adist.load_full(tmp_path).state
    expected, after = results[0]["expected"], results[0]["after"]
    assert states_equal(saved["model"], expected["model"])  # the state at save()...
    assert not states_equal(saved["model"], after["model"])  # ...not after the step


def test_usage_errors(tmp_path: Path) -> None:
    [refused] = all_ok(run_world(cw.usage_errors, 1, str(tmp_path)))

    assert refused[0].startswith("skip: ") and "several ranks" in refused[0]
    assert refused[1].startswith("dtensor: ") and "process_group" in refused[1]
    with pytest.raises(UsageError, match="initialized"):
        asyncckpt.AsyncCheckpointer(tmp_path, process_group=object())


def test_async_with_on_several_ranks(tmp_path: Path) -> None:
    results = all_ok(run_world(cw.async_saves, 2, str(tmp_path)))

    assert [r["restored"] for r in results] == [2, 2]
    assert all(r["path"] == str(tmp_path / "step-0000000002") for r in results)
    assert committed(tmp_path) == [1, 2]
