"""What ``restore`` hands to an optimizer's ``load_state_dict``: the state, with the parameter
ids of its groups in lists that answer ``in`` from a set.

torch's ``Optimizer.load_state_dict`` looks up every state tensor's parameter id in the saved
parameter groups' lists (``param_id in group["params"]``, to learn whether its group is fused or
capturable): time quadratic in the number of parameters, 80% of loading Adam's state at 2,500
parameters (90 ms). The lists given instead hold the same ids and compare, iterate and index as
the same lists; a deep copy of one (``load_state_dict`` copies the groups) is a plain list, so
the optimizer keeps none of them. Only for optimizers that load with torch's own method, and
only when every id is an ``int`` (there a set's answer is the list's).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class ParamIds(list[Any]):
    """A parameter group's saved ids, ``in`` answered by a set (see the module)."""

    def __init__(self, ids: Iterable[int]) -> None:
        super().__init__(ids)
        self._set = frozenset(self)

    def __contains__(self, item: object) -> bool:
        return item in self._set  # torch asks for a key of the state dict: hashable

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)  # ints: a deep copy of one is itself


def optimizer_state(optimizer: torch.optim.Optimizer, saved: Any) -> Any:
    """``saved`` for ``optimizer.load_state_dict``: a shallow copy whose groups' ``params`` are
    :class:`ParamIds`, or ``saved`` itself when that cannot help or could change anything."""
    if (
        type(optimizer).load_state_dict is not torch.optim.Optimizer.load_state_dict
        or "load_state_dict" in vars(optimizer)  # replaced on the instance
        or type(saved) is not dict
    ):
        return saved
    groups = saved.get("param_groups")
    if type(groups) is not list or not all(_int_ids(group) for group in groups):
        return saved
    return {**saved, "param_groups": [{**group, "params": ParamIds(group["params"])} for group in groups]}


def _int_ids(group: Any) -> bool:
    return (
        type(group) is dict
        and type(group.get("params")) is list
        and all(type(i) is int for i in group["params"])
    )
