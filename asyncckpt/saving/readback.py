"""Reading a written checkpoint back before it is published: what ``verify=`` checks.

The bytes are durable (fsynced) but not yet committed; a file that does not read back is never
published, so it cannot replace a committed checkpoint of the same name nor become the newest.
"""

from __future__ import annotations

from typing import BinaryIO, Literal, cast

from .. import format as fmt
from ..errors import CheckpointError, CheckpointWriteError
from ..storage import CheckpointPath, Storage, Written

VerifyMode = Literal["full", "structure", "none"]


def verify_written(
    storage: Storage, written: Written, *, mode: VerifyMode, step: int, path: CheckpointPath
) -> None:
    """Read back ``written`` as ``mode`` says: ``"structure"`` the prelude, trailer, size and
    header CRC (the bytes on disk are the ones written), ``"full"`` also the header's step and
    every blob's checksum, ``"none"`` nothing.

    Raises :class:`CheckpointWriteError` (its cause the reader's error) when it does not read
    back, and ``OSError`` when the storage fails.
    """
    if mode == "none":
        return
    where = str(path)
    try:
        with storage.open_written(written) as handle:
            file = cast(BinaryIO, handle.cursor())
            if mode == "structure":
                # Decoding the header again would only re-check our own encoder and hold the
                # GIL against the trainer for ~20 us a tensor.
                fmt.read_header_bytes(file, where)
                return
            layout = fmt.read_layout(file, where)
            if layout.step != step:
                raise CheckpointWriteError(
                    f"reads back step {layout.step}, wrote {step}", path=path, step=step
                )
            fmt.verify_blobs(file, layout, path=where)
    except CheckpointError as exc:
        if isinstance(exc, CheckpointWriteError):
            raise
        raise CheckpointWriteError(
            f"verification after write failed, nothing was published: {exc}", path=path, step=step
        ) from exc
