"""Fresh host memory made ready before a large read lands in it.

A loaded tensor needs new memory. Large allocations are fresh anonymous mappings (glibc maps
anything above its threshold, at most 32 MiB, anew each time), and a read into them takes a page
fault for each 4 KiB page as it lands: on the 2-core VM a fresh GiB read that way took 0.45 s
against 0.07 s into memory that was already there. Asking the kernel for huge pages on the
buffer's whole 2 MiB pages and populating them in one call (``MADV_HUGEPAGE``, then
``MADV_POPULATE_WRITE``, Linux 5.14+) cut it to 0.11 s. The contents do not change (fresh
memory reads as zeros either way); a kernel or platform without either advice keeps the
ordinary faults.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from typing import Any

import torch

from ._libc import libc_function

HUGE_PAGE = 2 << 20
# glibc maps an allocation above its threshold afresh; the threshold grows with what is freed, up
# to 32 MiB on 64-bit: a smaller buffer may be reused memory, already faulted in, where the
# advice would only split the heap's mapping.
PREFAULT_MIN = (32 << 20) + 1
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23


def _madvise() -> Any:
    function = libc_function("madvise")
    if function is None:
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_madvise_call = _madvise()


def prefault(buffers: Iterable[torch.Tensor]) -> None:
    """Back each of ``buffers`` (new CPU tensors about to be read into) that is larger than
    :data:`PREFAULT_MIN` with populated huge pages where it spans whole ones; nothing for a
    smaller buffer, another device, or a kernel that refuses."""
    madvise = _madvise_call
    if madvise is None:
        return
    for buffer in buffers:
        nbytes = buffer.numel() * buffer.element_size()
        if nbytes < PREFAULT_MIN or buffer.device.type != "cpu":
            continue
        address = buffer.data_ptr()
        start = -(-address // HUGE_PAGE) * HUGE_PAGE
        end = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
        if end <= start:
            continue
        madvise(start, end - start, _MADV_HUGEPAGE)  # refused where huge pages are off: 4 KiB pages
        madvise(start, end - start, _MADV_POPULATE_WRITE)  # refused before Linux 5.14: faults as read
