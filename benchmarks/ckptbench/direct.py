"""The disk's own write floor: bytes laid out once in page-aligned memory, written with
``O_DIRECT`` (the page cache bypassed) and fsynced. Shared by ``write_overhead.py``
(``write_floor_direct``) and ``distributed.py`` (each rank's share)."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from pathlib import Path

PIECE = 8 << 20  # bytes per write call


def aligned_copy(views: Iterable[memoryview]) -> memoryview:
    """The bytes of ``views``, one after another, in page-aligned memory (an anonymous map)
    padded with zeros to whole 4 KiB blocks."""
    views = [v.cast("B") for v in views]
    total = sum(len(v) for v in views)
    area = memoryview(mmap.mmap(-1, max(-(-total // 4096) * 4096, 4096)))
    at = 0
    for view in views:
        area[at : at + len(view)] = view
        at += len(view)
    return area


def write_direct(area: memoryview, path: Path) -> None:
    """Write ``area`` to the new file ``path`` with ``O_DIRECT`` in :data:`PIECE` calls and fsync
    it; through the page cache where the filesystem refuses ``O_DIRECT``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError:
        fd = os.open(path, flags, 0o644)
    try:
        for start in range(0, len(area), PIECE):
            os.pwrite(fd, area[start : start + PIECE], start)
        os.fsync(fd)
    finally:
        os.close(fd)
