"""Writers' temp files: their names, which writer owns one, and which ones clean-up may remove.

A temp file is ``.<final name>.tmp-<host>-<pid>-<random>``: hidden, and it names its writer, so
start-up clean-up removes only files whose writer is gone (see :func:`temp_is_abandoned`).
A commit that replaces a file keeps the old one under such a name for a moment
(``.<final name>.replaced.tmp-<host>-<pid>-<random>``, :func:`replaced_name`), so the same
clean-up removes it when its writer died before deleting it.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path

TEMP_MARK = ".tmp-"
REPLACED_MARK = ".replaced" + TEMP_MARK  # the old file a commit replaced, not a write
STALE_TEMP_S = 3600.0  # another host's temp file untouched this long belongs to a dead writer
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
_OWNED_TEMP = re.compile(r"\.tmp-([A-Za-z0-9]+)-(\d+)-[0-9a-f]+$")


def temp_name(final: Path) -> Path:
    """``.step-0000000300.ckpt.tmp-<host>-<pid>-<random>``: hidden, and it names its writer."""
    return final.with_name(f".{final.name}{TEMP_MARK}{writer_id()}-{secrets.token_hex(4)}")


def replaced_name(final: Path) -> Path:
    """``.last.ckpt.replaced.tmp-<host>-<pid>-<random>``: a hidden second name for the file a
    commit is about to replace, so the rename does not drop its last link (and pay for freeing
    its blocks); a temp name, so clean-up removes it once its writer is gone."""
    return final.with_name(f".{final.name}{REPLACED_MARK}{writer_id()}-{secrets.token_hex(4)}")


def is_replaced_name(name: str) -> bool:
    """Whether ``name`` is an old file kept by a commit (:func:`replaced_name`), not a write."""
    return is_temp_name(name) and REPLACED_MARK in name


def temp_is_abandoned(name: str, modified: float, *, now: float) -> bool:
    """Whether no live writer can own the temp file ``name`` (clean-up may remove it).

    Ours (this host): abandoned when its process is gone, or it is this process's own (a write
    this process abandoned). Another host's: when untouched for ``STALE_TEMP_S``. A name without
    an owner (older releases) is abandoned.
    """
    match = _OWNED_TEMP.search(name)
    if match is None:
        return True
    return writer_is_gone(match[1], int(match[2]), modified, now=now)


def writer_id() -> str:
    """``<host>-<pid>``: who is writing, as temp names (and remote data objects) record it."""
    return f"{_HOST}-{os.getpid()}"


def writer_is_gone(host: str, pid: int, modified: float, *, now: float) -> bool:
    """Whether the writer ``host``/``pid`` of something last modified at ``modified`` is gone
    (the rule of :func:`temp_is_abandoned`)."""
    if host != _HOST:
        return now - modified > STALE_TEMP_S
    return pid == os.getpid() or not _process_alive(pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a writer's temporary file (never a checkpoint)."""
    return name.startswith(".") and TEMP_MARK in name


def regular_temps(
    folder: Path, scandir: Callable[[Path], Iterable[os.DirEntry[str]]] = os.scandir
) -> list[tuple[os.DirEntry[str], os.stat_result]]:
    """Every temp file directly in ``folder`` that is a regular file (links not followed), with
    its stat; none when ``folder`` is gone. A file removed while listed is left out."""
    try:
        entries = list(scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        if not is_temp_name(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode):
            found.append((entry, info))
    return found


def temp_files(
    folder: Path, prefix: str, *, scandir: Callable[[Path], Iterable[os.DirEntry[str]]] = os.scandir
) -> list[str]:
    """Abandoned temp files directly in ``folder``, named with ``prefix`` (listed by ``scandir``)."""
    now = time.time()
    return [
        prefix + entry.name
        for entry, info in regular_temps(folder, scandir)
        if temp_is_abandoned(entry.name, info.st_mtime, now=now)
    ]
