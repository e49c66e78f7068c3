"""The frameworks stay optional: ``import asyncckpt`` imports none, and an integration whose
framework is missing says which extra to install. Runs without any framework installed."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest
from helpers import ROOT

FRAMEWORKS = ("lightning", "pytorch_lightning", "lightning_fabric", "transformers", "accelerate")


def python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_importing_asyncckpt_imports_no_framework() -> None:
    code = (
        "import sys, asyncckpt, asyncckpt.integrations, asyncckpt.integrations._lightning\n"
        f"print(sorted(set({FRAMEWORKS!r}) & set(sys.modules)))"
    )
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "missing", "install"),
    [
        ("lightning", "lightning", "pip install 'asyncckpt[lightning]'"),
        ("pytorch_lightning", "pytorch_lightning", "pip install 'asyncckpt[lightning]'"),
        ("transformers", "transformers", "pip install 'asyncckpt[transformers]'"),
    ],
)
def test_a_missing_framework_says_how_to_install_it(module: str, missing: str, install: str) -> None:
    # None in sys.modules makes `import missing` fail as if it were not installed
    code = (
        f"import sys; sys.modules[{missing!r}] = None\n"
        f"try:\n    import asyncckpt.integrations.{module}\n"
        "except ImportError as exc:\n    print(type(exc).__name__, exc.name, '|', exc)\n"
    )
    done = python(code)
    assert done.returncode == 0, done.stderr
    kind, name, _, message = done.stdout.split(" ", 3)
    assert kind == "ModuleNotFoundError"  # what `except ModuleNotFoundError` expects, name included
    assert name.split(".")[0] == missing
    assert message.startswith(f"asyncckpt.integrations.{module} needs"), message
    assert message.strip().endswith(install), message


@pytest.mark.parametrize("extra", ["lightning", "transformers"])
def test_ci_installs_what_the_extra_installs(extra: str) -> None:
    # .ci/run installs the `dev` extra: it must hold each integration's extra, so that the
    # integration tests run against the frameworks a user's `pip install 'asyncckpt[...]'` gets
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]
    assert set(extras[extra]) <= set(extras["dev"]), (extras[extra], extras["dev"])
