"""The two DCP calls asyncckpt makes, with DCP's single-process warning silenced.

``dcp.save`` / ``dcp.load`` warn on every call without a process group ("assuming the intent is
to save in a single process"); for asyncckpt a plain process is an intended, supported case.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlanner, SavePlanner
from torch.distributed.checkpoint.state_dict_loader import load
from torch.distributed.checkpoint.state_dict_saver import save
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

_SINGLE_PROCESS = r"torch\.distributed is disabled, unavailable or uninitialized"


def dcp_save(
    state: dict[str, Any], *, writer: StorageWriter, planner: SavePlanner, group: dist.ProcessGroup | None
) -> Metadata:
    """``dcp.save`` over ``group`` (None: this process alone); the step's ``Metadata``."""
    with _quiet(group):
        metadata: Metadata = save(
            state, storage_writer=writer, planner=planner, process_group=group, no_dist=group is None
        )
    return metadata


def dcp_load(
    state: dict[str, Any], *, reader: StorageReader, planner: LoadPlanner, group: dist.ProcessGroup | None
) -> None:
    """``dcp.load`` over ``group`` (None: this process alone)."""
    with _quiet(group):
        load(state, storage_reader=reader, planner=planner, process_group=group, no_dist=group is None)


@contextlib.contextmanager
def _quiet(group: dist.ProcessGroup | None) -> Iterator[None]:
    if group is not None:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS, category=UserWarning)
        yield
