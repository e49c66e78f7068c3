"""AsyncCheckpointer, load_latest, restore and one-shot save/load end to end against S3 (a moto
server on 127.0.0.1, s3fs as the client): round trips, fallback past broken steps, parallel ranged
reads, injected faults, a trainer killed mid-upload and mid-retention, and the local copy."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt import format as fmt
from asyncckpt.catalog import FAILED_LOG_NAME, checkpoint_name
from asyncckpt.errors import CheckpointWriteError
from asyncckpt.events import LOCAL_COPY_IGNORED, LOCAL_COPY_USED, PRUNE_FAILED, TMP_REMOVED
from asyncckpt.storage import RemotePath
from asyncckpt.storage.remote import FsspecStorage

from ..conftest import PART, raw_s3, s3_options
from ..faultproxy import Fault, FaultProxy

pytestmark = pytest.mark.timeout(120)

MakeS3 = Callable[..., FsspecStorage]


def model(seed: int, width: int = 32) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 4))


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def keys(moto_url: str, bucket: str, prefix: str = "run") -> list[str]:
    return sorted(k.rpartition("/")[2] for k in raw_s3(moto_url).find(f"{bucket}/{prefix}"))


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- round trips


def test_a_run_saves_to_s3_and_resumes_from_it(moto_url: str, bucket: str, tmp_path: Path) -> None:
    url, options = f"s3://{bucket}/run/", s3_options(moto_url)
    models = [model(step) for step in range(4)]
    with asyncckpt.AsyncCheckpointer(
        url, storage_options=options, keep_last=2, event_log=tmp_path / "e"
    ) as ckpt:
        handles = [ckpt.save(step, {"model": m, "step": step}) for step, m in enumerate(models)]
        paths = [handle.result(30) for handle in handles]
    assert paths == [f"s3://{bucket}/run/{checkpoint_name(s)}" for s in range(4)]
    assert all(isinstance(p, RemotePath) for p in paths) and paths[0].name == checkpoint_name(0)

    listed = asyncckpt.list_checkpoints(url, storage_options=options)
    assert [(c.step, c.path) for c in listed] == [(2, paths[2]), (3, paths[3])]  # retention: keep_last=2
    assert len(keys(moto_url, bucket)) == 4  # a data and a commit object per kept step, nothing else

    fresh = model(9)
    with asyncckpt.AsyncCheckpointer(url, storage_options=options, event_log=tmp_path / "e") as ckpt:
        result = ckpt.restore({"model": fresh})
    assert result is not None and (result.step, result.path, result.source) == (3, paths[3], "primary")
    assert same(fresh, models[3])
    latest = asyncckpt.load_latest(url, storage_options=options)
    assert latest.state["step"] == 3 and latest.path == paths[3]
    reports = asyncckpt.check_candidates(url, storage_options=options)
    assert [(r.step, r.status, r.path) for r in reports] == [(3, "valid", paths[3]), (2, "valid", paths[2])]
    [single] = asyncckpt.check_candidates(paths[2], storage_options=options)
    assert (single.step, single.status) == (2, "valid")


async def test_an_async_run_saves_to_s3(moto_url: str, bucket: str, tmp_path: Path) -> None:
    url, options = f"s3://{bucket}/run", s3_options(moto_url)
    saved = model(1)
    async with asyncckpt.AsyncCheckpointer(url, storage_options=options, event_log=tmp_path / "e") as ckpt:
        path = await await_save(ckpt, saved)
    assert path == f"{url}/{checkpoint_name(5)}"
    fresh = model(2)
    asyncckpt.restore(url, {"model": fresh}, storage_options=options)
    assert same(fresh, saved)


async def await_save(ckpt: asyncckpt.AsyncCheckpointer, saved: torch.nn.Module) -> Any:
    handle = await ckpt.asave(5, {"model": saved})
    return await handle


def test_a_fresh_remote_run_has_nothing_to_restore(moto_url: str, bucket: str) -> None:
    with asyncckpt.AsyncCheckpointer(f"s3://{bucket}/new", storage_options=s3_options(moto_url)) as ckpt:
        assert ckpt.restore({"model": model(0)}) is None
        assert ckpt.event_log_path is None  # nothing to append to in a bucket: structlog's logger


def test_one_shot_save_and_load_take_urls(moto_url: str, bucket: str) -> None:
    options = s3_options(moto_url)
    state = {"model": model(3).state_dict(), "note": "hi"}
    path = asyncckpt.save(f"s3://{bucket}/one/model.ckpt", state, step=7, storage_options=options)
    assert path == f"s3://{bucket}/one/model.ckpt" and isinstance(path, RemotePath)
    loaded = asyncckpt.load(path, storage_options=options)
    assert (loaded.step, loaded.path, loaded.state["note"]) == (7, path, "hi")
    assert all(torch.equal(loaded.state["model"][k], v) for k, v in state["model"].items())


# --------------------------------------------------------------------------- fallback and reads


def test_restore_falls_back_past_broken_steps(moto_url: str, bucket: str, make_s3: MakeS3) -> None:
    storage = make_s3()
    models = {step: model(step) for step in (1, 2, 3)}
    with asyncckpt.AsyncCheckpointer(storage, keep_last=5, event_log=None) as ckpt:
        for step, m in models.items():
            ckpt.save(step, {"model": m})
    fs = raw_s3(moto_url)
    data3 = next(k for k in fs.find(storage.root) if checkpoint_name(3) in k and k.endswith(".data"))
    broken = bytearray(fs.cat_file(data3))
    broken[fmt.read_layout(io.BytesIO(broken), "x").blobs[0].offset + 3] ^= 0xFF  # a tensor byte
    fs.pipe_file(data3, bytes(broken))
    commit2 = next(k for k in fs.find(storage.root) if checkpoint_name(2) in k and k.endswith(".commit"))
    fs.pipe_file(commit2, b'{"not": "a record"}')

    fresh = model(0)
    result = asyncckpt.restore(storage.location, {"model": fresh}, storage_options=s3_options(moto_url))
    assert (result.step, result.source) == (1, "fallback") and same(fresh, models[1])
    corrupt3, corrupt2 = result.diagnostics
    assert corrupt3.path == f"{storage.location}/{checkpoint_name(3)}" and corrupt3.kind == "corrupted"
    assert corrupt3.reason.startswith("checksum mismatch in ")
    assert corrupt2.reason.startswith("commit object is damaged")
    log = fs.cat_file(f"{storage.root}/{FAILED_LOG_NAME}").decode().splitlines()
    assert [line.split("|")[0] for line in log] == [corrupt3.path, corrupt2.path]


def test_restore_reads_blobs_with_few_ranged_gets_and_lists_once(
    moto_url: str, bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    url, options = f"s3://{bucket}/run", s3_options(proxy.url)
    state = {f"layer{i}": torch.randn(1000) for i in range(200)}  # 200 blobs, 800 KB
    asyncckpt.save(f"{url}/{checkpoint_name(1)}", state, step=1, storage_options=options)
    proxy.reset()

    assert [c.step for c in asyncckpt.list_checkpoints(url, storage_options=options)] == [1]
    assert [(r.method, "list-type=2" in r.query) for r in proxy.requests] == [("GET", True)]  # one LIST
    proxy.reset()
    loaded = asyncckpt.load_latest(url, storage_options=options)

    assert all(torch.equal(loaded.state[k], v) for k, v in state.items())
    ranges = [r.headers.get("range") for r in proxy.seen("GET", path=".data")]
    assert len(ranges) == 3 and ranges[0] == "bytes=0-4095"  # the prelude; the trailer and header
    blobs = ranges[2]  # then every blob in one request (800 KB: one span)
    assert blobs is not None and blobs.startswith("bytes=4096-")
    # two LISTs (layout: single files or multi-rank steps; discovery, which the open reuses), the
    # commit record, three ranges. Follow-up: share the layout LIST with discovery to get to one.
    assert sum("list-type=2" in r.query for r in proxy.requests) == 2
    assert len(proxy.requests) == 6


# --------------------------------------------------------------------------- injected faults


@pytest.mark.parametrize(
    "fault",
    [
        Fault("500", method="PUT", query="partNumber", times=2),
        Fault("drop", method="PUT", query="partNumber", times=2),
        Fault("lost", method="PUT", path=".commit"),
        Fault("503", method="GET", query="list-type", times=2),
        Fault("truncate", method="GET", path=".data", times=3),  # read back, then restored
        Fault("drop", method="GET", path=".data", times=3),
    ],
    ids=lambda f: f"{f.action}-{f.method}-{f.query or f.path}",
)
def test_transient_faults_are_retried_and_the_save_commits(
    make_s3: MakeS3, proxy: FaultProxy, fault: Fault
) -> None:
    storage = make_s3(endpoint=proxy.url)
    saved = model(4, width=200)  # ~160 KB: several parts
    proxy.add(fault)
    with asyncckpt.AsyncCheckpointer(storage, event_log=None) as ckpt:
        assert ckpt.save(1, {"model": saved}).result(30) == f"{storage.location}/{checkpoint_name(1)}"
    assert fault.times == 0
    fresh = model(0, width=200)
    asyncckpt.restore(storage, {"model": fresh})
    assert same(fresh, saved) and storage.leftovers() == []


def test_an_upload_that_keeps_failing_is_a_clean_checkpoint_write_error(
    make_s3: MakeS3, proxy: FaultProxy, moto_url: str
) -> None:
    storage = make_s3(endpoint=proxy.url)
    first = model(1, width=200)
    with asyncckpt.AsyncCheckpointer(storage, event_log=None) as ckpt:
        ckpt.save(1, {"model": first}).result(30)
        proxy.add(Fault("500", method="PUT", query="partNumber", times=-1))
        handle = ckpt.save(2, {"model": model(2, width=200)})
        with pytest.raises(CheckpointWriteError) as caught:
            handle.result(30)
    error = caught.value
    assert error.path == f"{storage.location}/{checkpoint_name(2)}" and error.step == 2
    assert "nothing was committed" in error.reason
    proxy.reset()
    assert [c.step for c in asyncckpt.list_checkpoints(storage)] == [1] and storage.leftovers() == []
    bucket = storage.root.partition("/")[0]
    assert not raw_s3(moto_url).call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")
    fresh = model(0, width=200)
    asyncckpt.restore(storage, {"model": fresh})
    assert same(fresh, first)


# --------------------------------------------------------------------------- crashes


@pytest.mark.parametrize("stage", ["upload", "durable", "prune"])
def test_a_trainer_killed_mid_save_leaves_older_steps_and_the_next_start_cleans_up(
    make_s3: MakeS3, moto_url: str, bucket: str, stage: str, tmp_path: Path
) -> None:
    storage = make_s3()
    log = tmp_path / "events.jsonl"
    config = {"url": storage.location, "options": s3_options(moto_url), "part_size": PART}
    config |= {"stage": stage, "events": str(log)}
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("trainer_child.py")), json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert child.stdout is not None
        # With "prune", step 3's handle resolves before its retention runs: "saved 3" comes first.
        lines = [child.stdout.readline().strip() for _ in range(4 if stage == "prune" else 3)]
        live = keys(moto_url, bucket)
        assert storage.leftovers() == []  # the trainer is alive: nothing of its is anyone's to remove
        with asyncckpt.AsyncCheckpointer(storage, event_log=tmp_path / "other.jsonl"):
            pass  # a second process starting on the same run
        assert keys(moto_url, bucket) == live
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert lines == [
        "saved 1",
        "saved 2",
        *(["saved 3"] if stage == "prune" else []),
        {"upload": "uploading", "durable": "durable", "prune": "pruning"}[stage],
    ]

    committed = [2, 3] if stage == "prune" else [1, 2]  # step 1's commit object went first
    assert [c.step for c in asyncckpt.list_checkpoints(storage)] == committed
    before = keys(moto_url, bucket)
    loaded = asyncckpt.load_latest(storage)  # read-only use deletes nothing
    assert loaded.step == committed[-1] and float(loaded.state["model"]["weight"][0, 0]) == committed[-1]
    assert keys(moto_url, bucket) == before and storage.leftovers()

    with asyncckpt.AsyncCheckpointer(storage, event_log=log, keep_last=None) as ckpt:  # the next run
        assert ckpt.restore({}) is not None and keys(moto_url, bucket) == before  # opening removes nothing
        ckpt.save(99, {"probe": 99}).result(timeout=60)  # the first save cleans up
        ckpt.delete(checkpoint_name(99))
    assert storage.leftovers() == [] and len(keys(moto_url, bucket)) == 2 * len(committed)
    assert not raw_s3(moto_url).call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")
    removed = [e["path"] for e in events(log) if e["event"] == TMP_REMOVED]
    assert removed and all(p.startswith(storage.location) for p in removed)


def test_retention_that_fails_between_commit_and_data_leaves_no_half_checkpoint(
    make_s3: MakeS3, moto_url: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = make_s3()
    log = tmp_path / "events.jsonl"
    delete = storage.store.delete
    calls: list[list[str]] = []

    def delete_commits_only(names: list[str]) -> None:
        calls.append(list(names))
        if names and all(n.endswith(".data") for n in names):
            raise OSError("connection lost after the commit objects went")
        delete(names)

    monkeypatch.setattr(storage.store, "delete", delete_commits_only)
    with asyncckpt.AsyncCheckpointer(storage, keep_last=1, event_log=log) as ckpt:
        ckpt.save(1, {"model": model(1)}).result(30)
        ckpt.save(2, {"model": model(2)}).result(30)  # retention removes step 1: commit, then fails
    [failed] = [e for e in events(log) if e["event"] == PRUNE_FAILED]
    assert failed["steps"] == [1]
    assert [c.step for c in asyncckpt.list_checkpoints(storage)] == [2]
    with pytest.raises(FileNotFoundError):
        storage.open(checkpoint_name(1))  # its data object is there, but never readable
    [leftover] = storage.leftovers()
    assert leftover.startswith(checkpoint_name(1)) and leftover.endswith(".data")
    monkeypatch.setattr(storage.store, "delete", delete)
    with asyncckpt.AsyncCheckpointer(storage, keep_last=1, event_log=log) as ckpt:
        assert storage.leftovers() == [leftover]  # opening removes nothing
        ckpt.save(3, {"model": model(3)}).result(30)  # the first save removes it (retention: step 2)
    assert storage.leftovers() == [] and len(keys(moto_url, bucket)) == 2


# --------------------------------------------------------------------------- the local copy


def test_the_local_copy_is_preferred_when_it_matches_and_ignored_when_not(
    bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    url, options, cache = f"s3://{bucket}/run", s3_options(proxy.url), tmp_path / "cache"
    models = [model(1), model(2)]
    with asyncckpt.AsyncCheckpointer(url, storage_options=options, local_copy=cache) as ckpt:
        for step, m in enumerate(models, start=1):
            ckpt.save(step, {"model": m}).result(30)
    assert sorted(os.listdir(cache)) == ["events.jsonl", checkpoint_name(2)]  # the newest step only

    def resume() -> tuple[torch.nn.Module, int]:
        fresh = model(0)
        proxy.reset()
        with asyncckpt.AsyncCheckpointer(url, storage_options=options, local_copy=cache) as ckpt:
            result = ckpt.restore({"model": fresh})
        assert result is not None and result.step == 2 and result.path == f"{url}/{checkpoint_name(2)}"
        return fresh, len(proxy.seen("GET", path=".data"))

    fresh, data_gets = resume()
    assert same(fresh, models[1]) and data_gets == 0  # read from local disk, checked against the record
    local = cache / checkpoint_name(2)
    damaged = bytearray(local.read_bytes())
    damaged[5000] ^= 0xFF
    local.write_bytes(bytes(damaged))
    fresh, data_gets = resume()
    assert same(fresh, models[1]) and data_gets > 0  # from the bucket
    seen = [e for e in events(cache / "events.jsonl") if e["event"] in (LOCAL_COPY_USED, LOCAL_COPY_IGNORED)]
    assert [e["event"] for e in seen] == [LOCAL_COPY_USED, LOCAL_COPY_IGNORED]
    assert seen[1]["reason"].startswith("part 1 differs from the remote commit")
