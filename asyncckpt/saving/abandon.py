"""AbandonableStorage: a Storage that a checkpointer closing past ``close_timeout`` can cut off."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Sequence

from ..errors import CheckpointWriteError
from ..storage import Body, ReadHandle, Sink, Storage, StoredObject, Written


class AbandonableStorage(Storage):
    """``storage`` until abandoned; then every call but clean-up fails with ``ECANCELED``.

    A write stuck in the storage keeps its worker thread (an OS call cannot be interrupted), but
    its next sink write fails, and a commit after :attr:`abandoned` is set discards the bytes
    instead, so an abandoned save never publishes its object.
    """

    def __init__(self, storage: Storage) -> None:
        self.inner = storage
        self.location = storage.location
        self.abandoned = threading.Event()

    def _check(self) -> None:
        if self.abandoned.is_set():
            raise OSError(errno.ECANCELED, "the checkpointer was closed while this write was stuck")

    def where(self, name: str) -> str:
        return self.inner.where(name)

    def write(self, name: str, body: Body) -> Written:
        self._check()

        def checked(sink: Sink) -> int:
            return body(_CheckedSink(sink, self._check))

        return self.inner.write(name, checked)

    def open_written(self, written: Written) -> ReadHandle:
        return self.inner.open_written(written)

    def commit(self, written: Written) -> float:
        try:
            self._check()
        except OSError as exc:
            self.inner.discard(written)
            raise CheckpointWriteError(f"not published: {exc}", path=self.where(written.name)) from exc
        return self.inner.commit(written)

    def drop_replaced(self) -> None:
        self.inner.drop_replaced()  # clean-up: allowed after abandon too

    def discard(self, written: Written) -> None:
        self.inner.discard(written)

    def open(self, name: str) -> ReadHandle:
        return self.inner.open(name)

    def ls(self, under: str = "") -> list[StoredObject]:
        return self.inner.ls(under)

    def delete(self, names: Sequence[str]) -> None:
        self._check()
        self.inner.delete(names)

    def leftovers(self) -> list[str]:
        return self.inner.leftovers()

    def leftovers_in(self, folder: str) -> list[str]:
        return self.inner.leftovers_in(folder)

    def remove_leftovers(self, names: Sequence[str]) -> None:
        self.inner.remove_leftovers(names)

    def append_line(self, name: str, line: str) -> None:
        self.inner.append_line(name, line)


class _CheckedSink:
    def __init__(self, sink: Sink, check: Callable[[], None]) -> None:
        self._sink = sink
        self._check = check

    def write(self, data: memoryview | bytes) -> None:
        self._check()
        self._sink.write(data)
