"""The few asyncckpt internals the GPU bandwidth test and the profiler call, behind one adapter.

These are private APIs that change as the library is optimized; this module keeps the benchmark
working across the versions seen so far.
"""

from __future__ import annotations

import inspect
from typing import Any


def stage_once(snapshot: Any, buffers: Any, *, side_stream: Any = None) -> Any:
    """Copy ``snapshot`` into ``buffers`` with asyncckpt's staging; return an object with ``wait()``."""
    from asyncckpt import staging

    copy_cls = getattr(staging, "StagedCopy", None)
    params = list(inspect.signature(staging.stage).parameters)
    if copy_cls is not None and len(params) > 1 and params[1] in ("staged", "copy"):
        staged = copy_cls(buffers)
        staging.stage(snapshot, staged, side_stream=side_stream)
        return staged
    return staging.stage(snapshot, buffers, side_stream=side_stream)
