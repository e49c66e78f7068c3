"""Child for the kill -9 tests: starts a remote write and waits on stdin to be killed.

``python upload_child.py '<json config>'``; config: url, options (storage_options), part_size,
name, stage. stage "upload": the body has written three parts (the multipart upload exists,
parts are in flight), prints ``uploading`` and blocks. stage "durable": the write finished (the
data object is durable, nothing committed), prints ``durable`` and blocks before the commit.
"""

from __future__ import annotations

import json
import sys

from asyncckpt.storage import Sink
from asyncckpt.storage.remote import FsspecStorage


def main() -> None:
    config = json.loads(sys.argv[1])
    storage = FsspecStorage(
        config["url"], storage_options=config["options"], part_size=config["part_size"], concurrency=2
    )

    def body(sink: Sink) -> int:
        sink.write(b"\x5a" * (config["part_size"] * 3))
        if config["stage"] == "upload":
            print("uploading", flush=True)
            sys.stdin.readline()  # the parent kills us here
        sink.write(b"tail")
        return config["part_size"] * 3 + 4

    written = storage.write(config["name"], body)
    print("durable", flush=True)
    sys.stdin.readline()  # the parent kills us here
    storage.commit(written)
    print("committed", flush=True)


if __name__ == "__main__":
    main()
