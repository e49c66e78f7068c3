"""The pre-scan of a header: its msgpack checked byte by byte before anything is decoded.

Decoding a msgpack value builds Python objects whose cost is not bounded by the bytes alone: an
empty list is one byte and 56 bytes of memory, a list header declaring 10,000 items makes the
decoder reserve 80 KB before any item is read, and nested extension payloads are copied once per
level. :func:`scan` walks the bytes without building anything and refuses, before decoding:

- anything that is not exactly one well-formed msgpack value (a reserved byte, a length running
  past the end, trailing bytes, an extension type the format does not define);
- a container declaring more items than bytes remain (so no decoder reserves room for them);
- nesting deeper than the trees allow (the header map, then ``MAX_DEPTH`` levels of tree);
- more objects (lists, tuples, maps, tensor references, big ints) than
  ``spec.max_header_objects`` allows for the header's size;
- tuple payloads adding up to more than ``spec.max_tuple_bytes`` (each level is copied).

It costs about 10 to 130 ns a header byte (one Python step per msgpack value, runs of one-byte
values skipped at once) and memory proportional to the nesting only.
"""

from __future__ import annotations

import re

from . import spec
from .spec import EXT_BIGINT, EXT_TENSOR, EXT_TUPLE, EXT_TYPED

_SCALAR, _ARRAY, _MAP, _EXT, _RESERVED = range(5)
# Runs of values that are one byte each: fixints, the empty string, nil, false, true.
_ONE_BYTE_RUN = re.compile(rb"[\x00-\x7f\xa0\xc0\xc2\xc3\xe0-\xff]+")
_RUN_MIN = 16  # try to skip a run only in containers with at least this many items left
_EXT_TYPES = (EXT_TUPLE, EXT_TENSOR, EXT_BIGINT, EXT_TYPED)
_NESTED = (EXT_TUPLE, EXT_TYPED)  # payloads that are an array of values, scanned like a tuple


def _lead_table() -> list[tuple[int, int, int]]:
    """Per first byte: (kind, n, width): n is a fixed count or size, width the bytes of a
    big-endian length (or count) that follows the first byte, 0 when there is none."""
    table = [(_RESERVED, 0, 0)] * 256
    for byte in range(0x80):
        table[byte] = (_SCALAR, 0, 0)  # positive fixint
    for byte in range(0xE0, 0x100):
        table[byte] = (_SCALAR, 0, 0)  # negative fixint
    for byte in range(0x80, 0x90):
        table[byte] = (_MAP, byte & 0x0F, 0)
    for byte in range(0x90, 0xA0):
        table[byte] = (_ARRAY, byte & 0x0F, 0)
    for byte in range(0xA0, 0xC0):
        table[byte] = (_SCALAR, byte & 0x1F, 0)  # fixstr: n bytes follow
    table[0xC0] = table[0xC2] = table[0xC3] = (_SCALAR, 0, 0)  # nil, false, true
    for byte, width in ((0xC4, 1), (0xC5, 2), (0xC6, 4), (0xD9, 1), (0xDA, 2), (0xDB, 4)):
        table[byte] = (_SCALAR, 0, width)  # bin and str: a length, then the bytes
    for byte, size in ((0xCA, 4), (0xCB, 8), (0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        table[byte] = (_SCALAR, size, 0)  # floats, unsigned ints
    for byte, size in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
        table[byte] = (_SCALAR, size, 0)  # signed ints
    for byte, width in ((0xC7, 1), (0xC8, 2), (0xC9, 4)):
        table[byte] = (_EXT, 0, width)  # ext 8/16/32: a length, a type byte, the payload
    for byte, size in ((0xD4, 1), (0xD5, 2), (0xD6, 4), (0xD7, 8), (0xD8, 16)):
        table[byte] = (_EXT, size, 0)  # fixext: a type byte, then size bytes
    table[0xDC], table[0xDD] = (_ARRAY, 0, 2), (_ARRAY, 0, 4)
    table[0xDE], table[0xDF] = (_MAP, 0, 2), (_MAP, 0, 4)
    return table


_LEAD = _lead_table()


def scan(data: bytes) -> int:
    """Check the msgpack of a whole header before it is decoded; return its object count.

    Raises ``ValueError`` saying what is wrong and at which byte (offsets from the header's
    start); the reader turns it into a :class:`~asyncckpt.errors.CorruptedCheckpointError`.
    """
    return _Scan(data).run()


class _Scan:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.max_objects = spec.max_header_objects(len(data))
        self.max_tuple_bytes = spec.max_tuple_bytes(len(data))
        # The header map is depth 0 and the tree's root depth 1: the tree's items may reach
        # MAX_DEPTH + 1 (what flatten writes), one frame per open container plus the root frame.
        self.max_frames = spec.MAX_DEPTH + 3
        self.objects = 0
        self.tuple_bytes = 0

    def run(self) -> int:  # noqa: C901 - one tight loop: a call per value would cost 3x
        data = self.data
        end = len(data)
        lead = _LEAD
        max_objects = self.max_objects
        # One frame per open container: [items left, where its bytes must stop, exact end?]
        frames: list[list[int]] = [[1, end, 0]]
        pos = 0
        while frames:
            top = frames[-1]
            left = top[0]
            if not left:
                frames.pop()
                if top[2] and pos != top[1]:
                    raise ValueError(f"tuple payload ending at byte {top[1]} holds more than one value")
                continue
            bound = top[1]
            if pos >= bound:
                raise ValueError(f"truncated: a value is missing at byte {pos}")
            kind, n, width = lead[data[pos]]
            if kind == _SCALAR and not (n or width) and left >= _RUN_MIN:
                run = _ONE_BYTE_RUN.match(data, pos, min(bound, pos + left))
                assert run is not None  # data[pos] is one of them
                top[0] = left - (run.end() - pos)
                pos = run.end()
                continue
            top[0] = left - 1
            pos += 1
            if width:
                n = int.from_bytes(data[pos : pos + width], "big")
                pos += width
            if kind == _SCALAR:
                pos += n
            elif kind in (_ARRAY, _MAP):
                self.objects += 1
                if self.objects > max_objects:
                    raise self.too_many()
                if kind == _MAP:
                    n *= 2
                if n:
                    if n > bound - pos:
                        raise ValueError(
                            f"a container at byte {pos} declares {n} values, more than the bytes left"
                        )
                    self.push(frames, [n, bound, 0])
            elif kind == _EXT:
                pos = self.ext(frames, bound, pos, n)
            else:
                raise ValueError(f"byte {pos - 1} is 0xc1, which msgpack never uses")
            if pos > bound:
                raise ValueError(f"truncated: a value runs past byte {bound}")
        if pos != end:
            raise ValueError(f"{end - pos} bytes follow the header's value")
        return self.objects

    def too_many(self) -> ValueError:
        return ValueError(
            f"more than {self.max_objects} lists, tuples, maps, tensor references and big ints in "
            f"{len(self.data)} bytes (at most {spec.HEADER_FREE_OBJECTS} and one per "
            f"{spec.HEADER_BYTES_PER_OBJECT} bytes)"
        )

    def count(self) -> None:
        self.objects += 1
        if self.objects > self.max_objects:
            raise self.too_many()

    def ext(self, frames: list[list[int]], bound: int, pos: int, size: int) -> int:
        """Check an extension value whose type byte is at ``pos`` and payload of ``size`` follows."""
        if pos + 1 + size > bound:
            raise ValueError(f"truncated: an extension value at byte {pos} runs past byte {bound}")
        code = self.data[pos]
        start = pos + 1
        if code not in _EXT_TYPES:
            raise ValueError(f"unknown msgpack extension type {code}")
        if code not in _NESTED:
            self.count()
            return start + size
        self.tuple_bytes += size
        if self.tuple_bytes > self.max_tuple_bytes:
            raise ValueError(f"tuples nest more than {self.max_tuple_bytes} bytes in total")
        kind, n, width = _LEAD[self.data[start]] if size else (_RESERVED, 0, 0)
        if kind != _ARRAY:
            raise ValueError("tuple payload is not an array")
        items = int.from_bytes(self.data[start + 1 : start + 1 + width], "big") if width else n
        if code == EXT_TYPED and items != 3:
            raise ValueError(f"a typed value at byte {start} has {items} fields, not 3")
        after = start + 1 + width
        self.count()
        payload_end = start + size
        if items > payload_end - after:
            raise ValueError(f"a tuple at byte {start} declares {items} items, more than its payload holds")
        if items:
            self.push(frames, [items, payload_end, 1])
        elif after != payload_end:
            raise ValueError(f"tuple payload ending at byte {payload_end} holds more than one value")
        return after

    def push(self, frames: list[list[int]], frame: list[int]) -> None:
        if len(frames) >= self.max_frames:
            raise ValueError(f"it nests deeper than {spec.MAX_DEPTH} levels")
        frames.append(frame)
