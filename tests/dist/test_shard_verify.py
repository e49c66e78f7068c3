"""What each rank reads back of its shard before reporting it durable: ``AsyncCheckpointer``'s
``verify=`` (the structure by default, as in single-file mode), ``AsyncckptWriter``'s (every
blob by default). Either way the commit record holds every shard's header digest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import verify_workers as vw
from dist_harness import run_world

from asyncckpt import dist as adist
from asyncckpt.dist import shards
from asyncckpt.dist.save import Prepared, solo_or, write_step
from asyncckpt.dist.state import split_state

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(("verify", "read_backs"), [("structure", 0), ("full", 2)])
def test_the_checkpointer_reads_back_what_its_verify_option_says(
    tmp_path: Path, verify: str, read_backs: int
) -> None:
    results = run_world(vw.save_counting_read_backs, 2, str(tmp_path), verify)
    for result in results:
        assert result.ok, f"rank {result.rank}: {result.error}: {result.message}"
        assert result.value == {"read_backs": read_backs}  # one per step, or none
    assert adist.check_step(tmp_path, 2) == []


@pytest.mark.parametrize(("verify", "read_backs"), [("full", 1), ("structure", 0), ("none", 0)])
def test_write_step_reads_back_blobs_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verify: Any, read_backs: int
) -> None:
    calls: list[int] = []
    real = shards.fmt.verify_blobs

    def spy(*args: Any, **kwargs: Any) -> Any:
        if "rank-" in str(kwargs.get("path")):  # a shard file (the commit record is always read)
            calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(shards.fmt, "verify_blobs", spy)
    state = {"model": torch.nn.Linear(8, 8)}

    def prepare() -> Prepared:
        split = split_state(state)
        return Prepared(split.sharded, split.per_rank)

    write_step(tmp_path, 1, prepare, group=solo_or(None), verify=verify)
    assert len(calls) == read_backs
    assert adist.check_step(tmp_path, 1) == []  # the digest in the record matches either way
