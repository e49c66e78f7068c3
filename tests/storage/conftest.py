"""Fixtures for storage tests: a moto S3 server on 127.0.0.1, buckets, storages, a fault proxy.

The server runs in a subprocess (``python -m moto.server``) on a free port, with fake
credentials; nothing leaves the machine. Botocore's and s3fs's own retries are turned off so
that the tests see asyncckpt's retries alone, with millisecond backoff.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncckpt.storage.retry import RetryPolicy

from .faultproxy import FaultProxy

PART = 64 << 10  # the tests' part size; the server accepts parts this small
FAST = RetryPolicy(attempts=4, first_delay_s=0.001, max_delay_s=0.01)
STARTUP_S = 60
_CLEAN_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@pytest.fixture(scope="session", autouse=True)
def _fake_aws_environment() -> Iterator[None]:
    """Fake credentials, no metadata service, no user config: nothing can reach a real account."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _CLEAN_ENV.items():
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        yield


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a moto S3 server that lives for the session."""
    env = {**os.environ, **_CLEAN_ENV, "S3_UPLOAD_PART_MIN_SIZE": str(PART)}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    port: list[int] = []
    ready = threading.Event()

    def drain() -> None:  # read the port, then keep the pipe empty (it logs every request)
        assert process.stderr is not None
        for line in process.stderr:
            match = re.search(r"Running on http://127\.0\.0\.1:(\d+)", line)
            if match and not port:
                port.append(int(match[1]))
                ready.set()
        ready.set()

    threading.Thread(target=drain, name="moto-stderr", daemon=True).start()
    try:
        if not ready.wait(STARTUP_S) or not port:
            pytest.fail("the moto server did not start")
        yield f"http://127.0.0.1:{port[0]}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def s3_options(endpoint: str) -> dict[str, Any]:
    """storage_options for s3fs against ``endpoint``, with botocore's retries off."""
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "use_listings_cache": False,
        "config_kwargs": {
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "connect_timeout": 5,
            "read_timeout": 20,
        },
    }


def raw_s3(endpoint: str) -> Any:
    """A bare s3fs filesystem, to look at the bucket behind the storage's back (fsspec caches
    one instance per set of options: creating a botocore session costs ~0.5 s)."""
    import s3fs

    return s3fs.S3FileSystem(**s3_options(endpoint))


@pytest.fixture
def bucket(moto_url: str) -> str:
    """A fresh, empty bucket of its own for each test."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    raw_s3(moto_url).call_s3("create_bucket", Bucket=name)
    return name


@pytest.fixture
def proxy(moto_url: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the moto server."""
    relay = FaultProxy(moto_url)
    try:
        yield relay
    finally:
        relay.close()


@pytest.fixture
def make_s3(moto_url: str, bucket: str) -> Callable[..., Any]:
    """``make_s3(prefix="run", endpoint=None, **options)``: an FsspecStorage in this test's bucket."""
    from asyncckpt.storage.remote import FsspecStorage

    def make(prefix: str = "run", *, endpoint: str | None = None, **options: Any) -> FsspecStorage:
        options = {"part_size": PART, "concurrency": 4, "retry": FAST, **options}
        url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        storage = FsspecStorage(url, storage_options=s3_options(endpoint or moto_url), **options)
        storage.fs.retries = 1  # s3fs's own retry loop (a class attribute, not an option)
        return storage

    return make


@pytest.fixture
def memory_url() -> Iterator[str]:
    """A fresh folder of fsspec's in-memory filesystem (the generic, non-S3 code path)."""
    import fsspec

    root = f"memory://asyncckpt-{uuid.uuid4().hex[:12]}/run"
    yield root
    fs = fsspec.filesystem("memory")
    path = fs._strip_protocol(root).rpartition("/")[0]
    if fs.exists(path):
        fs.rm(path, recursive=True)


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` by relative name (for comparing directories)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
