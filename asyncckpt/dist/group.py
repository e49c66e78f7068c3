"""asyncckpt's own coordination group: gloo, over the trainer's ranks, never the trainer's group.

Every collective asyncckpt runs (the step agreement, DCP's plan and result exchange, the restore
vote) goes through it, so none can interleave with, or deadlock against, the trainer's own
collectives, and every one is bounded by the group's timeout: a rank that dies, stops, or does
not make the same call ends in :class:`asyncckpt.CoordinationError` on the others, not a hang.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from ..errors import CoordinationError, UsageError

DEFAULT_TIMEOUT_S = 300.0
T = TypeVar("T")


class CoordinationGroup:
    """A gloo process group of asyncckpt's own over ``process_group``'s ranks (default: all).

    Creating one is collective: every rank of ``process_group`` (of the default group when
    ``process_group`` is None) creates it at the same point of its program. Without an
    initialized ``torch.distributed`` it is a group of one (rank 0, no communication).
    ``timeout`` (seconds) bounds every collective. After a collective failed (a timeout, a lost
    peer) the group is unusable: later calls raise at once.
    """

    def __init__(
        self, process_group: dist.ProcessGroup | None = None, *, timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        if not timeout > 0:
            raise UsageError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self._broken: str | None = None
        self.group: dist.ProcessGroup | None = None
        self.rank = 0
        self.world_size = 1
        if not (dist.is_available() and dist.is_initialized()):
            return
        parent = process_group if process_group is not None else dist.group.WORLD
        assert parent is not None
        ranks = dist.get_process_group_ranks(parent)
        try:
            self.group = dist.new_group(
                ranks=ranks,
                backend="gloo",
                timeout=timedelta(seconds=self.timeout),
                use_local_synchronization=len(ranks) != dist.get_world_size(),
            )
        except Exception as exc:  # the store barrier timed out: not every rank got here
            raise CoordinationError(
                f"creating asyncckpt's coordination group over ranks {ranks[:8]}"
                f"{'...' if len(ranks) > 8 else ''}: not every rank joined within {self.timeout:g} s "
                f"({first_line(exc)}). Every rank of the group opens the checkpointer (or creates "
                "the CoordinationGroup) at the same point; to checkpoint from one rank only, pass "
                "process_group=dist.new_group([rank], use_local_synchronization=True)",
                rank=dist.get_rank(),
            ) from exc
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)

    @property
    def distributed(self) -> bool:
        """Whether there are other ranks to talk to (a process group exists)."""
        return self.group is not None

    def all_gather(self, value: Any, *, what: str) -> list[Any]:
        """Every rank's ``value``, by rank. ``what`` names the exchange in errors.

        Raises :class:`CoordinationError` when a rank does not answer within the timeout or is
        gone; the group is then unusable.
        """
        self.check_usable(what)
        if self.group is None:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(gathered, value, group=self.group)
        except Exception as exc:  # gloo raises RuntimeError (or DistBackendError) on timeouts and lost peers
            raise self.failed(what, exc) from exc
        return gathered

    def gather_outcomes(
        self,
        work: Callable[[], T],
        *,
        what: str,
        error: Callable[..., Exception],
        call: tuple[str, int | None] | None = None,
        same: tuple[str, Any] | None = None,
    ) -> T:
        """Run ``work`` here; return its result once every rank's ``work`` succeeded.

        If ``work`` raised on any rank, every rank raises, so that no rank goes on to a
        collective the others will not join: a rank whose ``work`` raised re-raises its own
        error; the others raise ``error(reason, rank=...)`` naming each failed rank and its
        error. Only success or the error's text travels between ranks. ``call`` (an operation
        and its step) is checked in the same exchange, as :meth:`agree` does, before anything
        else: ``work`` must then have no effect the other ranks depend on. ``same`` (a
        description and a value) must be equal on every rank, checked in the same exchange after
        the outcomes: otherwise every rank raises ``error`` naming the ranks that differ from
        rank 0.
        """
        mine: BaseException | None = None
        result: T | None = None
        try:
            result = work()
            outcome = None
        except Exception as exc:
            mine = exc
            outcome = f"{type(exc).__name__}: {first_line(exc)}"
        value = same[1] if same is not None else None
        gathered = self.all_gather((call, outcome, value), what=what)
        if call is not None:
            self._same_calls([c for c, _, _ in gathered], call)
        outcomes = [o for _, o, _ in gathered]
        failed = [(rank, text) for rank, text in enumerate(outcomes) if text is not None]
        if failed:
            if mine is not None:
                raise mine
            listing = "; ".join(f"rank {rank}: {text}" for rank, text in failed)
            reason = f"{what} failed on {len(failed)} of {self.world_size} ranks: {listing}"
            raise error(reason, rank=failed[0][0])
        differ = [rank for rank, (_, _, v) in enumerate(gathered) if v != gathered[0][2]]
        if same is not None and differ:
            reason = (
                f"{what}: {same[0]} differ between ranks: rank(s) {differ[:8]} "
                f"{'... ' if len(differ) > 8 else ''}do not match rank 0; every rank must hold the same"
            )
            raise error(reason, rank=differ[0])
        return result  # type: ignore[return-value]  # work() returned: result is a T

    def agree(self, operation: str, step: int | None) -> None:
        """Check that every rank makes the same call (``operation`` of ``step``) now.

        Raises :class:`CoordinationError` on every rank, listing each rank's call, when they differ.
        """
        # The shape of gather_outcomes' exchange, so that a rank here and one there compare calls.
        gathered = self.all_gather(((operation, step), None, None), what=f"{operation} (step {step})")
        self._same_calls([c for c, _, _ in gathered], (operation, step))

    def _same_calls(self, calls: list[Any], mine: tuple[str, int | None]) -> None:
        if len(set(calls)) > 1:
            listing = ", ".join(f"rank {rank}: {_call_text(call)}" for rank, call in enumerate(calls))
            raise CoordinationError(
                f"the ranks did not make the same call ({listing}); every rank must call {mine[0]} "
                "with the same step, in the same order",
                rank=self.rank,
                step=mine[1],
            )

    def check_usable(self, what: str) -> None:
        """Raise :class:`CoordinationError` when an earlier collective failed."""
        if self._broken is not None:
            raise CoordinationError(
                f"{what}: the coordination group is unusable since an earlier failure ({self._broken}); "
                "restart every rank",
                rank=self.rank,
            )

    def failed(self, what: str, exc: BaseException) -> CoordinationError:
        """Mark the group unusable after ``exc`` broke a collective; the error to raise."""
        self._broken = f"{what}: {first_line(exc)}"
        return CoordinationError(
            f"{what}: not every rank answered within {self.timeout:g} s (a rank died, stopped, or is not "
            f"making this call): {first_line(exc)}",
            rank=self.rank,
        )

    def close(self) -> None:
        """Destroy the process group (every rank should close it)."""
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
        self._broken = "the group was closed"


def _call_text(call: Any) -> str:
    """``save step 3``, ``restore``; what a rank in another kind of exchange sent is not a call."""
    if not (isinstance(call, tuple) and len(call) == 2):
        return "another exchange"
    operation, step = call
    return str(operation) if step is None else f"{operation} step {step}"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
