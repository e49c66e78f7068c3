"""What a rollback load tells: the diagnoses, the one-line summary, the ``checkpoint.load.summary``
event and the lines of ``failed_checkpoints.txt`` (appended through the storage).

Reporting never fails the load: a failure log that cannot be written only warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import structlog

from ..catalog import FAILED_LOG_NAME
from ..errors import CheckpointError, Diagnostic, IncompatibleCheckpointError
from ..format.legacy import LEGACY_VERSION
from ..storage import Storage
from .candidate import Loaded
from .candidates import Candidate
from .expect import count
from .options import Log

SUMMARY_EVENT = "checkpoint.load.summary"


@dataclass(frozen=True)
class Failure:
    """A candidate that was tried and why it failed."""

    candidate: Candidate
    diagnostic: Diagnostic


def diagnose(candidate: Candidate, exc: CheckpointError) -> Diagnostic:
    """The one-line diagnosis of ``candidate`` from its error's ``reason`` field."""
    kind: Literal["corrupted", "incompatible"] = (
        "incompatible" if isinstance(exc, IncompatibleCheckpointError) else "corrupted"
    )
    return Diagnostic(candidate.where, kind, " ".join(exc.reason.split()), _now(), step=candidate.step)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def report(
    storage: Storage,
    candidates: Sequence[Candidate],
    failures: Sequence[Failure],
    chosen: tuple[Candidate, Loaded] | None,
    log: Log | None,
) -> str:
    """Record the failures, then log and return the summary."""
    diagnostics = [failure.diagnostic for failure in failures]
    record_failures(storage, diagnostics)
    text = summary(candidates, failures, chosen)
    emit(log, text, chosen, failed=bool(failures), diagnostics=diagnostics)
    return text


def summary(
    candidates: Sequence[Candidate], failures: Sequence[Failure], chosen: tuple[Candidate, Loaded] | None
) -> str:
    """``found 3 checkpoints (1 valid, 1 corrupted, 1 not checked); resuming from step 200 (...)``.

    ``candidates`` is the last listing; failures of candidates pruned since count as well.
    """
    listed = {candidate.name for candidate in candidates}
    total = len(listed) + sum(failure.candidate.name not in listed for failure in failures)
    counts = {"valid": int(chosen is not None), "corrupted": 0, "incompatible": 0}
    for failure in failures:
        counts[failure.diagnostic.kind] += 1
    counts["not checked"] = total - len(failures) - counts["valid"]
    parts = [f"{n} {what}" for what, n in counts.items() if n or what == "valid"]
    text = f"found {count(total, 'checkpoint')} ({', '.join(parts)})"
    failed = "; ".join(f"{f.candidate.label} {f.diagnostic.kind}: {f.diagnostic.reason}" for f in failures)
    if chosen is None:
        stopped = counts["not checked"] > 0  # on_corrupt="fail"
        return text + (
            f"; stopped at the first failure: {failed}" if stopped else f"; no usable checkpoint: {failed}"
        )
    details = _legacy_details(chosen, failures) + ([f"fallback: {failed}"] if failures else [])
    text += f"; resuming from step {chosen[1].step}" + (f" ({', '.join(details)})" if details else "")
    if chosen[1].notes:
        text += f"; dtype differences (converted on load): {'; '.join(chosen[1].notes)}"
    return text


def _legacy_details(chosen: tuple[Candidate, Loaded], failures: Sequence[Failure]) -> list[str]:
    """A legacy file is named as such, and an unverified one says so, above all when it takes the
    place of an asyncckpt file of the same step that failed."""
    loaded = chosen[1]
    if loaded.version != LEGACY_VERSION:
        return []
    if loaded.verified:
        return [f"legacy format {LEGACY_VERSION}"]
    same_step = any(f.candidate.step == loaded.step and f.candidate.named_step is not None for f in failures)
    note = ", chosen over the failed asyncckpt file of the same step" if same_step else ""
    return [f"legacy format {LEGACY_VERSION}, unverified{note}"]


def emit(
    log: Log | None,
    text: str,
    chosen: tuple[Candidate, Loaded] | None,
    *,
    failed: bool,
    diagnostics: Sequence[Diagnostic] = (),
) -> None:
    """Log the summary as the ``checkpoint.load.summary`` event (default: structlog's
    "asyncckpt" logger, at warning level when a candidate failed)."""
    fields = _event_fields(text, chosen, diagnostics)
    if log is not None:
        log(SUMMARY_EVENT, **fields)
        return
    logger = structlog.get_logger("asyncckpt")
    try:
        (logger.warning if failed else logger.info)(SUMMARY_EVENT, **fields)
    except (OSError, UnicodeError, ValueError) as exc:  # a closed or narrow stdout: say so, go on
        warnings.warn(f"cannot log {SUMMARY_EVENT}: {printable(str(exc))}", RuntimeWarning, stacklevel=5)


def _event_fields(
    text: str, chosen: tuple[Candidate, Loaded] | None, diagnostics: Sequence[Diagnostic]
) -> dict[str, Any]:
    return dict(
        summary=printable(text),
        step=chosen[1].step if chosen else None,
        path=printable(chosen[0].where) if chosen else None,
        version=chosen[1].version if chosen else None,
        failures=[
            {"path": printable(d.path), "kind": d.kind, "reason": printable(d.reason)} for d in diagnostics
        ],
    )


def printable(text: str) -> str:
    """``text`` as valid Unicode (it always encodes as UTF-8): the bytes of a name that is not
    UTF-8 (Linux names are bytes; Python keeps them as lone surrogates) become ``\\xNN``, as
    Python writes bytes, and any other lone surrogate ``\\udXXX``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(map(_printable_char, text))
    return text


def _printable_char(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return char if not 0xD800 <= code <= 0xDFFF else f"\\u{code:04x}"


def record_failures(storage: Storage, diagnostics: Sequence[Diagnostic]) -> None:
    """Append ``{path}|{reason}|{timestamp}`` lines to ``failed_checkpoints.txt``; a storage that
    refuses (a read-only directory) only warns."""
    for diagnostic in diagnostics:
        line = f"{_path_field(diagnostic.path)}|{_reason_field(diagnostic.reason)}|{diagnostic.timestamp}"
        try:
            storage.append_line(FAILED_LOG_NAME, line)
        except (OSError, UnicodeError) as exc:
            text = printable(f"cannot record failed checkpoints in {storage.where(FAILED_LOG_NAME)}: {exc}")
            warnings.warn(text, RuntimeWarning, stacklevel=6)
            return


def _reason_field(text: str) -> str:
    return " ".join(text.replace("|", "/").split())


def _path_field(path: str) -> str:
    """The path with ``%``, ``|`` and line breaks escaped, and bytes that are not UTF-8 (a Linux
    name is bytes) as ``%XX``, so that the line can always be written."""
    escaped = path.replace("%", "%25").replace("|", "%7C").replace("\n", "%0A").replace("\r", "%0D")
    return "".join(f"%{ord(c) - 0xDC00:02X}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in escaped)
