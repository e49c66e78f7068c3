"""The public surface: ``__all__`` is exact, documented and typed, and stays light to import."""

from __future__ import annotations

import inspect
import subprocess
import sys

import asyncckpt

EXPECTED = {
    "AsyncCheckpointer", "AsyncckptError", "CandidateReport", "Checkpoint", "CheckpointBusyError",
    "CheckpointError", "CheckpointInfo", "CheckpointWriteError", "CheckpointerStats", "CoordinationError",
    "CorruptedCheckpointError", "Diagnostic", "IncompatibleCheckpointError", "LoadResult",
    "NoValidCheckpointError", "SaveHandle", "StateTooLargeError", "UnresolvedValue", "UnsupportedValueError",
    "UnsupportedVersionError", "UsageError", "__version__", "check_candidates", "list_checkpoints", "load",
    "load_latest", "restore", "rng_state", "save", "set_rng_state",
}  # fmt: skip


def test_all_lists_exactly_the_public_names() -> None:
    assert set(asyncckpt.__all__) == EXPECTED
    assert len(asyncckpt.__all__) == len(EXPECTED)  # no duplicates
    public = {name for name in vars(asyncckpt) if not name.startswith("_")}
    submodules = {name for name in public if inspect.ismodule(getattr(asyncckpt, name))}
    assert public - submodules - EXPECTED == set(), "a public name is missing from __all__"


def test_every_public_name_has_a_docstring_and_annotations() -> None:
    for name in EXPECTED - {"__version__"}:
        value = getattr(asyncckpt, name)
        assert inspect.getdoc(value), f"asyncckpt.{name} has no docstring"
        if inspect.isfunction(value):
            hints = inspect.get_annotations(value)
            assert "return" in hints, f"asyncckpt.{name} has no return annotation"


def test_the_package_is_typed() -> None:
    from importlib.resources import files

    assert files("asyncckpt").joinpath("py.typed").is_file()


def test_usage_errors_are_not_checkpoint_problems() -> None:
    assert issubclass(asyncckpt.UsageError, asyncckpt.AsyncckptError)
    assert not issubclass(asyncckpt.UsageError, asyncckpt.CheckpointError)
    assert asyncckpt.UsageError("x").exit_code == 1 and asyncckpt.CheckpointError("x").exit_code == 3
    assert issubclass(asyncckpt.UnsupportedValueError, TypeError)
    assert issubclass(asyncckpt.StateTooLargeError, ValueError)


def test_errors_carry_where_as_fields() -> None:
    error = asyncckpt.CorruptedCheckpointError("checksum mismatch", path="/run/x.ckpt", blob=3, offset=4096)
    assert (error.reason, error.path, error.blob, error.offset) == (
        "checksum mismatch",
        "/run/x.ckpt",
        3,
        4096,
    )
    assert str(error) == "/run/x.ckpt: checksum mismatch"


def test_importing_asyncckpt_loads_no_optional_dependency() -> None:
    optional = ("fsspec", "s3fs", "botocore", "lightning", "pytorch_lightning", "transformers")
    code = f"import sys, asyncckpt; print([m for m in {optional!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
