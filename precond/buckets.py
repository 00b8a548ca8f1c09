"""Stacking parameters of equal layout: one batched state per bucket, per-parameter views into it.

Each parameter's ``optimizer.state[p]`` keeps its usual nested dict, but its tensors are *views* of slice ``i`` of
the bucket's stacked tensors, so the per-parameter state (``state_dict``, ``part_state``) and the batched math
share memory. After ``load_state_dict`` (or when parameters drift apart in step count) buckets are rebuilt by
stacking the per-parameter tensors again.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import attrs
import torch

from precond.layout import Layout

_NOT_STACKED = ("step",)


def map_leaves(state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor leaf of a nested state (dicts of dicts of tensors)."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {key: map_leaves(value, fn) for key, value in state.items()}
    return state


def stack_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensor leaves of per-parameter states into one batched state (leading axis = position)."""
    first = states[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if key in _NOT_STACKED:
            continue
        if isinstance(value, torch.Tensor):
            out[key] = torch.stack([s[key] for s in states])
        elif isinstance(value, dict):
            out[key] = stack_states([s[key] for s in states])
    return out


def assign_views(batched: dict[str, Any], states: Sequence[dict[str, Any]]) -> None:
    """Make every per-parameter state's tensor leaves views of its slice of ``batched``."""
    for i, state in enumerate(states):
        _reslice(batched, state, i)


def _reslice(batched: dict[str, Any], state: dict[str, Any], i: int) -> None:
    for key, value in batched.items():
        if isinstance(value, torch.Tensor):
            state[key] = value[i]
        else:
            _reslice(value, state.setdefault(key, {}), i)


@attrs.define(eq=False)
class Bucket:
    """Parameters of one param group, shape, dtype, device and step count, updated with one batched kernel each."""

    key: Hashable
    params: list[torch.Tensor]
    layout: Layout
    state: dict[str, Any]
    step: int
    group: dict[str, Any] = attrs.field(repr=False)
