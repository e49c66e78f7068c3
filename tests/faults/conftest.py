"""Shared by the fault-injection suite: a tally of the faults injected, printed after the run.

Set ``ASYNCCKPT_FAULT_COUNTS=<file>`` to also get the tally as JSON (docs/RELIABILITY.md quotes it).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator

import pytest
from trainers import Zygote

TALLY: Counter[str] = Counter()


@pytest.fixture
def faults() -> Counter[str]:
    """The session's tally of injected faults, by kind; tests add what they injected."""
    return TALLY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLY:
        return
    terminalreporter.section("injected faults")
    for kind, count in sorted(TALLY.items()):
        terminalreporter.write_line(f"{count:8d}  {kind}")
    target = os.environ.get("ASYNCCKPT_FAULT_COUNTS")
    if target:
        with open(target, "w", encoding="utf-8") as file:
            json.dump(dict(sorted(TALLY.items())), file, indent=2)
            file.write("\n")


@pytest.fixture(scope="session")
def zygote() -> Iterator[Zygote]:
    """One crash_child.py zygote for the session (the kill -9 and SIGTERM tests)."""
    spawner = Zygote()
    yield spawner
    spawner.close()
