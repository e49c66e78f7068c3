"""An object's ``state_dict()``, taken without torch's per-module overhead where that is exact.

``save()`` calls the ``state_dict()`` of every module in the state on every save.
``torch.nn.Module.state_dict`` recurses through the submodules with keyword arguments, builds a
``_metadata`` entry and prefix strings per module and runs the hook loops: about 3 µs a module
on the trainer's thread, a third of a save's cost at one parameter per module. For a module
tree whose every module uses torch's own ``state_dict``, ``_save_to_state_dict`` and
``get_extra_state`` (none overridden, none replaced on the instance) and has no state-dict
hooks, the result is fixed by the modules' ``_parameters``, ``_buffers`` and ``_modules``:
:func:`state_dict_of` builds it directly, the same keys in the same order with the same
detached tensors (as a plain dict: the walks treat a dict and an ``OrderedDict`` alike, and
none reads ``_metadata``). Anything else gets the object's own ``state_dict()``.
"""

from __future__ import annotations

from typing import Any

import torch

_MODULE = torch.nn.Module
# Captured at import: a Module.state_dict patched later is not torch's, and is called.
_STATE_DICT = _MODULE.state_dict
_SAVE_TO_STATE_DICT = _MODULE._save_to_state_dict
_GET_EXTRA_STATE = _MODULE.get_extra_state
_MAX_DEPTH = 500  # deeper trees (or a module inside itself) go to torch, which decides


def state_dict_of(obj: Any) -> Any:
    """``obj.state_dict()``; for a module tree torch's defaults fully describe, the same
    dict built without torch's recursion (see the module docstring)."""
    if isinstance(obj, _MODULE):
        built = module_state_dict(obj)
        if built is not None:
            return built
    return obj.state_dict()


def module_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """``module.state_dict()`` built from the modules' parameter, buffer and child dicts, or
    None when a module of the tree is not one torch's defaults describe exactly."""
    out: dict[str, torch.Tensor] = {}
    stack: list[tuple[str, int, Any]] = [("", 0, module)]
    pop = stack.pop
    while stack:
        prefix, depth, current = pop()
        parts = _plain_parts(current)
        if parts is None or depth > _MAX_DEPTH:
            return None
        parameters, buffers, children, non_persistent = parts
        for name, param in parameters.items():
            if param is not None:
                out[prefix + name] = param.detach()
        if buffers:
            for name, buffer in buffers.items():
                if buffer is not None and name not in non_persistent:
                    out[prefix + name] = buffer.detach()
        if children:
            below = depth + 1
            stack += [
                (f"{prefix}{name}.", below, child)
                for name, child in reversed(children.items())
                if child is not None
            ]
    return out


def _plain_parts(module: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Any] | None:
    """The dicts torch's ``state_dict`` reads from ``module``, or None when it would do more
    (an override, a hook, an instance attribute in place of a method, unusual internals)."""
    cls = type(module)
    if (
        cls.state_dict is not _STATE_DICT
        or cls._save_to_state_dict is not _SAVE_TO_STATE_DICT
        or getattr(cls, "get_extra_state", _GET_EXTRA_STATE) is not _GET_EXTRA_STATE
    ):
        return None
    attributes = getattr(module, "__dict__", None)
    if type(attributes) is not dict:
        return None
    # A method replaced on the instance (names spelled out: a generator over them costs more
    # than the walk).
    if "state_dict" in attributes or "_save_to_state_dict" in attributes or "get_extra_state" in attributes:
        return None
    get = attributes.get
    parameters = get("_parameters")
    buffers = get("_buffers")
    children = get("_modules")
    non_persistent = get("_non_persistent_buffers_set")
    if type(parameters) is not dict or type(buffers) is not dict or type(children) is not dict:
        return None
    if type(non_persistent) is not set:
        return None
    if get("_state_dict_pre_hooks", True) or get("_state_dict_hooks", True):
        return None
    return parameters, buffers, children, non_persistent
