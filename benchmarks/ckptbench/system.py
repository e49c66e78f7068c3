"""Process and machine facts: RSS, page-cache control, fsync helpers, a description of the box."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

MIB = 1 << 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes() -> int:
    """Resident set size of this process now (psutil if installed, else /proc/self/status)."""
    try:
        import psutil
    except ImportError:
        return _status_kib("VmRSS") * 1024
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """High-water mark of RSS since the last :func:`reset_peak_rss` (VmHWM)."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


# Kernel counters that show a save waiting on memory rather than on the disk: direct reclaim,
# compaction of free memory into large pages (ext4's page cache uses large folios), faults.
VMSTAT_KEYS = (
    "allocstall_normal",
    "allocstall_movable",
    "compact_stall",
    "pgscan_direct",
    "pgmajfault",
    "pgfault",
)


def vmstat() -> dict[str, int]:
    """The :data:`VMSTAT_KEYS` counters of /proc/vmstat now (empty where there is none)."""
    try:
        with open("/proc/vmstat") as stats:
            rows = (line.split() for line in stats)
            return {key: int(value) for key, value in rows if key in VMSTAT_KEYS}
    except OSError:
        return {}


def vmstat_delta(before: dict[str, int]) -> dict[str, int]:
    """How much each counter of :func:`vmstat` grew since ``before``."""
    return {key: value - before.get(key, 0) for key, value in vmstat().items()}


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so that RSS shows live memory.

    Without it, memory a method frees is reused by the next one without raising RSS, and the peak
    of each method would depend on what ran before it.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def can_drop_caches() -> bool:
    """Whether this process may write /proc/sys/vm/drop_caches (root, not in a read-only /proc)."""
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def evict(paths: list[Path]) -> str:
    """Drop ``paths`` from the page cache: drop_caches as root, else posix_fadvise(DONTNEED).

    Returns the method used ("drop_caches" or "fadvise").
    """
    os.sync()
    if can_drop_caches():
        try:
            with open("/proc/sys/vm/drop_caches", "w") as drop:
                drop.write("3\n")
            return "drop_caches"
        except OSError:
            pass
    for path in paths:
        for file in _files_under(path):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return "fadvise"


def warm(paths: list[Path]) -> None:
    """Read ``paths`` once so that they sit in the page cache."""
    buffer = bytearray(8 * MIB)
    for path in paths:
        for file in _files_under(path):
            with open(file, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass


def _files_under(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path] if path.exists() else []


def fsync_path(path: Path) -> None:
    """fsync a file (or every file of a directory, then the directory) by name."""
    for file in _files_under(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(path if path.is_dir() else path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a file or a directory tree if it exists (not timed)."""
    if path.is_dir():
        for child in sorted(path.rglob("*"), reverse=True):
            if child.is_dir():
                child.rmdir()
            else:
                child.unlink()
        path.rmdir()
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine(directory: Path) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
        "cpu_model": _cpu_model(),
        "directory": str(directory),
        "filesystem": _filesystem(directory),
        "loadavg_start": loadavg(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "page_cache_control": "drop_caches" if can_drop_caches() else "fadvise",
    }
    try:
        import asyncckpt

        info["asyncckpt"] = asyncckpt.__version__
        info["git_commit"] = _git_commit()
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _filesystem(directory: Path) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["df", "-T", str(directory)], capture_output=True, text=True, timeout=10, check=True
        ).stdout.splitlines()
        if len(out) > 1:
            fields = out[1].split()
            return f"{fields[1]} on {fields[0]}"
    return "unknown"


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip()
    return None
