"""Multi-rank saves and restores on CPU with gloo: FSDP2 (``fully_shard``) MLP + Adam, and a
DDP-replicated model, at world sizes 1, 2 and 4; every world runs under a deadline."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import contract_workers as ct
import dist_workers as workers
import pytest
import torch
from dist_harness import RankResult, run_world

from asyncckpt import catalog
from asyncckpt import dist as adist
from asyncckpt import format as fmt
from asyncckpt.storage import PosixStorage
from asyncckpt.testing import states_equal

pytestmark = pytest.mark.timeout(120)


def all_ok(results: list[RankResult]) -> list[Any]:
    for result in results:
        assert result.ok, f"rank {result.rank} (exit {result.exitcode}): {result.error}: {result.message}"
    return [result.value for result in results]


def record_of(root: Path, step: int) -> adist.CommitRecord:
    return adist.read_record(PosixStorage(root), step)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fsdp_round_trip_at_each_world_size(tmp_path: Path, world: int) -> None:
    saved = all_ok(run_world(workers.save_fsdp, world, str(tmp_path), [1, 2]))
    record = record_of(tmp_path, 2)
    assert record.world_size == world
    assert [s.rank for s in record.shards] == list(range(world))

    restored = all_ok(run_world(workers.restore_fsdp, world, str(tmp_path)))

    assert all(r["step"] == 2 and r["per_rank_restored"] for r in restored)
    assert states_equal(restored[0]["full"], saved[0]["full"])
    for rank in range(world):  # each rank gets its own per-rank values back
        assert restored[rank]["rank"] == rank
        assert states_equal(restored[rank]["rng"], saved[rank]["rng"])


def test_a_group_of_one_sends_dcp_nothing_and_a_rank_reports_one_result(tmp_path: Path) -> None:
    [alone] = all_ok(run_world(workers.collective_payloads, 1, str(tmp_path / "one")))
    pair = all_ok(run_world(workers.collective_payloads, 2, str(tmp_path / "two")))

    dcp = ("SavePlan", "LoadPlan", "Metadata", "list[SavePlan]", "list[LoadPlan]", "list[WriteResult]")
    assert alone and not [kind for kind in alone if kind.startswith(dcp)]  # only our agreement, votes
    # at two ranks DCP gathers each rank's write results: one for its whole shard, not one per item
    assert pair[1].count("list[WriteResult]*1") == 2  # two saves
    assert not [kind for kind in pair[1] if kind.startswith("list[WriteResult]") and kind[-2:] != "*1"]
    # after a save DCP broadcasts its metadata: its tensors, values and locations stay on rank 0
    assert [kind for kind in pair[0] if kind.startswith("Metadata")] == ["Metadata#0"] * 2
    # a load needs nothing of the other ranks: no load plan crosses, at any world size
    assert not [kind for kind in pair[0] + pair[1] if kind.startswith(("LoadPlan", "list[LoadPlan]"))]


def test_the_save_planner_resolves_dtensors_without_to_local() -> None:
    [found] = all_ok(run_world(workers.lookup_without_to_local, 1))

    assert found["items"] > 0 and found["own"] == found["items"] and found["to_local"] == 0


@pytest.mark.parametrize("world", [1, 2])
def test_write_items_are_kept_while_the_sharding_holds_and_replanned_when_it_changes(
    tmp_path: Path, world: int
) -> None:
    results = all_ok(run_world(workers.write_items_kept, world, str(tmp_path)))

    for result in results:
        (hits1, misses1), (hits2, misses2), (hits3, misses3) = result["counts"]
        assert hits1 == 0 and misses1 > 0  # the first save plans every DTensor
        assert (hits2, misses2) == (misses1, 0)  # the same structure: every item kept
        assert hits3 == 0 and misses3 == misses1  # other shapes under the same keys: all replanned
    assert states_equal(results[0]["restored"], results[0]["saved"])


def test_a_load_failing_on_one_rank_fails_every_rank(tmp_path: Path) -> None:
    outcomes = all_ok(run_world(workers.restore_failing_on, 2, str(tmp_path), 1))

    mine = outcomes[1].split("|")
    other = outcomes[0].split("|")
    assert mine[0] == "CheckpointError" and "injected read failure" in mine[2]
    assert other[0] == "CheckpointError" and other[1] == "1" and "rank 1" in other[2]


def test_exact_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path: Path) -> None:
    uninterrupted = all_ok(run_world(workers.save_fsdp, 2, str(tmp_path / "a"), [2], 4))
    all_ok(run_world(workers.save_fsdp, 2, str(tmp_path / "b"), [2]))

    resumed = all_ok(run_world(workers.resume_and_train, 2, str(tmp_path / "b"), 4))

    assert states_equal(resumed[0], uninterrupted[0]["full"])


@pytest.mark.parametrize(("saved_by", "restored_by"), [(2, 1), (2, 4), (4, 2)])
def test_resharding(tmp_path: Path, saved_by: int, restored_by: int) -> None:
    saved = all_ok(run_world(workers.save_fsdp, saved_by, str(tmp_path), [1]))[0]["full"]
    if restored_by == 1:  # a plain process without a process group: this one
        model = workers.mlp(5)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
        restored = adist.restore_latest(tmp_path, {"model": model, "optimizer": optimizer})
        assert restored is not None and restored.step == 1
        got = {
            "model": {k: v.detach() for k, v in model.state_dict().items()},
            "optimizer": adist_optimizer_state(model, optimizer),
        }
        per_rank_restored = restored.per_rank_restored
    else:
        results = all_ok(run_world(workers.restore_fsdp, restored_by, str(tmp_path)))
        assert {r["step"] for r in results} == {1}
        got = results[0]["full"]
        per_rank_restored = results[0]["per_rank_restored"]
    assert states_equal(got, saved)
    assert not per_rank_restored  # reported, not silently mixed up
    full = adist.load_full(tmp_path)  # and a plain process reads it whole
    assert full.world_size == saved_by and [p["rank"] for p in full.per_rank] == list(range(saved_by))
    assert states_equal(full.state["model"], saved["model"])


def adist_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def test_corrupted_shard_of_one_rank_makes_every_rank_fall_back(tmp_path: Path) -> None:
    all_ok(run_world(workers.save_fsdp, 2, str(tmp_path), [1, 2]))
    shard = tmp_path / catalog.shard_name(2, 1)
    with open(shard, "rb") as file:
        layout = fmt.read_layout(file, str(shard))
    with open(shard, "r+b") as file:  # one flipped bit in rank 1's last blob (a DCP item)
        file.seek(layout.blobs[-1].offset)
        byte = file.read(1)[0]
        file.seek(layout.blobs[-1].offset)
        file.write(bytes([byte ^ 0x01]))

    results = all_ok(run_world(workers.restore_fsdp, 2, str(tmp_path)))

    assert [r["step"] for r in results] == [1, 1]
    assert results[0]["diagnostics"] == results[1]["diagnostics"]  # the same on every rank
    [(path, kind, reason)] = results[0]["diagnostics"]
    assert path == str(shard) and kind == "corrupted" and "checksum mismatch" in reason
    lines = (tmp_path / "failed_checkpoints.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{shard}|")  # written once


def test_a_step_one_rank_does_not_see_committed_makes_every_rank_fall_back(tmp_path: Path) -> None:
    all_ok(run_world(workers.save_fsdp, 2, str(tmp_path / "a"), [1, 2]))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / catalog.commit_record_name(2)).unlink()  # rank 1's view lags

    results = all_ok(run_world(ct.restore_each_from, 2, [str(tmp_path / "a"), str(tmp_path / "b")]))

    assert [r["step"] for r in results] == [1, 1]
    for result, view in zip(results, ("a", "b"), strict=True):  # each rank names its own view
        [(path, kind, reason)] = result["diagnostics"]
        assert path == str(tmp_path / view / catalog.commit_record_name(2)) and kind == "incompatible"
        assert "ranks [1] do not see its commit record" in reason


def test_storage_failure_on_one_rank_fails_every_rank_and_commits_nothing(tmp_path: Path) -> None:
    results = all_ok(run_world(workers.save_then_fail, 2, str(tmp_path), 1))

    for result in results:
        assert result["error"] is not None and result["error"]["rank"] == 1 and result["error"]["step"] == 2
        assert "rank 1" in result["error"]["message"] and "injected" in result["error"]["message"]
        assert result["restored"] == 1  # the older step is intact
    assert [info.step for info in catalog.committed_steps(PosixStorage(tmp_path))] == [1]
    assert not (tmp_path / catalog.commit_record_name(2)).exists()


@pytest.mark.parametrize("victim", [0, 1])
def test_rank_killed_after_its_shard_is_durable_commits_nothing(tmp_path: Path, victim: int) -> None:
    results = run_world(workers.save_and_die, 2, str(tmp_path), victim)

    dead, survivor = results[victim], results[1 - victim]
    assert dead.exitcode == -9 and dead.value is None
    assert not survivor.ok and (
        survivor.raised("CheckpointWriteError") or survivor.raised("CoordinationError")
    )
    assert (tmp_path / catalog.shard_name(2, victim)).exists()  # its shard was durable...
    assert not (tmp_path / catalog.commit_record_name(2)).exists()  # ...but nothing was committed
    assert [info.step for info in catalog.committed_steps(PosixStorage(tmp_path))] == [1]
    assert adist.load_full(tmp_path).step == 1


def test_replicated_state_is_written_once_in_total(tmp_path: Path) -> None:
    param_bytes = all_ok(run_world(workers.save_replicated, 2, str(tmp_path)))[0]["param_bytes"]

    record = record_of(tmp_path, 1)
    locations = record.metadata.storage_data
    assert len(locations) == 4 and len({(i.fqn, i.offset) for i in locations}) == 4  # each tensor once
    assert {where.rank for where in locations.values()} == {0, 1}  # spread over the ranks
    on_disk = sum(digest.nbytes for digest in record.shards)
    assert param_bytes <= on_disk < 1.1 * param_bytes  # about one copy, not two


@pytest.mark.parametrize("world", [2, 4])
def test_dtensors_placed_replicate_are_written_once_in_total(tmp_path: Path, world: int) -> None:
    param_bytes = all_ok(run_world(ct.save_replicate_placed, world, str(tmp_path)))[0]["param_bytes"]

    record = record_of(tmp_path, 1)
    locations = record.metadata.storage_data
    assert sorted(i.fqn for i in locations) == ["model.a", "model.b"]  # each tensor once
    on_disk = sum(digest.nbytes for digest in record.shards)
    # one copy and each shard's header, alignment and RNG state (~17 KiB); a second copy is 2x
    assert param_bytes <= on_disk < 1.5 * param_bytes
    full = adist.load_full(tmp_path)
    assert [tuple(full.state["model"][k].shape) for k in ("a", "b")] == [(256, 256)] * 2


def test_mismatched_steps_fail_on_every_rank(tmp_path: Path) -> None:
    results = run_world(workers.mismatched_steps, 2, str(tmp_path), deadline=30)

    for result in results:
        assert result.raised("CoordinationError"), result.message
        assert "rank 0: save step 10, rank 1: save step 11" in result.message
    assert catalog.committed_steps(PosixStorage(tmp_path)) == []


@pytest.mark.parametrize("call", ["save", "restore"])
def test_a_rank_that_does_not_call_ends_in_an_error_not_a_hang(tmp_path: Path, call: str) -> None:
    results = run_world(workers.one_rank_absent, 2, str(tmp_path), call, deadline=30)

    assert results[0].raised("CoordinationError") and "2 s" in results[0].message
    assert results[1].ok
    assert catalog.committed_steps(PosixStorage(tmp_path)) == []


def test_a_restore_against_a_save_fails_on_every_rank(tmp_path: Path) -> None:
    results = run_world(ct.restore_against_save_step, 2, str(tmp_path), deadline=30)

    for result in results:  # the call check, not an error of unpacking each other's messages
        assert result.raised("CoordinationError"), f"{result.error}: {result.message}"
        assert "rank 0: restore, rank 1: save step 1" in result.message
    assert catalog.committed_steps(PosixStorage(tmp_path)) == []


@pytest.mark.parametrize("planners", ["asyncckpt", "dcp-default"])
def test_dcp_save_and_load_with_asyncckpt_writer_and_reader(tmp_path: Path, planners: str) -> None:
    results = all_ok(run_world(workers.dcp_round_trip, 2, str(tmp_path), planners == "asyncckpt"))

    assert results == [True, True]
    record = record_of(tmp_path, 7)
    assert record.world_size == 2 and catalog.committed_steps(PosixStorage(tmp_path))[0].step == 7


def test_dcp_async_save_with_asyncckpt_writer_then_dcp_load(tmp_path: Path) -> None:
    results = all_ok(run_world(ct.dcp_async_round_trip, 2, str(tmp_path)))

    assert results == [True, True]
    assert [info.step for info in catalog.committed_steps(PosixStorage(tmp_path))] == [8]
    assert adist.check_step(tmp_path, 8) == []


@pytest.mark.parametrize("world", [1, 2])
def test_a_step_saved_again_leaves_none_of_its_old_shards_behind(tmp_path: Path, world: int) -> None:
    listings = all_ok(run_world(workers.save_step_twice, world, str(tmp_path)))
    assert listings[0] and all(listing == listings[0] for listing in listings)
    assert not [name for name in listings[0] if name.startswith(".")], listings[0]
