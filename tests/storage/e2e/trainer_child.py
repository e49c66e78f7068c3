"""Child for the kill -9 tests: a trainer saving to S3 through AsyncCheckpointer, stopped at a
chosen instant of its third save and left there for the parent to kill.

``python trainer_child.py '<json config>'``; config: url, options (storage_options), part_size,
stage. Steps 1 and 2 are committed ("saved 1", "saved 2"); then, during step 3:

- ``upload``: parts are going up (the multipart upload exists): prints ``uploading``;
- ``durable``: the data object is complete, its commit object not written: prints ``durable``;
- ``prune``: step 3 is committed (its handle resolved: ``saved 3``) and retention
  (``keep_last=2``, after the handle) has removed step 1's commit object but not its data
  object: prints ``pruning``.

Each then blocks on stdin, where the parent kills it.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence
from typing import Any

import torch

import asyncckpt
from asyncckpt.storage import multipart, objects
from asyncckpt.storage.remote import FsspecStorage
from asyncckpt.storage.retry import RetryPolicy

armed = threading.Event()


def stop_here(word: str) -> None:
    print(word, flush=True)
    sys.stdin.readline()  # the parent kills us here
    raise SystemExit(1)


def arm(stage: str) -> None:
    if stage == "upload":
        upload_part = multipart.MultipartUpload._upload_part

        def stopped_part(self: Any, number: int, buffer: bytearray, filled: int) -> Any:
            if armed.is_set() and number == 2:
                stop_here("uploading")
            return upload_part(self, number, buffer, filled)

        multipart.MultipartUpload._upload_part = stopped_part  # type: ignore[method-assign]
    elif stage == "durable":
        commit = FsspecStorage.commit

        def stopped_commit(self: FsspecStorage, written: Any) -> float:
            if armed.is_set():
                stop_here("durable")
            return commit(self, written)

        FsspecStorage.commit = stopped_commit  # type: ignore[method-assign]
    else:
        delete = objects.S3ObjectStore.delete

        def stopped_delete(self: Any, keys: Sequence[str]) -> None:
            delete(self, keys)
            if armed.is_set() and keys and all(k.endswith(".commit") for k in keys):
                stop_here("pruning")

        objects.S3ObjectStore.delete = stopped_delete  # type: ignore[method-assign]


def main() -> None:
    config = json.loads(sys.argv[1])
    arm(config["stage"])
    storage = FsspecStorage(
        config["url"],
        storage_options=config["options"],
        part_size=config["part_size"],
        concurrency=2,
        retry=RetryPolicy(attempts=3, first_delay_s=0.001, max_delay_s=0.01),
    )
    model = torch.nn.Linear(200, 400)  # ~320 KB: several parts
    with asyncckpt.AsyncCheckpointer(storage, keep_last=2, event_log=config["events"]) as ckpt:
        for step in (1, 2, 3):
            with torch.no_grad():
                model.weight.fill_(float(step))
            if step == 3:
                armed.set()
            ckpt.save(step, {"model": model}).result()
            print(f"saved {step}", flush=True)


if __name__ == "__main__":
    main()
