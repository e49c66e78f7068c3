"""Loading one candidate: decode it, check it (step, expect), read it, apply it to the objects.

Every check that needs no tensor data comes first (header, the step its name says, the
expected keys and shapes), so an incompatible checkpoint is diagnosed before a byte is read
into the caller's objects. A candidate that is gone when it is opened raises :class:`Vanished`:
retention pruned it, which is no fault of the file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import format as fmt
from .._gc import gc_paused
from .._tree import unflatten
from ..errors import IncompatibleCheckpointError
from ..format import FileKind
from ..format.legacy import LEGACY_VERSION, legacy_step
from ..reader import file_kind, read_layout, read_legacy, read_tensors
from ..storage import ReadHandle, Storage
from .candidates import Candidate, check_named_step, no_step, require_step, unopenable, unreadable
from .expect import Expected, fit, layout_index, layout_refs, state_index
from .live import check_live, check_steps, layout_incoming, state_incoming
from .modules import LiveModules
from .optimizers import optimizer_state
from .options import Verify
from .targets import Targets, direct_targets, loaded_in_place


class Vanished(Exception):
    """The candidate disappeared between listing and opening (pruned): skip it, diagnose nothing."""


@dataclass(frozen=True)
class Request:
    """What a rollback load asks of every candidate."""

    device: torch.device
    verify: Verify
    checks: tuple[Expected, ...]
    objects: Mapping[str, Any] | None  # restore's targets
    modules: LiveModules | None = None  # their modules' state dicts (with objects)


@dataclass(frozen=True)
class Loaded:
    """A candidate that loaded: its state and what the summary says about it."""

    state: Any
    step: int
    version: str
    metadata: dict[str, Any]
    notes: list[str]  # dtype differences
    verified: bool  # every checksum it has was checked


@contextlib.contextmanager
def opened(storage: Storage, candidate: Candidate) -> Iterator[ReadHandle]:
    """The candidate's handle; :class:`Vanished` when it is gone, and a storage failure is a
    :class:`CorruptedCheckpointError` ("cannot be opened", "cannot be read")."""
    try:
        handle = storage.open(candidate.name)
    except FileNotFoundError as exc:
        raise Vanished(candidate.where) from exc
    except OSError as exc:
        raise unopenable(candidate.where, exc) from exc
    try:
        with handle:
            yield handle
    except FileNotFoundError as exc:  # a storage (or a path-based reader) that notices the removal
        raise Vanished(candidate.where) from exc
    except OSError as exc:
        raise unreadable(candidate.where, exc) from exc


def load_candidate(storage: Storage, candidate: Candidate, request: Request) -> Loaded:
    """Load ``candidate`` as ``request`` says, into ``request.objects`` when given.

    Raises :class:`CorruptedCheckpointError` or :class:`IncompatibleCheckpointError`
    (``path``), or :class:`Vanished`.
    """
    if candidate.error is not None:
        raise candidate.error
    require_step(candidate)
    # Several small objects per tensor, none cyclic, and most alive until the end: with a
    # trainer's many live objects, the full collections they trigger cost more than all the
    # checks (a third of a restore at 10,000 tensors). The few cycles torch's load_state_dict
    # makes (closures) wait for the collector to resume.
    with gc_paused(), opened(storage, candidate) as handle:
        kind = file_kind(handle, candidate.where)
        if kind is FileKind.V1:
            return _load_v1(handle, candidate, request)
        return _load_legacy(handle, kind, candidate, request)


def _load_v1(handle: ReadHandle, candidate: Candidate, request: Request) -> Loaded:
    where = candidate.where
    layout = layout_of(handle, candidate)
    refs = layout_refs(layout)
    notes = fit(layout.tree, layout_index(layout, refs), request.checks, where) if request.checks else []
    targets = None
    if request.objects is not None:
        modules = _live_modules(request).states()
        check_live(request.objects, layout.tree, layout_incoming(layout, refs), where, modules)
        targets = direct_targets(request.objects, layout, refs, modules)
    checksums = request.verify == "full"
    tensors = read_tensors(
        handle,
        layout,
        where=where,
        checksums=checksums,
        device=request.device,
        targets=targets.blobs if targets is not None else None,
    )
    state = unflatten(layout.tree, tensors)
    if request.objects is not None:
        check_steps(request.objects, state, where)
        apply(request.objects, state, where, _live_modules(request), in_place=targets)
    metadata = unflatten(layout.metadata, [])
    return Loaded(
        state, layout.step, layout.version, metadata if isinstance(metadata, dict) else {}, notes, checksums
    )


def _load_legacy(handle: ReadHandle, kind: FileKind, candidate: Candidate, request: Request) -> Loaded:
    where = candidate.where
    legacy = read_legacy(
        handle, kind, where=where, map_location=request.device, checksums=request.verify == "full"
    )
    step = legacy_step(legacy.state, Path(candidate.name))
    if step is None:  # the file changed since it was listed
        raise no_step(where)
    check_named_step(candidate, step)
    notes = fit(legacy.state, state_index(legacy.state), request.checks, where)
    if request.objects is not None:
        modules = _live_modules(request)
        check_live(request.objects, legacy.state, state_incoming(legacy.state), where, modules.states())
        check_steps(request.objects, legacy.state, where)
        apply(request.objects, legacy.state, where, modules)
    return Loaded(legacy.state, step, LEGACY_VERSION, {}, notes, legacy.verified)


def _live_modules(request: Request) -> LiveModules:
    if request.modules is not None:
        return request.modules
    assert request.objects is not None
    return LiveModules(request.objects)


def apply(
    objects: Mapping[str, Any],
    state: Any,
    where: str,
    modules: LiveModules,
    *,
    in_place: Targets | None = None,
) -> None:
    """``load_state_dict(state[name])`` on every object (``strict=True`` for modules); a refusal
    is an :class:`IncompatibleCheckpointError`.

    ``in_place``: where the reader read blobs straight into; a module that holds its whole
    state that way is left alone (:func:`~.targets.loaded_in_place`). ``modules`` is told when
    a ``load_state_dict`` runs (it may change any module).
    """
    if not isinstance(state, Mapping):
        raise IncompatibleCheckpointError(f"the state is a {type(state).__name__}, not a dict", path=where)
    for name, obj in objects.items():
        if name not in state:
            raise IncompatibleCheckpointError(f"missing {name!r}", path=where)
        try:
            module = isinstance(obj, torch.nn.Module)
            if module and in_place is not None and loaded_in_place(name, obj, state[name], in_place):
                continue
            modules.touched()  # a load_state_dict may change any module
            if module:
                obj.load_state_dict(state[name], strict=True)
            elif isinstance(obj, torch.optim.Optimizer):
                obj.load_state_dict(optimizer_state(obj, state[name]))
            else:
                obj.load_state_dict(state[name])
        except Exception as exc:  # load_state_dict raises RuntimeError, ValueError, KeyError, ...
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise IncompatibleCheckpointError(
                f"{name}.load_state_dict refused the checkpoint: {reason}", path=where, key=name
            ) from exc


def layout_of(handle: ReadHandle, candidate: Candidate) -> fmt.Layout:
    """The checked header of a v1 candidate whose step agrees with its name."""
    layout = read_layout(handle, candidate.where)
    check_named_step(candidate, layout.step)
    return layout
