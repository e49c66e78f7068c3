"""The frameworks change process-wide settings (deterministic algorithms, seeds, log levels):
each test gets them back as they were, so that the rest of the suite is unaffected."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_process_settings() -> Iterator[None]:
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng = (random.getstate(), torch.get_rng_state())
    environ = dict(os.environ)
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    random.setstate(rng[0])
    torch.set_rng_state(rng[1])
    os.environ.clear()
    os.environ.update(environ)
