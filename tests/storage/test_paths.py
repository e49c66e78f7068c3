"""Paths in results: a Path locally, a RemotePath (the URL, never folded into ``s3:/``) remotely."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from asyncckpt.storage import RemotePath, path_of


def test_a_url_stays_a_url_with_the_attributes_of_a_path() -> None:
    path = path_of("s3://bucket/run/step-0000000300.ckpt")
    assert isinstance(path, RemotePath) and isinstance(path, str)
    assert str(path) == path == "s3://bucket/run/step-0000000300.ckpt"
    assert (path.name, path.suffix, path.stem) == ("step-0000000300.ckpt", ".ckpt", "step-0000000300")
    assert path.parent == "s3://bucket/run" and path.parent.parent == "s3://bucket"
    assert path.parent.parent.parent == "s3://bucket"  # the bucket is its own parent
    assert path.parent / "events.jsonl" == "s3://bucket/run/events.jsonl"
    assert RemotePath("s3://bucket/run/").name == "run"
    assert json.dumps({"path": path}) == '{"path": "s3://bucket/run/step-0000000300.ckpt"}'
    assert pickle.loads(pickle.dumps(path)) == path and repr(path).startswith("RemotePath(")


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/data/run/a.ckpt", Path("/data/run/a.ckpt")),
        ("file:///data/run", Path("/data/run")),
        ("rel/a", Path("rel/a")),
    ],
)
def test_local_locations_are_paths(location: str, expected: Path) -> None:
    assert path_of(location) == expected and type(path_of(location)) is type(expected)
