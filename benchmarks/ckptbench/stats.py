"""Medians with min/max, and ratios taken run by run."""

from __future__ import annotations

import statistics
from typing import Any


def summary(values: list[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "n", "runs"}`` of ``values`` (None when empty)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "runs": []}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "runs": [round(v, 6) for v in values],
    }


def ratios(numerators: list[float], denominators: list[float]) -> dict[str, Any]:
    """Summary of ``numerators[i] / denominators[i]``: each ratio comes from one round."""
    pairs = [(n, d) for n, d in zip(numerators, denominators, strict=False) if d > 0]
    return summary([n / d for n, d in pairs])


def median(entry: dict[str, Any] | None) -> float | None:
    if not entry:
        return None
    value = entry.get("median")
    return None if value is None else float(value)
