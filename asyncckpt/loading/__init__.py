"""The load side: find, check and load checkpoints, newest first, with rollback and diagnoses.

One module per job: :mod:`.candidates` (discovery, newest first), :mod:`.expect` (does a
checkpoint fit the expected state), :mod:`.targets` (live tensors a blob is read straight into),
:mod:`.live` (does every tensor fit the live object it goes into), :mod:`.modules` (the live
modules' state dicts, once per restore), :mod:`.optimizers` (what an optimizer's
``load_state_dict`` is handed),
:mod:`.candidate` (loading one candidate), :mod:`.rollback` (``load_latest``, ``restore``),
:mod:`.report` (summary, event, ``failed_checkpoints.txt``) and :mod:`.verify`
(``check_candidates``). The bytes are read by :mod:`asyncckpt.reader`, through the Storage seam.
"""

from __future__ import annotations

from ..catalog import FAILED_LOG_NAME
from ..errors import Diagnostic
from .options import Check, Log, MapLocation, OnCorrupt, Verify
from .report import SUMMARY_EVENT
from .rollback import LoadResult, load_latest, restore
from .verify import CandidateReport, check_candidates

__all__ = [
    "FAILED_LOG_NAME",
    "SUMMARY_EVENT",
    "CandidateReport",
    "Check",
    "Diagnostic",
    "LoadResult",
    "Log",
    "MapLocation",
    "OnCorrupt",
    "Verify",
    "check_candidates",
    "load_latest",
    "restore",
]
