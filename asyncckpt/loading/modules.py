"""The live modules' state dicts, taken once per restore and shared by its checks.

``restore`` needs each module's ``state_dict()`` three times over: for the keys and shapes a
candidate must hold (:func:`~.expect.expected_for_restore`), for the live tensors a checkpoint's
tensors are checked against (:mod:`.live`) and for the tensors blobs are read straight into
(:mod:`.targets`). ``state_dict()`` walks every submodule (a millisecond per thousand of them),
so it is taken once and reused until something may have changed the modules: a candidate's
``load_state_dict`` (a module of its own may swap its tensors), after which it is taken again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

ModuleStates = Mapping[str, Mapping[str, Any]]  # object name → the module's state_dict()


class LiveModules:
    """The ``state_dict()`` of every ``torch.nn.Module`` among a restore's objects, taken lazily
    and again after :meth:`touched`."""

    def __init__(self, objects: Mapping[str, Any]) -> None:
        self.objects = objects
        self._states: dict[str, dict[str, Any]] | None = None

    def states(self) -> ModuleStates:
        """Object name → that module's ``state_dict()`` (plain tensors sharing the module's memory)."""
        if self._states is None:
            self._states = {
                name: obj.state_dict()
                for name, obj in self.objects.items()
                if isinstance(obj, torch.nn.Module)
            }
        return self._states

    def touched(self) -> None:
        """The objects may have changed (a ``load_state_dict`` ran): take the state dicts again
        when next asked."""
        self._states = None
