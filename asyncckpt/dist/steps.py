"""Whole multi-rank steps: listing, deleting, and cleaning up what failed saves left.

One rank does these (rank 0 of the coordination group), and never while a save is in flight:
a step folder without its record is also what a save looks like before its commit.
"""

from __future__ import annotations

from .. import catalog
from ..storage import Location, Storage, open_storage


def committed_steps(location: Location) -> list[catalog.StepInfo]:
    """The committed multi-rank steps of ``location``, oldest first (see :mod:`asyncckpt.catalog`)."""
    return catalog.committed_steps(open_storage(location))


def delete_step(location: Location, step: int) -> None:
    """Remove ``step`` durably: its commit record first, so that the step stops existing at once
    and a crash halfway leaves an uncommitted folder, never a committed step missing a shard;
    then its other files and temp files, then the folder."""
    storage = open_storage(location)
    folder = catalog.step_folder_name(step)
    storage.delete([catalog.commit_record_name(step)])
    _empty(storage, folder)


def remove_uncommitted(location: Location) -> list[str]:
    """Remove every step folder without a commit record (saves that failed or were
    interrupted) and the temp files left in step folders; return the folders removed.

    Call it at start-up on one rank, before any save: an in-flight save looks the same.
    """
    storage = open_storage(location)
    folders = catalog.uncommitted_step_folders(storage)
    for folder in folders:
        _empty(storage, folder)
    stray = [
        name
        for name in storage.leftovers()
        if "/" in name and catalog.parse_step_folder(name.partition("/")[0]) is not None
    ]
    storage.remove_leftovers(stray)
    return folders


def _empty(storage: Storage, folder: str) -> None:
    files = [obj.name for obj in storage.ls(folder) if obj.kind == "file"]
    temps = [name for name in storage.leftovers() if name.startswith(f"{folder}/")]
    storage.delete(files)
    storage.remove_leftovers(temps)
    storage.delete([folder])
