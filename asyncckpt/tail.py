"""Reading a line-oriented file while another process appends to it, like ``tail -F``.

Only complete lines (ending in ``\\n``) are returned: a writer's half-written last line is held
back until its newline arrives. The reader survives the file being truncated (it starts again
from the top) and being replaced under the same name (it drains the old file, then opens the new
one from the top), and it waits for a file that does not exist yet.

Not detected (as with ``tail -F``): a file truncated and then regrown past the reader's position
between two polls; the reader then goes on from its old offset.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .storage.localfile import open_regular

READ_CHUNK = 1 << 16
DEFAULT_POLL_INTERVAL = 0.1


class LineFollower:
    """Complete new lines of ``path`` on each :meth:`poll`; no thread, no sleeping.

    Use as a context manager (or call :meth:`close`) to release the open file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._position = 0
        self._pending = b""

    def __enter__(self) -> LineFollower:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def poll(self) -> list[str]:
        """The complete lines written since the last poll, oldest first (without their newline).

        Returns ``[]`` while the file does not exist. Raises ``OSError`` (``PermissionError``;
        ``ELOOP`` for a symlink, ``EINVAL`` for a FIFO, a device or a folder: only regular files
        are read) when the file exists but cannot be read.
        """
        if self._fd is None and not self._open():
            return []
        lines = self._read_available()
        if self._replaced():
            # The old file is drained; a half line left in it will never be completed here.
            self._close_fd()
            if self._open():
                lines += self._read_available()
        return lines

    def close(self) -> None:
        """Close the file; a later :meth:`poll` opens it again from the top."""
        self._close_fd()

    def _open(self) -> bool:
        try:
            # A regular file only: a FIFO named events.jsonl would block this open forever.
            fd = open_regular(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        info = os.fstat(fd)
        self._fd = fd
        self._identity = (info.st_dev, info.st_ino)
        self._position = 0
        self._pending = b""
        return True

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._identity = None
        self._position = 0
        self._pending = b""

    def _read_available(self) -> list[str]:
        assert self._fd is not None
        if os.fstat(self._fd).st_size < self._position:  # truncated: start again from the top
            self._position = 0
            self._pending = b""
        chunks = [self._pending]
        while chunk := os.pread(self._fd, READ_CHUNK, self._position):
            chunks.append(chunk)
            self._position += len(chunk)
        complete, newline, self._pending = b"".join(chunks).rpartition(b"\n")
        if not newline:  # no complete line yet: rpartition put everything in the last part
            return []
        return [line.decode("utf-8", "replace").removesuffix("\r") for line in complete.split(b"\n")]

    def _replaced(self) -> bool:
        """Whether the name now points to another file (recreated, renamed over) or to none."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return True
        return (info.st_dev, info.st_ino) != self._identity


def follow_lines(
    path: str | os.PathLike[str],
    *,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    idle_timeout: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[str]:
    """Yield every complete line of ``path``, from the top, then new ones as they are written.

    Polls every ``poll_interval`` seconds. Ends when ``stop()`` returns true (checked between
    polls) or when no line has arrived for ``idle_timeout`` seconds; otherwise runs until the
    consumer stops iterating (closing the generator closes the file). Raises ``OSError`` when
    the file exists but cannot be read.
    """
    with LineFollower(path) as follower:
        last_line_at = time.monotonic()
        while True:
            lines = follower.poll()
            if lines:
                last_line_at = time.monotonic()
                yield from lines
            if stop is not None and stop():
                return
            if idle_timeout is not None and time.monotonic() - last_line_at >= idle_timeout:
                return
            time.sleep(poll_interval)


def read_lines(path: str | os.PathLike[str]) -> list[str]:
    """The complete lines of ``path`` as it is now; a half-written last line is left out.

    Raises ``FileNotFoundError`` when ``path`` does not exist, ``OSError`` when it cannot be read.
    """
    if not Path(path).exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    with LineFollower(path) as follower:
        return follower.poll()
