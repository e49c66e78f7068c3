"""Rollback: load the newest usable checkpoint of a directory, falling back past broken ones.

Candidates (:mod:`.candidates`) are tried newest first (:mod:`.candidate`); each failure becomes
a :class:`Diagnostic`, a line of ``failed_checkpoints.txt`` and part of the summary
(:mod:`.report`). A candidate that vanished between listing and opening was pruned by a writer's
retention, not broken: the directory is listed again and the newest candidate not yet tried
comes next, so the answer is a step that was committed at some instant. An empty listing is
believed only when the next one is empty too (a listing racing a writer can miss a file renamed
in while the one it replaces is deleted). The loader never modifies or deletes a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..catalog import FAILED_LOG_NAME
from ..errors import CheckpointError, Diagnostic, NoValidCheckpointError
from ..storage import CheckpointPath, Location, Storage, open_storage
from .candidate import Loaded, Request, Vanished, load_candidate
from .candidates import Candidate, discover
from .expect import Expected, expected_for_restore, expected_from
from .modules import LiveModules
from .options import ON_CORRUPT_MODES, VERIFY_MODES, Log, MapLocation, OnCorrupt, Verify, one_of
from .report import Failure, diagnose, emit, report

MAX_LISTINGS = 16  # after this many listings, a candidate that vanishes is just skipped


@dataclass(frozen=True)
class LoadResult:
    """The checkpoint a rollback load resumed from.

    ``source`` is "primary" when the newest candidate loaded, "fallback" otherwise; then
    ``diagnostics`` says why each newer candidate was skipped. ``summary`` is the one-line text
    that was logged. ``version`` is the file's format version ("0.x" for legacy files).
    ``path`` is a ``Path``, or a :class:`~asyncckpt.storage.RemotePath` (the URL) on an object
    store.
    """

    state: Any
    step: int
    path: CheckpointPath
    version: str
    source: Literal["primary", "fallback"]
    diagnostics: list[Diagnostic]
    summary: str
    metadata: dict[str, Any] = field(default_factory=dict)


def load_latest(
    directory: Location,
    *,
    map_location: MapLocation = "cpu",
    on_corrupt: OnCorrupt = "fallback",
    verify: Verify = "full",
    expect: Any = None,
    log: Log | None = None,
    storage_options: dict[str, Any] | None = None,
) -> LoadResult:
    """Load the newest usable checkpoint in ``directory``, falling back past broken ones.

    Each candidate, newest step first, is checked as ``verify`` says (``"full"``: structure and
    every checksum; ``"structure"`` / ``"none"``: no tensor checksums) and, when ``expect`` is
    given (a state tree or objects with ``state_dict()``), against its tensors: missing or
    unexpected keys and shape mismatches make a candidate incompatible; dtype differences are
    only reported in the summary. A file whose name says another step than its content is
    incompatible. With ``on_corrupt="fallback"`` a failed candidate is diagnosed and the next
    one tried; with ``"fail"`` the first failure is raised at once
    (:class:`CorruptedCheckpointError` or :class:`IncompatibleCheckpointError`). Failures are
    appended to ``<directory>/failed_checkpoints.txt`` (a read-only directory only warns); the
    summary is logged as the ``checkpoint.load.summary`` event through ``log`` (default:
    structlog's "asyncckpt" logger). A checkpoint pruned while the loader runs is skipped, not
    diagnosed.

    Raises :class:`NoValidCheckpointError` (``path``: the directory) when no candidate is
    usable, with every diagnosis in its ``diagnostics``; for an empty or missing directory its
    reason is "no checkpoints" and ``diagnostics`` is empty. :class:`UsageError` for a bad
    option, ``NotADirectoryError`` when ``directory`` is a file, :class:`CheckpointError`
    (``path``: the directory) when it may not be listed (permission denied). Blocking: call it
    from a worker thread in async code.

    ``directory`` may be a URL (``s3://bucket/run``): ``storage_options`` go to fsspec
    (credentials, ``endpoint_url``, ...), the candidates come from one LIST, and blobs are read
    with parallel ranged GETs straight into their memory, every checksum verified as locally.
    """
    request = Request(torch.device(map_location), _verify(verify), _checks(expect), None)
    storage = open_storage(directory, storage_options=storage_options)
    return _Rollback(storage, request, on_corrupt, log).run()


def restore(
    directory: Location,
    objects: Mapping[str, Any],
    *,
    map_location: MapLocation = "cpu",
    on_corrupt: OnCorrupt = "fallback",
    verify: Verify = "full",
    expect: Any = None,
    log: Log | None = None,
    storage_options: dict[str, Any] | None = None,
) -> LoadResult:
    """Load the newest usable checkpoint into ``objects`` (name → object with ``load_state_dict``).

    Like :func:`load_latest`, and besides: a candidate must hold every name of ``objects``, the
    exact tensor keys and shapes of each ``torch.nn.Module`` and the parameter-group sizes of
    each optimizer, all checked before anything is read into an object, and every tensor that
    would go into a live object is checked against the tensor there (:mod:`.live`: its shape
    and kind of dtype; an optimizer's state against its parameter when the optimizer has none
    yet; a view that reads more elements than its bytes hold only into a live tensor of its
    size), so a file cannot make a restore allocate beyond its own size. Each object then gets
    ``load_state_dict(state[name])`` (``strict=True`` for modules); a refusal makes the candidate
    incompatible and the next one is tried. A module's tensors are read from the file straight
    into their own memory when dtype and shape match (CUDA tensors through pinned host bounce
    buffers), and so is an optimizer's state when it already has some (an in-process rollback),
    so no second copy is made; ``result.state`` then shares that memory.
    Big files are read by several threads at once.

    When a candidate fails halfway, some objects may already hold its data; a later candidate
    that loads overwrites all of them. If :class:`NoValidCheckpointError` is raised, do not use
    the objects unless its ``diagnostics`` is empty: that means the directory has no candidate
    at all (a fresh start) and nothing was touched. ``TypeError`` for an object without
    ``load_state_dict``. ``directory`` and ``storage_options`` as for :func:`load_latest`.
    """
    for name, obj in objects.items():
        if not callable(getattr(obj, "load_state_dict", None)):
            raise TypeError(f"objects[{name!r}] ({type(obj).__qualname__}) has no load_state_dict()")
    modules = LiveModules(objects)  # each module's state_dict(), taken once for every check
    checks = (*_checks(expect), expected_for_restore(objects, modules.states()))
    request = Request(torch.device(map_location), _verify(verify), checks, objects, modules)
    storage = open_storage(directory, storage_options=storage_options)
    return _Rollback(storage, request, on_corrupt, log).run()


def _verify(verify: Any) -> Verify:
    return one_of("verify", verify, VERIFY_MODES)


def _checks(expect: Any) -> tuple[Expected, ...]:
    return () if expect is None else (expected_from(expect),)


_Chosen = tuple[Candidate, Loaded]


class _Relist(Exception):
    """A candidate vanished: list the directory again."""


class _Rollback:
    """One rollback load: the candidates tried so far and why they failed."""

    def __init__(self, storage: Storage, request: Request, on_corrupt: Any, log: Log | None) -> None:
        self.storage = storage
        self.request = request
        self.on_corrupt = one_of("on_corrupt", on_corrupt, ON_CORRUPT_MODES)
        self.log = log
        self.failures: list[Failure] = []
        self.vanished: set[str] = set()

    def run(self) -> LoadResult:
        candidates: list[Candidate] = []
        chosen: _Chosen | None = None
        empty_listings = 0
        for listing in range(MAX_LISTINGS):
            last = listing + 1 == MAX_LISTINGS
            candidates = discover(self.storage)
            empty_listings = 0 if candidates else empty_listings + 1
            if empty_listings == 1 and not last:
                # A listing is no snapshot: one that races a writer's rename and its retention's
                # delete may miss both files. Believe an empty directory when it lists so twice.
                continue
            try:
                chosen = self._first_usable(candidates, relist=not last)
            except _Relist:
                continue
            break
        return self._finish(candidates, chosen)

    def _first_usable(self, candidates: list[Candidate], *, relist: bool) -> _Chosen | None:
        tried = {failure.candidate.name for failure in self.failures}
        for candidate in candidates:
            if candidate.name in tried:
                continue
            try:
                return candidate, load_candidate(self.storage, candidate, self.request)
            except Vanished:
                if relist:
                    raise _Relist from None
                self.vanished.add(candidate.name)
            except CheckpointError as exc:
                self.failures.append(Failure(candidate, diagnose(candidate, exc)))
                if self.on_corrupt == "fail":
                    report(self.storage, candidates, self.failures, None, self.log)
                    raise
        return None

    def _newer_unreadable(self, candidates: list[Candidate], chosen: Candidate) -> list[Failure]:
        """Damaged candidates with no step, written after ``chosen``: their step cannot be read,
        so they sort last and are never tried, yet they are most likely newer (a damaged
        ``last.ckpt``). Named, so that the resume does not go back silently."""
        tried = {failure.candidate.name for failure in self.failures}
        return [
            Failure(candidate, diagnose(candidate, candidate.error))
            for candidate in candidates
            if candidate.error is not None
            and candidate.step is None
            and candidate.name not in tried
            and candidate.modified > chosen.modified
        ]

    def _nothing_to_load(self) -> LoadResult:
        text = f"no checkpoints in {self.storage.location}"
        emit(self.log, text, None, failed=False)
        raise NoValidCheckpointError("no checkpoints", [], path=self.storage.location)

    def _finish(self, candidates: list[Candidate], chosen: _Chosen | None) -> LoadResult:
        if chosen is None and not self.failures:  # every candidate vanished
            return self._nothing_to_load()
        candidates = [candidate for candidate in candidates if candidate.name not in self.vanished]
        if chosen is not None:
            self.failures += self._newer_unreadable(candidates, chosen[0])
        text = report(self.storage, candidates, self.failures, chosen, self.log)
        diagnostics = [failure.diagnostic for failure in self.failures]
        if chosen is None:
            raise NoValidCheckpointError(
                f"no valid checkpoint: {text}; failures are listed in {self.storage.where(FAILED_LOG_NAME)}",
                diagnostics,
                path=self.storage.location,
            )
        candidate, loaded = chosen
        return LoadResult(
            state=loaded.state,
            step=loaded.step,
            path=candidate.path,
            version=loaded.version,
            source="fallback" if self.failures else "primary",
            diagnostics=diagnostics,
            summary=text,
            metadata=loaded.metadata,
        )
