"""The one asyncckpt internal the GPU bandwidth test and the profiler call, behind one name.

``staging.stage`` is private API; keeping the call here means a change to it is fixed in one place.
"""

from __future__ import annotations

from typing import Any


def stage_once(snapshot: Any, buffers: Any, *, side_stream: Any = None) -> Any:
    """Copy ``snapshot`` into ``buffers`` with asyncckpt's staging; return an object with ``wait()``."""
    from asyncckpt.saving import staging

    return staging.stage(snapshot, buffers, side_stream=side_stream)
