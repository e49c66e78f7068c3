"""Discovery: the candidates of a checkpoint directory, newest first, through the Storage seam.

Candidates are the committed ``step-*.ckpt`` objects (their step from the name), ``*.ckpt``
objects at names a caller chose (``last.ckpt``, ``epoch=3-step=120.ckpt``: their step from their
header) and legacy ``torch.save`` files (``*.pt``, ``*.pth``), whose step is read from their
content (cheaply: the pickled structure only) or, failing that, from the last number in their
name. A legacy file
without a step is a candidate too, tried last: a resume cannot place it among the steps, so
it is diagnosed incompatible (:func:`require_step`), by the resume and by ``check_candidates``
alike. An object that disappears while it is listed or probed (retention pruned it) is no
candidate.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path, PurePosixPath

from ..catalog import kind_of, newest_first_key, parse_checkpoint_name
from ..errors import CheckpointError, CorruptedCheckpointError, IncompatibleCheckpointError
from ..format import FileKind
from ..format.legacy import legacy_step
from ..reader import file_kind, read_layout, read_legacy
from ..storage import CheckpointPath, ReadHandle, Storage, path_of


@dataclass(frozen=True)
class Candidate:
    """One object a resume may load.

    ``step`` orders it (None: a legacy file without one); ``named_step`` is the step its name
    says (``step-N.ckpt``), which its content must agree with; ``error`` was found while its
    step was read (the candidate fails with it).
    """

    name: str
    where: str  # its full location, for messages
    step: int | None
    size: int
    named_step: int | None = None
    error: CheckpointError | None = None
    # When it was written (a timestamp): orders two files of one step. A v1 file's header says
    # it to the microsecond; file times may be as coarse as the kernel's clock tick.
    modified: float = 0.0

    @property
    def path(self) -> CheckpointPath:
        """Where it is: a ``Path``, or a :class:`~asyncckpt.storage.RemotePath` for a URL."""
        return path_of(self.where)

    @property
    def label(self) -> str:
        """How a summary names it: ``step 300``, or the file name when there is no step."""
        return f"step {self.step}" if self.step is not None else PurePosixPath(self.name).name


def discover(storage: Storage) -> list[Candidate]:
    """The candidates of ``storage``'s root, newest step first (an asyncckpt file before a legacy
    one of the same step; legacy files without a step last). A missing root has none; one that
    may not be listed raises :func:`unlistable`'s :class:`CheckpointError`."""
    try:
        listing = storage.ls()
    except PermissionError as exc:
        raise unlistable(storage.location, exc) from exc
    found = []
    for entry in listing:
        if entry.kind != "file":
            continue
        kind = kind_of(entry.name)
        modified = entry.modified.timestamp()
        if kind == "checkpoint":
            step = parse_checkpoint_name(entry.name)
            where = storage.where(entry.name)
            found.append(Candidate(entry.name, where, step, entry.size, step, modified=modified))
        elif kind in ("named", "legacy"):
            try:
                candidate = probe(storage, entry.name, entry.size)
            except FileNotFoundError:  # pruned since it was listed
                continue
            found.append(candidate if candidate.modified else replace(candidate, modified=modified))
    return sorted(found, key=lambda c: newest_first_key(c.step, c.name, c.modified))


def probe(storage: Storage, name: str, size: int = 0) -> Candidate:
    """A candidate for any object: its step is the one its name says (``step-N.ckpt``, checked
    against its content when it is loaded), else the one its content says (a v1 header, or a
    legacy file's pickled structure), else the last number in its name. ``size`` is the
    listing's, used when the object cannot be opened. Raises ``FileNotFoundError`` when it is
    gone."""
    where = storage.where(name)
    named = parse_checkpoint_name(name)
    try:
        handle = storage.open(name)
    except FileNotFoundError:
        raise
    except OSError as exc:
        error: CheckpointError = unopenable(where, exc)
    except CheckpointError as exc:  # a store that commits with a record: the record is damaged
        error = exc
    else:
        try:
            with handle:
                step, written = _content_step(handle, where, name)
                return Candidate(
                    name, where, step if named is None else named, handle.size, named, modified=written
                )
        except FileNotFoundError:
            raise
        except OSError as exc:
            error, size = unreadable(where, exc), handle.size
        except CheckpointError as exc:
            error, size = exc, handle.size
    step = named if named is not None else legacy_step(None, Path(name))
    return Candidate(name, where, step, size, named, error)


def require_step(candidate: Candidate) -> int:
    """The candidate's step; :class:`IncompatibleCheckpointError` for a legacy file without one."""
    if candidate.step is None:
        raise no_step(candidate.where)
    return candidate.step


def no_step(where: str) -> IncompatibleCheckpointError:
    """Why a legacy file without a step is never loaded by a resume."""
    return IncompatibleCheckpointError(
        "legacy torch.save file without a step (no 'step' or 'global_step' entry and no number "
        "in its name): a resume cannot place it among the steps",
        path=where,
    )


def check_named_step(candidate: Candidate, step: int) -> None:
    """Refuse content whose step differs from the one its name says (a copied or renamed file):
    :class:`IncompatibleCheckpointError`, never a silent load of another step."""
    if candidate.named_step is not None and step != candidate.named_step:
        raise IncompatibleCheckpointError(
            f"the file name says step {candidate.named_step} but the checkpoint holds step {step} "
            "(a copied or renamed file?)",
            path=candidate.where,
            step=step,
        )


def unreadable(where: str, exc: OSError) -> CorruptedCheckpointError:
    """The diagnosis of an object the storage fails to read."""
    return CorruptedCheckpointError(f"cannot be read: {exc.strerror or exc}", path=where)


def unlistable(location: str, exc: OSError) -> CheckpointError:
    """The error of a run directory a reader may not list (EACCES, EPERM): it cannot tell whether
    the directory holds checkpoints, so it never answers "none" (a fresh start) either."""
    name = errno.errorcode.get(exc.errno or 0, "?")
    return CheckpointError(
        f"cannot read the run directory ({name}: {exc.strerror or exc}); cannot tell whether it holds "
        "checkpoints: fix its permissions (or the path) and retry",
        path=location,
    )


def unopenable(where: str, exc: OSError) -> CorruptedCheckpointError:
    """The diagnosis of an object the storage fails to open (not one that is gone)."""
    return CorruptedCheckpointError(f"cannot be opened: {exc.strerror or exc}", path=where)


def _content_step(handle: ReadHandle, where: str, name: str) -> tuple[int | None, float]:
    """The step the content says, and when a v1 header says it was written (0.0: unknown)."""
    kind = file_kind(handle, where)
    if kind is FileKind.V1:
        layout = read_layout(handle, where)
        return layout.step, _timestamp(layout.created)
    return legacy_step(read_legacy(handle, kind, where=where, mmap=True).state, Path(name)), 0.0


def _timestamp(created: str) -> float:
    try:
        return datetime.fromisoformat(created).timestamp()
    except ValueError:
        return 0.0
