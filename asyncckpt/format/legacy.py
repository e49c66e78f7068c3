"""Pre-versioned ``torch.save`` files (format "0.x"): recognise, verify, load read-only.

They are unpickled with ``weights_only=True`` only: a pickle that tries to run code is refused
with a :class:`CorruptedCheckpointError` and nothing in it runs. They are never written or
converted. Zip files (``torch.save`` since torch 1.6) carry a CRC32 per member, which
:func:`verify_zip_members` checks without unpickling anything; raw-pickle files carry no
checksum and cannot be verified (:func:`verifiable`).
"""

from __future__ import annotations

import copy
import lzma
import re
import struct
import zipfile
import zlib
from pathlib import PurePath
from typing import Any, BinaryIO

import torch

from ..errors import CorruptedCheckpointError, Where
from .sniff import PICKLE_PROTOCOL, ZIP_MAGIC
from .spec import CHUNK, MAX_STEP

LEGACY_VERSION = "0.x"
LEGACY_SUFFIXES = (".pt", ".pth")
_NUMBER = re.compile(r"(\d+)")
# What zipfile raises on broken archives besides BadZipFile (truncation, bad fields, odd flags,
# members compressed with deflate, bzip2 (OSError) or LZMA whose streams are broken).
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    struct.error,
    OverflowError,  # an offset beyond what seek() takes
    EOFError,
    ValueError,
    OSError,
    NotImplementedError,
    RuntimeError,
)


def is_zip_torch_save(head: bytes) -> bool:
    """Whether the first bytes are those of a zip ``torch.save`` file (the only kind ``mmap`` reads)."""
    return head.startswith(ZIP_MAGIC)


def looks_like_torch_save(head: bytes) -> bool:
    """Whether the first bytes of a file are those of a ``torch.save`` file (zip or raw pickle)."""
    return head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTOCOL)


def verifiable(head: bytes) -> bool:
    """Whether a legacy file beginning with ``head`` carries checksums (zip: yes; raw pickle: no).

    A raw-pickle file can only be loaded as it is: report it as unverified, never as verified.
    """
    return is_zip_torch_save(head)


def verify_zip_members(file: BinaryIO, *, path: Where = None) -> int:
    """Check the CRC32 of every member of a zip ``torch.save`` file; return how many were checked.

    ``file`` is open for reading (``seek``/``tell``/``read``); nothing is unpickled. Raises
    :class:`CorruptedCheckpointError` naming the member (and its ``offset``) whose bytes do not
    match their CRC32, or saying why the archive cannot be read at all.
    """
    try:
        archive = zipfile.ZipFile(file)
    except _ZIP_ERRORS as exc:
        raise CorruptedCheckpointError(
            f"legacy torch.save file is not a readable zip archive: {_reason(exc)}", path=path
        ) from None
    with archive:
        members = archive.infolist()
        for info in members:
            _check_member(archive, info, path)
    return len(members)


def _check_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Where) -> None:
    unchecked = copy.copy(info)
    del unchecked.CRC  # zipfile then leaves the check to us, so that the message can say more
    crc = 0
    try:
        with archive.open(unchecked) as member:
            while chunk := member.read(CHUNK):
                crc = zlib.crc32(chunk, crc)
    except _ZIP_ERRORS as exc:
        raise CorruptedCheckpointError(
            f"legacy torch.save member {info.filename!r} at offset {info.header_offset} cannot be read: "
            f"{_reason(exc)}",
            path=path,
            offset=info.header_offset,
        ) from None
    if crc != info.CRC:
        raise CorruptedCheckpointError(
            f"checksum mismatch in legacy torch.save member {info.filename!r} (at offset "
            f"{info.header_offset}, {info.file_size} bytes): expected crc32 {info.CRC:08x}, found {crc:08x}",
            path=path,
            offset=info.header_offset,
        )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_legacy(path: PurePath, *, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """Unpickle a ``torch.save`` file with ``weights_only=True``; refuse anything else.

    ``mmap=True`` (zip files only) maps the tensor data instead of reading it: a cheap way to
    read the pickled structure, e.g. for :func:`legacy_step`. Nothing is verified here.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CorruptedCheckpointError(
            f"legacy torch.save file refused (weights_only=True): {_reason(exc)}", path=path
        ) from None


def legacy_step(state: Any, path: PurePath) -> int | None:
    """The step of a legacy checkpoint: its ``step`` / ``global_step`` entry, else the last
    number in its file name; None when neither says."""
    if isinstance(state, dict):
        for key in ("step", "global_step"):
            value = state.get(key)
            if isinstance(value, torch.Tensor) and _integer_scalar(value):
                value = int(value.item())
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEP:
                return value
    numbers = _NUMBER.findall(path.stem)
    return int(numbers[-1]) if numbers else None


def _integer_scalar(value: torch.Tensor) -> bool:
    """A dense one-element tensor of an integer dtype (not bool, float, complex or quantized)."""
    if value.is_nested or value.layout != torch.strided or value.is_quantized or value.dtype == torch.bool:
        return False
    return value.numel() == 1 and not value.is_floating_point() and not value.is_complex()
