"""save_step / restore_latest / load_full and the DCP adapter in a plain process (no process
group): one rank, the same files, the same rollback, and never any pickle."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile import Boom, no_unpickling, plain_model_and_optimizer, plant
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import save

import asyncckpt
from asyncckpt import catalog
from asyncckpt import dist as adist
from asyncckpt import format as fmt
from asyncckpt.errors import (
    CheckpointError,
    CheckpointWriteError,
    CorruptedCheckpointError,
    NoValidCheckpointError,
    UnsupportedValueError,
    UsageError,
)
from asyncckpt.storage import PosixStorage
from asyncckpt.testing import FaultyOps, RecordingOps, states_equal

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Loader:
    """A per-rank object with its own state (a data loader's position)."""

    def __init__(self, position: int = 0) -> None:
        self.position = position

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "order": (3, 1, 2)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    return get_optimizer_state_dict(model, optimizer)


def save_two_steps(root: Path) -> dict[int, Any]:
    """Steps 1 and 2 of a plain model + Adam; what each step held."""
    model, optimizer = plain_model_and_optimizer()
    held = {}
    for step in (1, 2):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        rng = asyncckpt.rng_state()
        adist.save_step(
            root, step, {"model": model, "optimizer": optimizer, "rng": rng, "loader": Loader(step)}
        )
        held[step] = {
            "model": get_model_state_dict(model),
            "optimizer": optimizer_state(model, optimizer),
            "rng": rng,
        }
        held[step] = {k: _clone(v) for k, v in held[step].items()}
    return held


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_clone(v) for v in value)
    return value


def restore(root: Path) -> tuple[adist.RestoredStep | None, torch.nn.Module, torch.optim.Optimizer, Loader]:
    model, optimizer = plain_model_and_optimizer(seed=9)
    loader = Loader()
    restored = adist.restore_latest(root, {"model": model, "optimizer": optimizer, "loader": loader})
    return restored, model, optimizer, loader


def test_round_trip(tmp_path: Path) -> None:
    held = save_two_steps(tmp_path)

    restored, model, optimizer, loader = restore(tmp_path)

    assert restored is not None and restored.step == 2 and restored.source == "primary"
    assert restored.saved_world_size == 1 and restored.per_rank_restored and restored.diagnostics == []
    assert states_equal(get_model_state_dict(model), held[2]["model"])
    assert states_equal(optimizer_state(model, optimizer), held[2]["optimizer"])
    assert states_equal(restored.state["rng"], held[2]["rng"]) and loader.position == 2
    assert restored.state["loader"] == {"position": 2, "order": (3, 1, 2)}  # tuples stay tuples
    assert sorted(p.name for p in (tmp_path / "step-0000000002").iterdir()) == [
        "commit.record",
        "rank-00000.ckpt",
    ]


def test_load_full_returns_every_value_whole(tmp_path: Path) -> None:
    held = save_two_steps(tmp_path)

    full = adist.load_full(tmp_path)

    assert full.step == 2 and full.world_size == 1 and full.diagnostics == []
    assert states_equal(full.state["model"], held[2]["model"])
    assert states_equal(full.state["optimizer"], held[2]["optimizer"])
    assert full.per_rank[0]["loader"] == {"position": 2, "order": (3, 1, 2)}
    assert adist.load_full(tmp_path, step=1).step == 1


def test_an_empty_directory_is_a_fresh_start(tmp_path: Path) -> None:
    assert restore(tmp_path)[0] is None
    with pytest.raises(NoValidCheckpointError) as caught:
        adist.load_full(tmp_path)
    assert caught.value.diagnostics == []


def test_a_step_without_commit_record_does_not_exist(tmp_path: Path) -> None:
    save_two_steps(tmp_path)
    (tmp_path / catalog.commit_record_name(2)).unlink()

    restored = restore(tmp_path)[0]

    assert restored is not None and restored.step == 1 and restored.diagnostics == []
    assert adist.load_full(tmp_path).step == 1


def test_a_corrupted_shard_falls_back_with_a_diagnostic(tmp_path: Path) -> None:
    held = save_two_steps(tmp_path)
    shard = tmp_path / catalog.shard_name(2, 0)
    with open(shard, "rb") as file:
        layout = fmt.read_layout(file, str(shard))
    data = bytearray(shard.read_bytes())
    data[layout.blobs[-2].offset] ^= 0x40
    shard.write_bytes(bytes(data))

    restored, model, _, loader = restore(tmp_path)

    assert restored is not None and restored.step == 1 and restored.source == "fallback"
    [diagnostic] = restored.diagnostics
    assert diagnostic.path == str(shard) and diagnostic.kind == "corrupted" and diagnostic.step == 2
    assert states_equal(get_model_state_dict(model), held[1]["model"]) and loader.position == 1
    assert (tmp_path / catalog.FAILED_LOG_NAME).read_text().startswith(f"{shard}|")
    full = adist.load_full(tmp_path)
    assert full.step == 1 and [d.path for d in full.diagnostics] == [str(shard)]


def test_on_corrupt_fail_raises_for_the_newest_step_and_loads_nothing(tmp_path: Path) -> None:
    save_two_steps(tmp_path)
    shard = tmp_path / catalog.shard_name(2, 0)
    with open(shard, "rb") as file:
        layout = fmt.read_layout(file, str(shard))
    data = bytearray(shard.read_bytes())
    data[layout.blobs[0].offset] ^= 0x01
    shard.write_bytes(bytes(data))
    model, optimizer = plain_model_and_optimizer(seed=9)
    before = _clone(get_model_state_dict(model))

    with pytest.raises(CorruptedCheckpointError) as caught:
        adist.restore_latest(tmp_path, {"model": model, "optimizer": optimizer}, on_corrupt="fail")

    assert caught.value.path == str(shard) and caught.value.step == 2
    assert states_equal(get_model_state_dict(model), before)  # step 1 was not loaded either
    assert (tmp_path / catalog.FAILED_LOG_NAME).read_text().startswith(f"{shard}|")


def test_no_valid_step_raises_with_every_diagnostic(tmp_path: Path) -> None:
    save_two_steps(tmp_path)
    for step in (1, 2):
        (tmp_path / catalog.shard_name(step, 0)).write_bytes(b"garbage")

    with pytest.raises(NoValidCheckpointError) as caught:
        restore(tmp_path)

    assert [d.step for d in caught.value.diagnostics] == [2, 1]


def test_objects_that_do_not_fit_are_incompatible(tmp_path: Path) -> None:
    save_two_steps(tmp_path)
    other = torch.nn.Linear(3, 3)

    with pytest.raises(NoValidCheckpointError) as caught:
        adist.restore_latest(tmp_path, {"model": other})

    assert {d.kind for d in caught.value.diagnostics} == {"incompatible"}


@pytest.mark.parametrize("fqn", ["optimizer.param_groups.0.lr", "optimizer.param_groups.0.params"])
def test_a_pickle_planted_in_a_shard_is_never_unpickled(tmp_path: Path, fqn: str) -> None:
    save_two_steps(tmp_path)
    marker = tmp_path / "unpickled"
    plant(tmp_path, 2, fqn, pickle.dumps(Boom(marker)))

    with no_unpickling() as calls:
        restored = restore(tmp_path)[0]
        with pytest.raises(NoValidCheckpointError):
            adist.load_full(tmp_path, step=2)
        model, optimizer = plain_model_and_optimizer()
        target = {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
        }
        with pytest.raises(BaseException) as caught:  # DCP's own default planner, our reader
            load(target, storage_reader=adist.AsyncckptReader(tmp_path, 2), planner=DefaultLoadPlanner())
        assert "does not decode" in str(caught.value)

    assert restored is not None and restored.step == 1
    assert "does not decode" in restored.diagnostics[0].reason
    assert calls == [] and not marker.exists()


def test_dcp_with_its_default_planners_never_pickles(tmp_path: Path) -> None:
    model, optimizer = plain_model_and_optimizer()
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    saved_dumps = pickle.dumps, torch.save

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickled")

    pickle.dumps, torch.save = refused, refused  # type: ignore[assignment]
    try:
        save(state, storage_writer=adist.AsyncckptWriter(tmp_path, 3), no_dist=True)
    finally:
        pickle.dumps, torch.save = saved_dumps
    model2, optimizer2 = plain_model_and_optimizer(seed=5)
    target = {
        "model": get_model_state_dict(model2),
        "optimizer": get_optimizer_state_dict(model2, optimizer2),
    }
    with no_unpickling() as calls:
        load(target, storage_reader=adist.AsyncckptReader(tmp_path), no_dist=True)
    assert calls == [] and states_equal(target, state)


def test_planners_that_would_pickle_are_refused(tmp_path: Path) -> None:
    class PicklingSavePlanner(DefaultSavePlanner):
        def transform_object(self, write_item: Any, object: Any) -> Any:  # noqa: A002
            return super().transform_object(write_item, object)

    class PicklingLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            super().load_bytes(read_item, value)

    model, optimizer = plain_model_and_optimizer()
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    with pytest.raises(BaseException, match="transform_object"):
        save(
            state,
            storage_writer=adist.AsyncckptWriter(tmp_path, 1),
            planner=PicklingSavePlanner(),
            no_dist=True,
        )
    save(state, storage_writer=adist.AsyncckptWriter(tmp_path, 1), no_dist=True)
    with pytest.raises(BaseException, match="load_bytes"):
        load(
            state,
            storage_reader=adist.AsyncckptReader(tmp_path, 1),
            planner=PicklingLoadPlanner(),
            no_dist=True,
        )


def test_resaving_a_committed_step_replaces_it_whole(tmp_path: Path) -> None:
    model, optimizer = plain_model_and_optimizer()
    adist.save_step(tmp_path, 3, {"model": model, "n": 1})
    with torch.no_grad():
        model[0].weight.add_(1.0)
    adist.save_step(tmp_path, 3, {"model": model, "n": 2})

    full = adist.load_full(tmp_path)

    assert full.per_rank[0]["n"] == 2 and torch.equal(
        full.state["model"]["0.weight"], model[0].weight.detach()
    )


def test_a_failed_resave_leaves_no_half_step(tmp_path: Path) -> None:
    model, _ = plain_model_and_optimizer()
    adist.save_step(tmp_path, 2, {"model": model})
    adist.save_step(tmp_path, 3, {"model": model})

    with pytest.raises(CheckpointWriteError) as caught:
        adist.save_step(PosixStorage(tmp_path, ops=FaultyOps("fsync", err=errno.EIO)), 3, {"model": model})

    assert caught.value.step == 3 and caught.value.rank == 0
    assert [info.step for info in catalog.committed_steps(PosixStorage(tmp_path))] == [2]
    assert adist.load_full(tmp_path).step == 2


def test_values_that_cannot_be_stored_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedValueError):
        adist.save_step(tmp_path, 1, {"bad": object()})
    orphan = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(UsageError, match="belong to one module"):
        adist.save_step(tmp_path, 1, {"model": torch.nn.Linear(2, 2), "optimizer": orphan})
    with pytest.raises(UsageError):
        adist.save_step(tmp_path, -1, {})
    assert catalog.committed_steps(PosixStorage(tmp_path)) == []


def test_readers_only_read_committed_steps(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        adist.AsyncckptReader(tmp_path).read_metadata()
    with pytest.raises(FileNotFoundError):
        adist.read_record(PosixStorage(tmp_path), 1)
    assert isinstance(CheckpointError("x"), Exception)


def test_plan_caching_reuses_the_plan_and_keeps_every_step_right(tmp_path: Path) -> None:
    model, optimizer = plain_model_and_optimizer()
    held = {}
    for step in (1, 2, 3):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        adist.save_step(tmp_path, step, {"model": model, "optimizer": optimizer}, plan_caching=True)
        held[step] = _clone(
            {"model": get_model_state_dict(model), "optimizer": optimizer_state(model, optimizer)}
        )

    for step in (1, 2, 3):
        full = adist.load_full(tmp_path, step=step)
        assert states_equal(full.state, held[step]), step


def test_check_step_names_each_broken_file(tmp_path: Path) -> None:
    save_two_steps(tmp_path)
    shard = tmp_path / catalog.shard_name(2, 0)
    data = bytearray(shard.read_bytes())
    data[4096] ^= 0x01  # the first blob
    shard.write_bytes(bytes(data))
    (tmp_path / catalog.commit_record_name(1)).unlink()

    assert adist.check_step(tmp_path, 2)[0].path == str(shard)
    [missing] = adist.check_step(tmp_path, 1)
    assert "never committed" in missing.reason
    adist.save_step(tmp_path, 3, {"model": torch.nn.Linear(2, 2), "n": 3})
    assert adist.check_step(tmp_path, 3) == []


def test_a_restore_reads_each_shard_header_once(tmp_path: Path) -> None:
    save_two_steps(tmp_path)
    opened: list[str] = []

    class Counting(PosixStorage):
        def open(self, name: str) -> Any:
            opened.append(name)
            return super().open(name)

    model, optimizer = plain_model_and_optimizer()
    restored = adist.restore_latest(Counting(tmp_path), {"model": model, "optimizer": optimizer})

    assert restored is not None and restored.step == 2 and restored.state["loader"]["position"] == 2
    assert opened.count(catalog.shard_name(2, 0)) == 1  # the vote's shard files serve the load


def test_the_collector_pauses_while_a_step_is_written_and_resumes_even_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    from asyncckpt.dist import storage as dist_storage

    during: list[bool] = []
    real = dist_storage.write_shard

    def spy(*args: Any, **kwargs: Any) -> Any:
        during.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(dist_storage, "write_shard", spy)
    adist.save_step(tmp_path, 1, {"model": torch.nn.Linear(2, 2)})
    assert during == [False] and gc.isenabled()

    with pytest.raises(UnsupportedValueError):
        adist.save_step(tmp_path, 2, {"model": torch.nn.Linear(2, 2), "bad": object()})
    assert gc.isenabled()


def test_the_commit_record_is_made_durable_last_after_the_shard(tmp_path: Path) -> None:
    ops = RecordingOps()
    model, optimizer = plain_model_and_optimizer()

    adist.save_step(PosixStorage(tmp_path, ops=ops), 1, {"model": model, "optimizer": optimizer})

    folder = tmp_path / catalog.step_folder_name(1)
    seen = []
    for name, target in ops.calls:
        if name in ("write", "close"):
            continue
        if name == "rename":  # temp name in the same folder -> final name
            source, target = target
            assert source.parent == target.parent == folder and source.name.startswith(f".{target.name}.tmp-")
        elif name == "open_exclusive":
            target = target.name.partition(".tmp-")[0]
        seen.append((name, target if name != "fsync" else None))
    assert seen == [
        ("mkdir", folder),
        ("fsync_dir", tmp_path),  # the folder is durable before any file in it
        ("open_exclusive", ".rank-00000.ckpt"),
        ("fsync", None),
        ("rename", folder / "rank-00000.ckpt"),
        ("fsync_dir", folder),  # the shard is durable (data and name)...
        ("open_exclusive", ".commit.record"),  # ...before the record is begun
        ("fsync", None),
        ("rename", folder / "commit.record"),  # the commit
        ("fsync_dir", folder),
    ]
