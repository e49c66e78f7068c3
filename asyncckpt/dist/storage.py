"""DCP's storage layer over asyncckpt's format: :class:`AsyncckptWriter` and :class:`AsyncckptReader`.

``dcp.save(state, storage_writer=AsyncckptWriter(dir, step=300))`` makes every rank write its
write items as one verified v1 shard file (``step-0000000300/rank-00001.ckpt``), and the
coordinator write the commit record last, after every rank reported its shard durable with its
digest. ``dcp.load(state, storage_reader=AsyncckptReader(dir, step=300))`` checks each shard
against the record and every blob's CRC32C before it uses the bytes. Non-tensor values are
msgpack, never pickle, with any planner derived from DCP's default planners (see
:mod:`asyncckpt.dist.planner`).
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner import LoadPlanner as DcpLoadPlanner
from torch.distributed.checkpoint.planner import SavePlanner as DcpSavePlanner
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from .. import catalog
from .. import format as fmt
from ..dtypes import itemsize
from ..errors import UnsupportedValueError, UsageError
from ..saving.snapshot import Snapshot, flatten
from ..saving.readback import VerifyMode
from ..storage import OS, FileOps, Location, Storage, open_storage
from .commit import check_shards_durable, read_record, write_record
from .planner import LoadPlanner, SavePlanner, encode_value
from .record import CommitRecord, ItemLocation
from .results import LocalOnly, ShardWrites, collect, item_keys
from .shards import ItemData, ShardFiles, check_item, write_shard

_DIGEST_KEY = "\0asyncckpt.shard-digest"  # the WriteResult that carries a rank's ShardDigest


@dataclass(frozen=True)
class WriteReport:
    """One rank's figures of a step it wrote: its shard's size and times (seconds), and on the
    coordinator the commit (from every rank's results gathered to the record durable)."""

    nbytes: int
    write_s: float
    fsync_s: float
    commit_s: float | None = None


@dataclass(frozen=True)
class _PlanInfo:
    """What the coordinator tells each rank in its plan: its rank and the world size.

    (With DCP's plan caching a rank may reuse the plan of an earlier save: nothing in it may
    depend on the step.)
    """

    rank: int
    world_size: int


def _storage_for(location: Location, ops: FileOps) -> Storage:
    if not isinstance(location, Storage):
        Path(location).mkdir(parents=True, exist_ok=True)
    return open_storage(location, ops=ops)


def _flatten(per_rank: Any) -> Snapshot:
    try:
        return flatten(per_rank)
    except TypeError as exc:  # the key path of the value leads the message
        raise UnsupportedValueError(f"per-rank values: {exc}") from exc


def step_of(checkpoint_id: str | os.PathLike[str] | int) -> int:
    """The step a DCP ``checkpoint_id`` names: an int, ``"300"`` or ``"step-0000000300"``."""
    text = os.fspath(checkpoint_id) if not isinstance(checkpoint_id, int) else str(checkpoint_id)
    step = catalog.parse_step_folder(text.rstrip("/"))
    if step is None and text.isdigit():
        step = int(text)
    if step is None:
        raise UsageError(f"checkpoint_id {checkpoint_id!r} does not name a step (use an int or 'step-N')")
    catalog.step_folder_name(step)  # raises for a step out of range
    return step


class AsyncckptWriter(StorageWriter):
    """A DCP ``StorageWriter``: one verified v1 shard file per rank, a commit record written last.

    ``per_rank`` is a value this rank keeps for itself (its RNG state, its data-loader state):
    it goes into this rank's shard file whatever DCP's deduplication does with the state, and
    :func:`asyncckpt.dist.restore_latest` gives it back to the same rank. ``check_shards``
    makes the coordinator read back every shard's header before it commits (it then knows the
    files are visible to it, not only to their writers). With ``share_metadata=False`` the
    ``Metadata`` that ``dcp.save`` returns on the other ranks holds no tensors, values or item
    locations (they are in the commit record): DCP then does not pickle an object of several
    hundred bytes per tensor to every rank after each save. Re-saving a committed step first
    removes its record, so the step never mixes two saves. ``metadata`` (user metadata, plain
    values) goes into this rank's shard file. ``verify`` says what each rank reads back of
    its shard before reporting it durable: ``"full"`` (default) every blob's CRC32C as well as
    the structure, ``"structure"`` the prelude, trailer, size and header CRC (what
    ``AsyncCheckpointer`` reads back by default), ``"none"`` nothing but the header's digest.
    After the save, ``report`` holds this rank's figures.
    """

    def __init__(
        self,
        location: Location,
        step: int,
        *,
        per_rank: Any = None,
        metadata: Any = None,
        check_shards: bool = True,
        share_metadata: bool = True,
        verify: VerifyMode = "full",
        ops: FileOps = OS,
    ) -> None:
        self.storage = _storage_for(location, ops)
        self.share_metadata = share_metadata
        self.step = step_of(step)
        self.per_rank = None if per_rank is None else _flatten(per_rank)
        self.metadata = metadata
        self.check_shards = check_shards
        self.verify: VerifyMode = verify
        self.is_coordinator = False
        self.rank = 0
        self.report: WriteReport | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.step = step_of(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return dataclasses.replace(plan, storage_data=self.step)  # checked by the coordinator

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        steps = {rank: plan.storage_data for rank, plan in enumerate(plans) if plan.usable}
        if any(step != self.step for step in steps.values()):
            listing = ", ".join(f"rank {rank}: step {step}" for rank, step in steps.items())
            raise UsageError(f"the ranks save different steps ({listing})", step=self.step)
        world_size = len(plans)
        self._uncommit(world_size)
        return [
            dataclasses.replace(plan, storage_data=_PlanInfo(rank, world_size))
            for rank, plan in enumerate(plans)
        ]

    def _uncommit(self, world_size: int) -> None:
        """Before any rank writes: a re-saved step stops existing, stale shards go."""
        folder = catalog.step_folder_name(self.step)
        record = catalog.commit_record_name(self.step)
        names = [obj.name for obj in self.storage.ls(folder) if obj.kind == "file"]
        if record in names:
            self.storage.delete([record])  # durable before any shard is replaced
        stale = [
            name
            for name in names
            if (parsed := catalog.parse_shard_name(name)) is not None and parsed[1] >= world_size
        ]
        self.storage.delete(stale)

    def write_data(self, plan: SavePlan, planner: DcpSavePlanner) -> Future[list[WriteResult]]:
        info = plan.storage_data
        if not isinstance(info, _PlanInfo):
            raise UsageError("AsyncckptWriter needs DCP's global planning (its plans carry no rank)")
        items = [_item_data(item, planner) for item in plan.items]
        digest, first, written = write_shard(
            self.storage,
            step=self.step,
            rank=info.rank,
            world_size=info.world_size,
            per_rank=self.per_rank,
            items=items,
            user_metadata=self.metadata,
            verify=self.verify,
        )
        self.report = WriteReport(written.nbytes, written.write_s, written.fsync_s)
        # One result for the whole shard: DCP pickles every rank's results to the coordinator,
        # and one WriteResult per item (10,000 dataclasses, each with a torch.Size) cost more
        # than the shard's encoding; one bytes object of keys costs almost nothing.
        writes = ShardWrites(digest, first, item_keys(plan.items))
        future: Future[list[WriteResult]] = Future()
        future.set_result([WriteResult(MetadataIndex(_DIGEST_KEY), digest.nbytes, writes)])
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        started = time.perf_counter()
        digests, locations = collect(results, self.step)
        metadata.storage_data = locations
        if self.check_shards:
            check_shards_durable(self.storage, self.step, digests)
        write_record(self.storage, step=self.step, world_size=len(results), shards=digests, metadata=metadata)
        if not self.share_metadata:  # DCP broadcasts this object next; the coordinator keeps it whole
            metadata.state_dict_metadata = LocalOnly(metadata.state_dict_metadata)
            metadata.storage_data = LocalOnly(locations)
            if isinstance(metadata.planner_data, dict):
                metadata.planner_data = LocalOnly(metadata.planner_data)
        if self.report is not None:
            self.report = dataclasses.replace(self.report, commit_s=time.perf_counter() - started)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # never picked automatically: pass an AsyncckptWriter explicitly

    def storage_meta(self) -> StorageMeta | None:
        return None


def _item_data(item: WriteItem, planner: DcpSavePlanner) -> ItemData:
    key = item.index.fqn if item.index.offset is None else f"{item.index.fqn}@{[*item.index.offset]}"
    if item.type == WriteItemType.BYTE_IO:
        data = _encoded_value(item, planner)
        return ItemData(key, torch.uint8, (len(data),), len(data), lambda: memoryview(data), packed=True)
    assert item.tensor_data is not None
    shape = tuple(item.tensor_data.chunk.sizes)
    dtype = item.tensor_data.properties.dtype
    nbytes = itemsize(dtype) * int(torch.Size(shape).numel())

    def resolve() -> memoryview:
        tensor = planner.resolve_data(item)
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise UsageError(f"the planner resolved {key} to something else than a {dtype} of shape {shape}")
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        return fmt.tensor_bytes(tensor.contiguous())

    return ItemData(key, dtype, shape, nbytes, resolve)


def _encoded_value(item: WriteItem, planner: DcpSavePlanner) -> bytes:
    """A non-tensor value as msgpack, whatever DefaultSavePlanner subclass planned it."""
    if not isinstance(planner, DefaultSavePlanner) or type(planner).transform_object not in _PLAIN_TRANSFORMS:
        raise UsageError(
            "AsyncckptWriter stores non-tensor values with its own codec: use a planner derived from "
            "DefaultSavePlanner that does not override transform_object (asyncckpt.dist.SavePlanner)"
        )
    return encode_value(planner.lookup_object(item.index), key=item.index.fqn)


class AsyncckptReader(StorageReader):
    """A DCP ``StorageReader`` over a committed step (``step=None``: the newest committed one).

    Only committed steps are read; each shard file must match the digest in the commit record,
    and each blob its CRC32C, before its bytes are used. Use a planner derived from
    ``DefaultLoadPlanner`` (``asyncckpt.dist.LoadPlanner``): non-tensor values are msgpack.
    ``record`` is ``step``'s commit record when the caller has read and checked it already;
    ``shards`` its shard files, opened by the caller (who closes them) over that record.
    """

    def __init__(
        self,
        location: Location,
        step: int | None = None,
        *,
        record: CommitRecord | None = None,
        shards: ShardFiles | None = None,
        ops: FileOps = OS,
    ) -> None:
        self.storage = open_storage(location, ops=ops)
        self.step = None if step is None else step_of(step)
        if record is not None and record.step != self.step:
            raise UsageError(f"the commit record given is step {record.step}'s, not step {self.step}'s")
        if shards is not None and shards.record is not record:
            raise UsageError("the shard files given are not opened over the commit record given")
        self.record: CommitRecord | None = record
        self.shards: ShardFiles | None = None
        self._given = shards  # the caller's: used while the record is the same, never closed here

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.close()
        self.record = None
        self._given = None
        if checkpoint_id is not None:
            self.step = step_of(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.record is not None:
            return self.record.metadata
        if self.step is None:
            steps = catalog.committed_steps(self.storage)
            if not steps:
                raise FileNotFoundError(f"no committed multi-rank step in {self.storage.location}")
            self.step = steps[-1].step
        self.record = read_record(self.storage, self.step)
        return self.record.metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if self.record is None:
            self.read_metadata()
        assert self.record is not None
        self.close()
        given = self._given
        self.shards = (
            given
            if given is not None and given.record is self.record
            else ShardFiles(self.storage, self.record)
        )

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: DcpLoadPlanner) -> Future[None]:
        if self.shards is None or self.record is None:
            raise UsageError("AsyncckptReader.read_data before set_up_storage_reader")
        locations = self.record.metadata.storage_data
        chunk: tuple[ItemLocation, torch.Tensor] | None = None  # the last stored chunk read
        for item in sorted(plan.items, key=lambda i: _sort_key(locations, i)):
            where = locations.get(item.storage_index)
            if where is None:
                raise UsageError(f"the commit record has no item {item.storage_index}")
            if item.type == LoadItemType.BYTE_IO:
                data = self.shards.read(where.rank, where.tensor)
                _load_bytes(planner, item, bytes(fmt.tensor_bytes(data)))
                continue
            check_item(self.shards, where, item, self.record.metadata)
            target = planner.resolve_tensor(item).detach()
            if not self._read_direct(where, item, target):
                if chunk is None or chunk[0] != where:
                    chunk = (where, self.shards.read(where.rank, where.tensor))
                source = chunk[1]
                for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                    source = source.narrow(dim, start, length)
                target.copy_(source)
            planner.commit_tensor(item, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_direct(self, where: ItemLocation, item: ReadItem, target: torch.Tensor) -> bool:
        """Read a whole stored chunk straight into a contiguous CPU target of its dtype and shape."""
        assert self.shards is not None
        entry = self.shards.entry(where.rank, where.tensor)
        whole = all(o == 0 for o in item.storage_offsets) and tuple(item.lengths) == entry.shape
        fits = target.device.type == "cpu" and target.is_contiguous() and target.dtype == entry.dtype
        fits = fits and tuple(target.shape) == entry.shape and entry.offset == 0
        blob = self.shards.layout(where.rank).blobs[entry.blob]
        if not (whole and fits and blob.nbytes == target.numel() * itemsize(target.dtype)):
            return False
        self.shards.read_blob_into(where.rank, entry.blob, fmt.tensor_bytes(target))
        return True

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def close(self) -> None:
        """Close the shard files this reader opened (not those its caller gave it)."""
        if self.shards is not None and self.shards is not self._given:
            self.shards.close()
        self.shards = None


def _sort_key(locations: dict[MetadataIndex, ItemLocation], item: ReadItem) -> tuple[int, int]:
    where = locations.get(item.storage_index)
    return (where.rank, where.tensor) if where is not None else (-1, -1)


_PLAIN_TRANSFORMS = (DefaultSavePlanner.transform_object, SavePlanner.transform_object)


def _load_bytes(planner: DcpLoadPlanner, item: ReadItem, data: bytes) -> None:
    """Give a non-tensor value to the planner without pickle, whatever DefaultLoadPlanner it is."""
    if isinstance(planner, LoadPlanner):
        planner.load_bytes(item, io.BytesIO(data))
    elif (
        isinstance(planner, DefaultLoadPlanner) and type(planner).load_bytes is DefaultLoadPlanner.load_bytes
    ):
        LoadPlanner.load_bytes(planner, item, io.BytesIO(data))  # type: ignore[arg-type]
    else:
        raise UsageError(
            "AsyncckptReader stores non-tensor values with its own codec: use asyncckpt.dist.LoadPlanner "
            "(or a planner derived from DefaultLoadPlanner that does not override load_bytes)"
        )
