"""Multi-rank checkpoints on ``torch.distributed``: DCP is the engine, asyncckpt its storage.

Two ways in:

- :func:`save_step` / :func:`restore_latest` (collective, over a :class:`CoordinationGroup`,
  asyncckpt's own gloo group): modules and optimizers through DCP (FSDP2 and DTensor shards,
  replicated tensors written once, resharding to any world size), everything else per rank;
  a step is committed by a record written last, and a restore agrees on the newest step that
  verifies on every rank. :func:`load_full` reads a step whole in a plain process.
- :class:`AsyncckptWriter` / :class:`AsyncckptReader` with :class:`SavePlanner` /
  :class:`LoadPlanner`, for ``dcp.save`` / ``dcp.load`` users: the same files, checksums and
  commit record, without pickle.

The layout of a multi-rank step and of its commit record is in docs/MULTI_GPU.md.
"""

from .commit import read_record
from .full import FullState, load_full
from .group import CoordinationGroup
from .planner import FullStateLoadPlanner, LoadPlanner, SavePlanner, decode_value, encode_value
from .record import CommitRecord, ItemLocation, ShardDigest
from .restore import RestoredStep, restore_latest
from .save import SavedStep, save_step
from .steps import check_step, committed_steps, delete_step, remove_uncommitted
from .storage import AsyncckptReader, AsyncckptWriter
from .verify import verify_step

__all__ = [
    "AsyncckptReader",
    "AsyncckptWriter",
    "CommitRecord",
    "CoordinationGroup",
    "FullState",
    "FullStateLoadPlanner",
    "ItemLocation",
    "LoadPlanner",
    "RestoredStep",
    "SavePlanner",
    "SavedStep",
    "ShardDigest",
    "check_step",
    "committed_steps",
    "decode_value",
    "delete_step",
    "encode_value",
    "load_full",
    "read_record",
    "remove_uncommitted",
    "restore_latest",
    "save_step",
    "verify_step",
]
