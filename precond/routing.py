"""Splitting parameters between the two parts of a mixed optimizer (``precond.muon``: Newton–Schulz and Adam)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def muon_groups(params: Iterable[Any], adam_params: Iterable[Any], adam_settings: dict[str, Any],
                other_names: bool = False) -> list[dict[str, Any]]:
    """``precond.Muon``'s param groups, each with ``use_muon`` set.

    ``params`` are tensors, ``(name, tensor)`` pairs or param-group dicts. An entry (or a group without
    ``use_muon``) is split: tensors with ``ndim ≥ 2`` not in ``adam_params`` form a Muon group, the rest an Adam group
    with ``adam_settings`` (a group's own keys apply to both halves). A group with ``use_muon`` goes whole to that
    part; ``use_muon=True`` with a tensor of fewer than 2 dimensions is refused. ``adam_params`` holds tensors or
    names of the named parameters; a name that is not among them is refused, unless ``other_names`` (a group added
    later: the names may be those of the parameters given at construction). Empty groups are dropped;
    ``(name, tensor)`` pairs are kept so the optimizer's messages name the parameters.
    """
    items = [params] if isinstance(params, torch.Tensor) else list(params)
    raw = items if items and isinstance(items[0], dict) else [{"params": items}]
    named = {item[0]: item[1] for group in raw for item in _members(group) if isinstance(item, tuple)}
    to_adam = {id(tensor) for tensor in (_adam_tensor(entry, named, other_names) for entry in adam_params)
               if tensor is not None}
    groups: list[dict[str, Any]] = []
    for group in raw:
        members, extra = _members(group), {k: v for k, v in group.items() if k != "params"}
        if "use_muon" in extra:
            halves = [(_checked_flag(extra["use_muon"], members), members)]
        else:
            is_matrix = [_tensor(i).ndim >= 2 and id(_tensor(i)) not in to_adam for i in members]
            halves = [(True, [i for i, m in zip(members, is_matrix, strict=True) if m]),
                      (False, [i for i, m in zip(members, is_matrix, strict=True) if not m])]
        for use_muon, part in halves:
            if part:
                base = {} if use_muon else dict(adam_settings)
                groups.append({**base, **extra, "use_muon": use_muon, "params": part})
    return groups


def _tensor(item: Any) -> torch.Tensor:
    return item[1] if isinstance(item, tuple) else item


def _members(group: dict[str, Any]) -> list[Any]:
    members = group["params"]
    return [members] if isinstance(members, torch.Tensor) else list(members)


def _adam_tensor(entry: Any, named: dict[str, torch.Tensor], other_names: bool) -> torch.Tensor | None:
    if isinstance(entry, str):
        if entry not in named and other_names:
            return None
        if entry not in named:
            raise ValueError(f"adam_params names {entry!r}, which is not among the named parameters given "
                             f"({', '.join(named) if named else 'none: pass model.named_parameters() to use names'})")
        return named[entry]
    if not isinstance(entry, torch.Tensor):
        raise TypeError(f"adam_params must hold parameters or their names, got {type(entry).__name__} {entry!r}")
    return entry


def _checked_flag(use_muon: Any, members: list[Any]) -> bool:
    if not isinstance(use_muon, bool):
        raise TypeError(f"a group's use_muon must be True or False, got {use_muon!r}")
    flat = [tuple(_tensor(i).shape) for i in members if _tensor(i).ndim < 2]
    if use_muon and flat:
        raise ValueError(f"a group with use_muon=True holds parameters of fewer than 2 dimensions {flat}; "
                         "Newton–Schulz needs matrices: put them in a group with use_muon=False")
    return use_muon
