"""How much of a file's byte range is in the page cache, asked without reading it.

``cachestat(2)`` (Linux 6.5+) counts the cached pages of a range and starts no I/O. The probe it
replaces, a one-byte ``preadv`` with ``RWF_NOWAIT`` at a few places, is no pure question: a read
that would block still starts the kernel's readahead there before it returns ``EAGAIN`` (on a
cold 1 GiB file, every probed place was in the cache 50 ms later), on the reader's own open file
(whose readahead state it moves), and when that readahead lands before the probe looks (a busy
machine, a fast device) a cold file passes for a cached one: 1 call in 30 after a dropped cache
on the 2-core VM.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from typing import Any

from ._libc import libc_function

# cachestat's number in the common system-call table (every architecture but alpha's own table).
_CACHESTAT = 451
_COMMON_TABLE = frozenset(
    {"x86_64", "amd64", "aarch64", "arm64", "riscv64", "ppc64le", "s390x", "loongarch64"}
)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    ]


def _syscall() -> Any:
    if platform.machine().lower() not in _COMMON_TABLE:
        return None
    function = libc_function("syscall")
    if function is None:
        return None
    function.restype = ctypes.c_long
    return function


_syscall_call = _syscall()


def cached_share(fd: int, begin: int, end: int) -> float | None:
    """The share (0 to 1) of the pages holding bytes ``[begin, end)`` of file ``fd`` that are in
    the page cache, by ``cachestat(2)``, which reads nothing; None where it cannot be asked (not
    Linux, a kernel before 6.5, a sandbox that refuses it, not a plain file)."""
    call = _syscall_call
    if call is None or end <= begin:
        return None
    page = mmap.PAGESIZE
    first, stop = begin // page * page, -(-end // page) * page
    found = _Stat()
    if call(_CACHESTAT, fd, ctypes.byref(_Range(first, stop - first)), ctypes.byref(found), 0) != 0:
        return None
    share: float = min(int(found.nr_cache) * page / (stop - first), 1.0)
    return share
