"""Object names of the commit protocol on object stores, and the commit record itself.

Each write of ``name`` gets a fresh token: nanoseconds since the epoch (16 hex digits, so later
writes sort later), the writer (``<host>-<pid>``) and random bits, as in
``0188f3a2b4c5d6e7-node7-4242-9f3a1c2b``. Its bytes go to the data object ``{name}.{token}.data``; the
commit object ``{name}.{token}.commit`` (a :class:`CommitRecord`) is written last and is what
makes it visible. Neither key is ever written twice, so a reader's ranged GETs never mix two
versions and the commit PUT can be create-only.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import crc32c

from ..errors import CorruptedCheckpointError, UnsupportedVersionError
from .objects import Entry
from .temps import writer_id, writer_is_gone

COMMIT_FORMAT = "asyncckpt-commit"
COMMIT_VERSION = 1
MAX_COMMIT_BYTES = 4 << 20  # 10,000 parts take ~250 KB; anything far larger is not ours
DATA_SUFFIX = ".data"
COMMIT_SUFFIX = ".commit"
_TOKEN = r"[0-9a-f]{16}-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d{1,10})-[0-9a-f]{8}"
_VERSIONED = re.compile(rf"^(?P<name>.+)\.(?P<token>{_TOKEN})\.(?P<role>data|commit)$")
_OWNER = re.compile(rf"^{_TOKEN}$")

Role = Literal["data", "commit"]


def new_token() -> str:
    """A token that sorts after every token made before it and names its writer."""
    return f"{time.time_ns():016x}-{writer_id()}-{secrets.token_hex(4)}"


def owner_is_gone(token: str, modified: datetime, *, now: float) -> bool:
    """Whether the writer that made ``token`` can no longer be writing it (see
    :func:`~asyncckpt.storage.temps.writer_is_gone`)."""
    match = _OWNER.match(token)
    if match is None:
        return True
    return writer_is_gone(match["host"], int(match["pid"]), modified.timestamp(), now=now)


def data_name(name: str, token: str) -> str:
    """The data object of one write of ``name``."""
    return f"{name}.{token}{DATA_SUFFIX}"


def commit_name(name: str, token: str) -> str:
    """The commit object of one write of ``name``."""
    return f"{name}.{token}{COMMIT_SUFFIX}"


def parse_versioned(base: str) -> tuple[str, str, Role] | None:
    """(name, token, role) of a data or commit object's base name; None for any other key."""
    match = _VERSIONED.match(base)
    if match is None:
        return None
    role: Role = "data" if match["role"] == "data" else "commit"
    return match["name"], match["token"], role


@dataclass
class Versions:
    """What one folder listing holds for one name: its commit and data objects by token, and a
    plain object of that exact name (put there by something else: a legacy file, a log)."""

    commits: dict[str, Entry] = field(default_factory=dict)
    data: dict[str, Entry] = field(default_factory=dict)
    plain: Entry | None = None

    def current(self) -> str | None:
        """The newest token with both its commit and its data object (the committed version)."""
        complete = [token for token in self.commits if token in self.data]
        return max(complete, default=None)

    def leftovers(self, *, now: float) -> list[Entry]:
        """What no reader needs and no live writer owns, commit objects first: every commit and
        data object but the current version's, except data a live writer has yet to commit."""
        current = self.current()
        commits = [e for token, e in sorted(self.commits.items()) if token != current]
        data = [
            e
            for token, e in sorted(self.data.items())
            if token != current and (token in self.commits or owner_is_gone(token, e.modified, now=now))
        ]
        return commits + data


def group(entries: Iterable[Entry]) -> tuple[dict[str, Versions], list[Entry]]:
    """A folder listing grouped by name (files), and its sub-folders."""
    names: dict[str, Versions] = {}
    folders: list[Entry] = []
    for entry in entries:
        if entry.kind == "dir":
            folders.append(entry)
            continue
        base = entry.key.rpartition("/")[2]
        parsed = parse_versioned(base)
        if parsed is None:
            names.setdefault(base, Versions()).plain = entry
            continue
        name, token, role = parsed
        versions = names.setdefault(name, Versions())
        (versions.commits if role == "commit" else versions.data)[token] = entry
    return names, folders


@dataclass(frozen=True)
class CommitRecord:
    """The commit object's content: which data object is ``name``, its size and part checksums.

    Encoded as one JSON object ``{"asyncckpt_commit": {...}, "crc32c": "xxxxxxxx"}``; the
    CRC32C covers the canonical JSON (sorted keys, no spaces) of the inner object.
    """

    name: str
    token: str
    size: int
    parts: tuple[tuple[int, int], ...]  # (size, CRC32C) of each upload part, in order
    etag: str | None
    committed_at: str
    writer: str

    def fields(self) -> dict[str, Any]:
        return {
            "format": COMMIT_FORMAT,
            "version": COMMIT_VERSION,
            "name": self.name,
            "token": self.token,
            "size": self.size,
            "parts": [list(part) for part in self.parts],
            "etag": self.etag,
            "committed_at": self.committed_at,
            "writer": self.writer,
        }

    def encode(self) -> bytes:
        body = self.fields()
        outer = {"asyncckpt_commit": body, "crc32c": f"{crc32c.crc32c(_canonical(body)):08x}"}
        return json.dumps(outer, sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes, *, path: str) -> CommitRecord:
        """Parse and check a commit object. Raises :class:`CorruptedCheckpointError` for a
        damaged one, :class:`UnsupportedVersionError` for a newer protocol version."""

        def broken(reason: str) -> CorruptedCheckpointError:
            return CorruptedCheckpointError(f"commit object is damaged: {reason}", path=path)

        if len(data) > MAX_COMMIT_BYTES:
            raise broken(f"{len(data)} bytes, more than {MAX_COMMIT_BYTES}")
        try:
            outer = json.loads(data)
        except ValueError as exc:
            raise broken(f"not JSON ({exc})") from exc
        body = outer.get("asyncckpt_commit") if isinstance(outer, dict) else None
        if not isinstance(body, dict) or body.get("format") != COMMIT_FORMAT:
            raise broken("not an asyncckpt commit record")
        if outer.get("crc32c") != f"{crc32c.crc32c(_canonical(body)):08x}":
            raise broken("checksum mismatch")
        if body.get("version") != COMMIT_VERSION:
            raise UnsupportedVersionError(
                f"commit record version {body.get('version')!r}; this release reads {COMMIT_VERSION}",
                path=path,
            )
        return cls._from_fields(body, broken)

    @classmethod
    def _from_fields(cls, body: dict[str, Any], broken: Any) -> CommitRecord:
        parts = body.get("parts")
        size = body.get("size")
        if not (
            isinstance(body.get("name"), str)
            and isinstance(body.get("token"), str)
            and _is_count(size)
            and isinstance(parts, list)
            and all(isinstance(p, list) and len(p) == 2 and all(_is_count(v) for v in p) for p in parts)
            and isinstance(body.get("etag"), str | None)
        ):
            raise broken("a field is missing or has the wrong type")
        if sum(p[0] for p in parts) != size:
            raise broken(f"parts add up to {sum(p[0] for p in parts)} bytes, size says {size}")
        return cls(
            name=body["name"],
            token=body["token"],
            size=size,
            parts=tuple((p[0], p[1]) for p in parts),
            etag=body["etag"],
            committed_at=str(body.get("committed_at", "")),
            writer=str(body.get("writer", "")),
        )


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
