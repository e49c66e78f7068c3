"""The commit record: DCP's Metadata round-trips without pickle; hostile records are refused."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile import Boom, no_unpickling, plain_model_and_optimizer
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.checkpoint.state_dict_saver import save

from asyncckpt import catalog
from asyncckpt import dist as adist
from asyncckpt import format as fmt
from asyncckpt.dist.record import RECORD_KIND, RECORD_VERSION, encode_metadata
from asyncckpt.errors import CorruptedCheckpointError, UnsupportedValueError
from asyncckpt.format import TensorEntry as TensorSpec
from asyncckpt.storage import PosixStorage

Body = dict[str, Any]
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Any]:
    """A step saved by dcp.save in this process, and the Metadata DCP made for it."""
    model, optimizer = plain_model_and_optimizer()
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    metadata = save(state, storage_writer=adist.AsyncckptWriter(tmp_path, 4), no_dist=True)
    return tmp_path, metadata


def test_metadata_round_trips(saved: tuple[Path, Any]) -> None:
    root, metadata = saved

    record = adist.read_record(PosixStorage(root), 4)

    assert record.step == 4 and record.world_size == 1 and [s.rank for s in record.shards] == [0]
    assert record.metadata.state_dict_metadata == metadata.state_dict_metadata
    assert record.metadata.planner_data == metadata.planner_data  # key paths keep their tuples
    assert record.metadata.storage_data == metadata.storage_data
    assert record.metadata.version == metadata.version


def write_raw_record(root: Path, step: int, *, tree: Any, blob: bytes, meta: Any = None) -> None:
    """A structurally valid v1 record (checksums right) holding whatever we are given."""
    spec = TensorSpec("dcp-metadata", torch.uint8, (len(blob),), (1,), 0, 0)
    storage = PosixStorage(root)

    def body(sink: Any) -> int:
        return fmt.write_checkpoint(
            sink,
            step=step,
            metadata=meta if meta is not None else {"kind": RECORD_KIND, "record": RECORD_VERSION},
            tree=tree,
            tensors=[spec],
            sizes=[len(blob)],
            blobs=[memoryview(blob)],
        )

    storage.commit(storage.write(catalog.commit_record_name(step), body))


def good_parts(root: Path) -> tuple[Body, Body]:
    record = adist.read_record(PosixStorage(root), 4)
    tree = {"world_size": 1, "shards": [[0, record.shards[0].nbytes, record.shards[0].header_crc]]}
    tree["dcp"] = fmt.TensorRef(0)
    return tree, fmt.unpack(encode_metadata(record.metadata))


def first_tensor(body: Body) -> list[Any]:
    return body["tensors"][0]  # type: ignore[no-any-return]


MUTATIONS: dict[str, Callable[[Body, Body], None]] = {
    "world size 0": lambda tree, body: tree.update(world_size=0),
    "world size huge": lambda tree, body: tree.update(world_size=2**40),
    "digest count": lambda tree, body: tree.update(world_size=2),
    "digest of another rank": lambda tree, body: tree["shards"][0].__setitem__(0, 1),
    "digest crc beyond 32 bits": lambda tree, body: tree["shards"][0].__setitem__(2, 2**40),
    "metadata not a map": lambda tree, body: (body.clear(), body.update(not_a_map=True)),
    "unknown dtype": lambda tree, body: first_tensor(body).__setitem__(1, "float128"),
    "chunk outside the tensor": lambda tree, body: first_tensor(body)[5][0][1].__setitem__(0, 10**6),
    "shape beyond int64": lambda tree, body: first_tensor(body).__setitem__(4, [2**40, 2**40]),
    "location of a missing rank": lambda tree, body: body["storage"][0].__setitem__(2, 7),
    "location of an unknown key": lambda tree, body: body["storage"][0].__setitem__(0, "nope"),
    "negative tensor index": lambda tree, body: body["storage"][0].__setitem__(3, -1),
    "huge list index in a key path": lambda tree, body: body["planner_data"].update(x=("optimizer", 10**9)),
    "float in a key path": lambda tree, body: body["planner_data"].update(x=("optimizer", 1.5)),
    "duplicate key": lambda tree, body: body["bytes"].append(body["bytes"][0]),
    "bad storage meta": lambda tree, body: body.update(storage_meta=[1, 2]),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_hostile_records_are_refused(saved: tuple[Path, Any], mutation: str) -> None:
    root, _ = saved
    tree, body = good_parts(root)
    MUTATIONS[mutation](tree, body)
    write_raw_record(root, 4, tree=tree, blob=fmt.pack(body))

    with pytest.raises(CorruptedCheckpointError) as caught:
        adist.read_record(PosixStorage(root), 4)

    assert caught.value.path == str(root / catalog.commit_record_name(4))


def test_a_record_of_another_kind_is_refused(saved: tuple[Path, Any]) -> None:
    root, _ = saved
    tree, body = good_parts(root)
    write_raw_record(root, 4, tree=tree, blob=fmt.pack(body), meta={"kind": "something else", "record": 1})

    with pytest.raises(CorruptedCheckpointError, match="not an asyncckpt commit record"):
        adist.read_record(PosixStorage(root), 4)


def test_a_pickle_in_the_record_is_never_unpickled(saved: tuple[Path, Any], tmp_path: Path) -> None:
    root, _ = saved
    tree, _ = good_parts(root)
    marker = tmp_path / "unpickled"
    write_raw_record(root, 4, tree=tree, blob=pickle.dumps(Boom(marker)))

    with no_unpickling() as calls, pytest.raises(CorruptedCheckpointError, match="does not decode"):
        adist.read_record(PosixStorage(root), 4)

    assert calls == [] and not marker.exists()


def test_metadata_that_msgpack_cannot_store_is_refused_before_writing(saved: tuple[Path, Any]) -> None:
    root, metadata = saved
    metadata.planner_data = {"x": object()}

    with pytest.raises(UnsupportedValueError):
        encode_metadata(metadata)
