"""Job: one staged checkpoint on its way to storage."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from ..format import TensorEntry
from ..storage import CheckpointPath
from .snapshot import Structure
from .staging import Staged


@dataclass(frozen=True, kw_only=True)
class Job:
    """One staged checkpoint on its way to storage; never changed once it is submitted.

    ``name`` is the object name the commit publishes, ``path`` where that is (for handles and
    messages). ``future`` settles with ``path`` or the failure; ``done_event`` (async use) is set
    once the writer is done with the job, so that awaiting handles need no thread.
    """

    step: int
    name: str
    path: CheckpointPath
    tree: Any
    tensors: Sequence[TensorEntry]
    metadata: Any
    staged: Staged
    future: concurrent.futures.Future[CheckpointPath]
    done_event: anyio.Event | None = None
    structure: Structure | None = None  # whose memo keeps the encoded header table


@dataclass(frozen=True, kw_only=True)
class Deletion:
    """Delete the committed object ``name`` when the writer reaches it, after the saves queued
    before it.

    The writer keeps ``name`` when the last of those saves failed: an older intact checkpoint is
    worth more than its space. For callers that own retention (``keep_last=None``).
    """

    name: str
    path: CheckpointPath
    done_event: None = None
