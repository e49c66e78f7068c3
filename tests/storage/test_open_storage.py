"""open_storage: URLs go to fsspec (imported only then), paths stay POSIX."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from asyncckpt.errors import UsageError
from asyncckpt.storage import FileOps, PosixStorage, is_url, open_storage

pytestmark = pytest.mark.timeout(60)


def test_importing_asyncckpt_imports_no_remote_filesystem() -> None:
    code = (
        "import sys, asyncckpt, asyncckpt.storage, asyncckpt.catalog\n"
        "loaded = [m for m in ('fsspec', 's3fs', 'botocore', 'aiobotocore') if m in sys.modules]\n"
        "print(loaded)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("given", ["plain", "path", "file-url"])
def test_local_locations_open_posix_storage(tmp_path: Path, given: str) -> None:
    location = {"plain": str(tmp_path), "path": tmp_path, "file-url": f"file://{tmp_path}"}[given]

    storage = open_storage(location, storage_options={"ignored": True})

    assert isinstance(storage, PosixStorage) and storage.root == tmp_path


def test_a_storage_is_returned_as_it_is(tmp_path: Path) -> None:
    storage = PosixStorage(tmp_path)

    assert open_storage(storage) is storage


def test_an_s3_url_opens_fsspec_storage_with_the_options(moto_url: str, bucket: str) -> None:
    from asyncckpt.storage.remote import FsspecStorage

    from .conftest import s3_options

    storage = open_storage(f"s3://{bucket}/run/", storage_options=s3_options(moto_url))

    assert isinstance(storage, FsspecStorage)
    assert storage.location == f"s3://{bucket}/run" and storage.root == f"{bucket}/run"
    assert storage.where("step-0000000001.ckpt") == f"s3://{bucket}/run/step-0000000001.ckpt"
    assert storage.ls() == []


def test_a_memory_url_opens_the_generic_fsspec_storage(memory_url: str) -> None:
    from asyncckpt.storage.objects import S3ObjectStore
    from asyncckpt.storage.remote import FsspecStorage

    storage = open_storage(memory_url)

    assert isinstance(storage, FsspecStorage) and not isinstance(storage.store, S3ObjectStore)


def test_an_unknown_scheme_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="nosuchfs"):
        open_storage("nosuchfs://bucket/run")


def test_the_posix_fault_seam_does_not_apply_to_urls(memory_url: str) -> None:
    with pytest.raises(UsageError, match="ops="):
        open_storage(memory_url, ops=FileOps())


@pytest.mark.parametrize(
    ("location", "remote"),
    [("s3://b/r", True), ("gs://b", True), ("memory://x", True), ("file:///tmp", False), ("/tmp/x", False)],
)
def test_is_url(location: str, remote: bool) -> None:
    assert is_url(location) is remote
