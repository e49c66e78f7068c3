"""Save statistics: the counters both sides update and the figures ``stats()`` reports."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointerStats:
    """Counters and the last save's figures (milliseconds, bytes, MB/s)."""

    saves: int
    committed: int
    failed: int
    skipped: int
    waits: int
    pending: int
    bytes_written: int
    last_step: int | None
    last_stall_ms: float
    last_wait_ms: float
    last_write_ms: float
    last_fsync_ms: float
    last_total_ms: float
    last_bytes: int
    last_mb_s: float
    staging_bytes: int
    staging_allocations: int


class SaveStats:
    """What :class:`CheckpointerStats` reports, as it happens. Thread-safe.

    The trainer's side counts saves staged, skipped and waited for; the writer's side counts
    commits and failures and keeps the last commit's figures.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.saves = self.skipped = self.waits = 0
        self.last_stall_ms = self.last_wait_ms = 0.0
        self.committed = self.failed = self.bytes_written = 0
        self.last_step: int | None = None
        self.last_bytes = 0
        self.last_write_ms = self.last_fsync_ms = self.last_total_ms = self.last_mb_s = 0.0

    def count_wait(self) -> None:
        """A ``save()`` waited for a free staging slot."""
        with self._lock:
            self.waits += 1

    def count_skip(self) -> None:
        """A ``save()`` was dropped because every staging slot was busy."""
        with self._lock:
            self.skipped += 1

    def count_staged(self, *, stall_ms: float, wait_ms: float) -> None:
        """A ``save()`` returned with its state staged and queued."""
        with self._lock:
            self.saves += 1
            self.last_stall_ms, self.last_wait_ms = stall_ms, wait_ms

    def count_commit(
        self, *, step: int, nbytes: int, write_s: float, fsync_s: float, total_ms: float
    ) -> float:
        """The writer committed a checkpoint; return its throughput in MB/s."""
        mb_s = nbytes / 1e6 / max(total_ms / 1000.0, 1e-9)
        with self._lock:
            self.committed += 1
            self.bytes_written += nbytes
            self.last_step = step
            self.last_bytes = nbytes
            self.last_write_ms = write_s * 1000.0
            self.last_fsync_ms = fsync_s * 1000.0
            self.last_total_ms = total_ms
            self.last_mb_s = mb_s
        return mb_s

    def count_failure(self) -> None:
        """A save failed in the writer."""
        with self._lock:
            self.failed += 1

    def report(self, *, pending: int, staging_bytes: int, staging_allocations: int) -> CheckpointerStats:
        """The figures at this moment, with what the pending saves and the staging pool add."""
        with self._lock:
            return CheckpointerStats(
                saves=self.saves,
                committed=self.committed,
                failed=self.failed,
                skipped=self.skipped,
                waits=self.waits,
                pending=pending,
                bytes_written=self.bytes_written,
                last_step=self.last_step,
                last_stall_ms=self.last_stall_ms,
                last_wait_ms=self.last_wait_ms,
                last_write_ms=self.last_write_ms,
                last_fsync_ms=self.last_fsync_ms,
                last_total_ms=self.last_total_ms,
                last_bytes=self.last_bytes,
                last_mb_s=self.last_mb_s,
                staging_bytes=staging_bytes,
                staging_allocations=staging_allocations,
            )
