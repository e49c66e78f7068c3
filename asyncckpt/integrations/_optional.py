"""The error an integration raises when its framework (an optional dependency) is missing."""

from __future__ import annotations


def missing_framework(exc: ImportError, module: str, install: str) -> ModuleNotFoundError:
    """``exc`` (the framework's failed import) restated with the command that installs it."""
    return ModuleNotFoundError(
        f"{module} needs a framework that is not installed ({exc}): {install}", name=exc.name
    )
