"""What kind of file this is, from its first bytes: the one answer every reader uses.

docs/FORMAT.md, "Reading", step 1: ``ASYNCKPT`` is a v1 file; ``PK\\x03\\x04`` (zip) or ``\\x80``
(pickle protocol >= 2) a legacy ``torch.save`` file; fewer than 8 bytes otherwise: truncated;
anything else: bad magic.
"""

from __future__ import annotations

import enum

from ..errors import CorruptedCheckpointError, Where
from .spec import MAGIC

SNIFF_BYTES = len(MAGIC)  # read this many bytes (or more) from the start of a file for sniff()
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL = b"\x80"  # the PROTO opcode that starts every pickle of protocol >= 2


class FileKind(enum.Enum):
    """The kinds of file a checkpoint may be."""

    V1 = "v1"
    ZIP_TORCH_SAVE = "zip torch.save"  # torch.save since torch 1.6: a zip with a CRC32 per member
    PICKLE_TORCH_SAVE = "pickle torch.save"  # the older raw-pickle torch.save: nothing to verify

    @property
    def legacy(self) -> bool:
        """Whether this is a pre-versioned ``torch.save`` file (format "0.x")."""
        return self is not FileKind.V1

    @property
    def verifiable(self) -> bool:
        """Whether the file's bytes carry checksums to verify them against (v1 and zip do)."""
        return self is not FileKind.PICKLE_TORCH_SAVE


def sniff(head: bytes, *, path: Where = None) -> FileKind:
    """The kind of the file whose first bytes are ``head``.

    ``head`` is the first :data:`SNIFF_BYTES` bytes of the file or more (fewer only when the
    file is shorter). Raises :class:`CorruptedCheckpointError` (``path``, ``offset``) for a file
    that is too short to say, or that is none of the kinds.
    """
    if head.startswith(MAGIC):
        return FileKind.V1
    if head.startswith(ZIP_MAGIC):
        return FileKind.ZIP_TORCH_SAVE
    if head.startswith(PICKLE_PROTOCOL):
        return FileKind.PICKLE_TORCH_SAVE
    if len(head) < SNIFF_BYTES:
        raise CorruptedCheckpointError(
            f"truncated: {len(head)} bytes, not a checkpoint", path=path, offset=len(head)
        )
    raise CorruptedCheckpointError(
        f"not a checkpoint (bad magic {head[:SNIFF_BYTES]!r})", path=path, offset=0
    )
