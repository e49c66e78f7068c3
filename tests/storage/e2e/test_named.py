"""Checkpoints at names the caller chooses (``last.ckpt``), on object stores: S3 (a moto server)
and fsspec's in-memory filesystem. Saved, replaced, listed, checked, loaded and deleted as on a
local directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import asyncckpt
from asyncckpt.storage import RemotePath, open_storage
from asyncckpt.testing import deterministic_state, states_equal

from ..conftest import s3_options

pytestmark = pytest.mark.timeout(120)

EPOCH, LAST = "epoch=0-step=4.ckpt", "last.ckpt"


def run_of(where: str, request: pytest.FixtureRequest) -> tuple[str, dict[str, Any] | None]:
    """The run's URL and storage options on ``where`` ("s3" or "memory")."""
    if where == "memory":
        return str(request.getfixturevalue("memory_url")), None
    bucket = request.getfixturevalue("bucket")
    return f"s3://{bucket}/run", s3_options(request.getfixturevalue("moto_url"))


@pytest.mark.parametrize("where", ["s3", "memory"])
def test_named_saves_are_listed_loaded_and_deleted(
    where: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url, options = run_of(where, request)
    with asyncckpt.AsyncCheckpointer(
        url, storage_options=options, keep_last=None, event_log=tmp_path / "events"
    ) as ckpt:
        first = ckpt.save(4, deterministic_state(4), name=EPOCH).result(timeout=30)
        ckpt.save(4, deterministic_state(4), name=LAST).result(timeout=30)
        last = ckpt.save(8, deterministic_state(8), name=LAST).result(timeout=30)
    assert (first, last) == (f"{url}/{EPOCH}", f"{url}/{LAST}")
    assert isinstance(last, RemotePath) and last.name == LAST

    storage = open_storage(url, storage_options=options)
    assert [o.name for o in storage.ls()] == [EPOCH, LAST]
    assert storage.leftovers() == []  # the first last.ckpt was superseded and removed
    reports = asyncckpt.check_candidates(url, storage_options=options)
    assert [(r.step, r.path, r.status) for r in reports] == [(8, last, "valid"), (4, first, "valid")]
    [single] = asyncckpt.check_candidates(last, storage_options=options)  # a named file's URL
    assert (single.step, single.path, single.status) == (8, last, "valid")

    loaded = asyncckpt.load(last, storage_options=options)
    assert loaded.step == 8 and states_equal(loaded.state, deterministic_state(8))
    latest = asyncckpt.load_latest(url, storage_options=options)
    assert (latest.step, latest.path) == (8, last) and states_equal(latest.state, deterministic_state(8))

    with asyncckpt.AsyncCheckpointer(
        url, storage_options=options, keep_last=None, event_log=tmp_path / "events"
    ) as ckpt:
        ckpt.delete(LAST)
        ckpt.delete("never-written.ckpt")  # not an error

    assert [o.name for o in storage.ls()] == [EPOCH] and storage.leftovers() == []
    latest = asyncckpt.load_latest(url, storage_options=options)
    assert (latest.step, latest.path) == (4, first) and states_equal(latest.state, deterministic_state(4))
    with pytest.raises(FileNotFoundError):
        asyncckpt.load(last, storage_options=options)
