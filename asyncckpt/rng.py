"""The global random number generators' states, as a value a checkpoint can store.

Exact resume needs every generator a training step draws from: Python's ``random``, NumPy's
global generator (when NumPy is installed), torch's CPU generator and one generator per CUDA
device. Generators the program creates itself (``torch.Generator()``, ``numpy.random.default_rng``)
are not global: save their ``get_state()`` alongside.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import torch

RNG_STATE_VERSION = 1
_NUMPY_KIND = "MT19937"


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's, torch's CPU and every CUDA device's global generators.

    The result holds only dicts, tuples, ints, floats, str, bytes, None and CPU tensors, so
    :func:`asyncckpt.save` (and ``torch.save``) can store it. Initializes CUDA when it is available.
    """
    state: dict[str, Any] = {
        "version": RNG_STATE_VERSION,
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
    }
    numpy_state = _numpy_state()
    if numpy_state is not None:
        state["numpy"] = numpy_state
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Any) -> None:
    """Restore the generators from a value :func:`rng_state` returned (possibly saved and loaded).

    Raises ``ValueError`` for a value that is not such a state. Warns (``RuntimeWarning``) and
    restores what it can when this process cannot restore a part: NumPy not installed, no CUDA,
    or a different number of CUDA devices.
    """
    if not isinstance(state, dict) or state.get("version") != RNG_STATE_VERSION:
        raise ValueError(f"not an asyncckpt rng state (version {RNG_STATE_VERSION}): {type(state).__name__}")
    try:
        cpu = _byte_tensor(state["torch"])
        random.setstate(state["python"])
        torch.set_rng_state(cpu)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"malformed rng state: {exc}") from exc
    if "numpy" in state:
        _set_numpy_state(state["numpy"])
    if "cuda" in state:
        _set_cuda_states(state["cuda"])


def _byte_tensor(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 tensor, got {type(value).__name__}")
    return value.cpu()


def _numpy_state() -> dict[str, Any] | None:
    try:
        import numpy as np
    except ImportError:
        return None
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "kind": str(kind),
        "keys": np.asarray(keys, dtype="<u4").tobytes(),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(value: Any) -> None:
    try:
        import numpy as np
    except ImportError:
        warnings.warn("the rng state holds NumPy's, but NumPy is not installed", RuntimeWarning, stacklevel=3)
        return
    try:
        keys = np.frombuffer(value["keys"], dtype="<u4").astype(np.uint32)
        np.random.set_state(
            (value["kind"], keys, int(value["pos"]), int(value["has_gauss"]), float(value["cached_gaussian"]))
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed NumPy rng state: {exc}") from exc


def _set_cuda_states(states: Any) -> None:
    if not isinstance(states, list | tuple):
        raise ValueError(f"malformed CUDA rng states: {type(states).__name__}")
    if not torch.cuda.is_available():
        if states:
            warnings.warn(
                "the rng state holds CUDA generators, but CUDA is not available", RuntimeWarning, stacklevel=3
            )
        return
    # Before CUDA is initialized, set_rng_state is queued and a queued manual_seed would run
    # after it at initialization, undoing the restore: initialize first.
    torch.cuda.init()  # type: ignore[no-untyped-call]
    count = torch.cuda.device_count()
    if len(states) != count:
        warnings.warn(
            f"the rng state holds {len(states)} CUDA generators, this process has {count} devices; "
            f"restoring the first {min(len(states), count)}",
            RuntimeWarning,
            stacklevel=3,
        )
    for device, value in enumerate(states[:count]):
        torch.cuda.set_rng_state(_byte_tensor(value), device)
