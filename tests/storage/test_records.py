"""Names of the remote commit protocol, which version of a name is committed, and part sizes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from asyncckpt.storage.multipart import UploadOptions
from asyncckpt.storage.objects import Entry
from asyncckpt.storage.records import commit_name, data_name, group, new_token, parse_versioned

pytestmark = pytest.mark.timeout(10)

NOW = datetime.now(UTC)


def test_tokens_sort_by_time_and_parse_back() -> None:
    tokens = [new_token() for _ in range(50)]

    assert tokens == sorted(tokens) and len(set(tokens)) == 50
    assert parse_versioned(f"step-0000000001.ckpt.{tokens[0]}.data") == (
        "step-0000000001.ckpt",
        tokens[0],
        "data",
    )
    assert parse_versioned(f"a.b.{tokens[1]}.commit") == ("a.b", tokens[1], "commit")
    assert parse_versioned("step-0000000001.ckpt") is None


def entries(*names: str) -> list[Entry]:
    return [Entry(f"bucket/run/{n}", "file", 1, NOW) for n in names]


def test_the_committed_version_is_the_newest_with_both_objects() -> None:
    old, new, newest = sorted(new_token() for _ in range(3))
    listing = entries(
        data_name("a", old), commit_name("a", old),
        data_name("a", new), commit_name("a", new),
        commit_name("a", newest),  # its data object is gone: not a version anyone can read
        data_name("b", old),  # never committed
    )  # fmt: skip

    names, folders = group(listing)

    assert names["a"].current() == new and names["b"].current() is None and folders == []
    stale = [e.key.rpartition("/")[2] for e in names["a"].leftovers(now=NOW.timestamp())]
    assert stale == [commit_name("a", old), commit_name("a", newest), data_name("a", old)]  # commits first
    assert [e.key.rpartition("/")[2] for e in names["b"].leftovers(now=NOW.timestamp())] == [
        data_name("b", old)
    ]


def test_part_sizes_grow_so_that_ten_thousand_parts_hold_a_large_object() -> None:
    options = UploadOptions(part_size=8 << 20)

    assert [options.part_size_for(n) >> 20 for n in (1, 2000, 2001, 4001, 6001, 8001, 10_000)] == [
        8, 8, 16, 32, 64, 128, 128,
    ]  # fmt: skip
    assert sum(options.part_size_for(n) for n in range(1, 10_001)) > 400 << 30
