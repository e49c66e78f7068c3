"""A function of the C library, where this is Linux and the library has it."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any


def libc_function(name: str) -> Any:
    """The C library's ``name`` (its errno kept for ``ctypes.get_errno``), or None off Linux or
    where the library cannot be loaded or lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return getattr(libc, name)
    except (OSError, AttributeError):  # pragma: no cover - every Linux libc has the ones we use
        return None
