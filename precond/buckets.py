"""Stacking parameters of equal layout: one batched state per bucket, per-parameter views into it.

A bucket holds the parameters of one param group, layout, dtype and device that have seen the same number of updates
(its one step counter); a parameter cut into blocks (``precond.blocking``) takes part as its blocks, each a member
of its own. Each parameter's ``optimizer.state[p]`` keeps its usual nested dict (``precond.state``),
but its tensors are *views* of slice ``i`` of the bucket's stacked tensors, so the per-parameter state
(``state_dict``, ``part_state``) and the batched math share memory.

A step where only some members have a gradient splits the bucket: the members with a gradient move to a bucket of
their own, which runs as one batched call, and the rest keep theirs (:meth:`Buckets.split`). Buckets that come to
share a key and step count again are merged at the start of the next step (:meth:`Buckets.consolidate`).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterator, Optional, Sequence

import attrs
import torch

from precond.layout import Layout
from precond.preconditioner import Preconditioner
from precond.refresh import Refresh
from precond.state import STEP, ParamState, map_leaves, new_step, read_step


def _combine(states: Sequence[dict[str, Any]], join: Callable[[list[torch.Tensor]], torch.Tensor]) -> dict[str, Any]:
    first = states[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if key == STEP:
            continue
        if isinstance(value, torch.Tensor):
            out[key] = join([s[key] for s in states])
        elif isinstance(value, dict):
            out[key] = _combine([s[key] for s in states], join)
    return out


def stack_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensor leaves of per-parameter states into one batched storage (leading axis = position)."""
    return _combine(states, torch.stack)


def _assign_views(storage: dict[str, Any], states: Sequence[dict[str, Any]]) -> None:
    """Make every per-parameter state's tensor leaves views of its slice of ``storage``."""
    def reslice(batched: dict[str, Any], state: dict[str, Any], i: int) -> None:
        for key, value in batched.items():
            if isinstance(value, torch.Tensor):
                state[key] = value[i]
            else:
                reslice(value, state.setdefault(key, {}), i)

    for i, state in enumerate(states):
        reslice(storage, state, i)


@attrs.define(eq=False)
class Bucket:
    """Parameters of one param group, shape, dtype, device and step count, updated with one batched call each."""

    key: Hashable
    params: list[torch.Tensor]
    layout: Layout
    storage: dict[str, Any]
    step: int
    group: dict[str, Any] = attrs.field(repr=False)
    state: ParamState = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.state = ParamState.of(self.storage, self.layout, tuple(self.params))

    @property
    def preconditioner(self) -> Preconditioner:
        return self.group["preconditioner"]

    def select(self, index: torch.Tensor, mode: Optional[int] = None) -> ParamState:
        """Copies of the entries ``index`` of this bucket's state (only what a refresh of ``mode`` touches, if
        given)."""
        state = self.state if mode is None else self.state.of_mode(mode, self.preconditioner.momentum_in_basis)
        return state.map(lambda t: t.index_select(0, index))

    def write_back(self, sub: ParamState, index: torch.Tensor) -> None:
        """Write a :meth:`select`-ed (and since changed) state back into the entries ``index``."""
        for mine, theirs in self.state.pairs(sub):
            mine.index_copy_(0, index, theirs)

    def refresh_inputs(self, k: int, index: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S_k, Q_k)`` of the entries ``index`` (all when None: the live tensors, no copy; else copies of just
        those two)."""
        factor, basis = self.preconditioner.refresh_inputs(self.state, k)
        if index is None:
            return factor, basis
        return factor.index_select(0, index), basis.index_select(0, index)

    def tracked_diagonal(self, k: int, index: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``diag(Q_kᵀ S_k Q_k)`` of the entries ``index`` (all when None) if the estimator keeps it, else None."""
        diagonal = self.preconditioner.estimator.tracked_diagonal(self.state, k)
        return diagonal if diagonal is None or index is None else diagonal.index_select(0, index)

    def install_refresh(self, k: int, index: Optional[torch.Tensor], result: Refresh) -> None:
        """Install ``result`` for the entries ``index`` (all when None), reading their state as it is now."""
        if index is None:
            self.preconditioner.install_refresh(self.state, k, result, self.layout)
            return
        sub = self.select(index, k)
        self.preconditioner.install_refresh(sub, k, result, self.layout)
        self.write_back(sub, index)


Members = Callable[[dict[str, Any]], list[torch.Tensor]]
LayoutOf = Callable[[dict[str, Any], torch.Tensor], Layout]
States = Any
"""The per-member state dicts: ``state[p]`` and ``state.get(p)`` (``optimizer.state``, or
:class:`precond.blocking.MemberStates` where a member may be a block of a parameter)."""


def _whole(group: dict[str, Any]) -> list[torch.Tensor]:
    return list(group["params"])


def _plan(group: dict[str, Any], p: torch.Tensor) -> Layout:
    return group["preconditioner"].plan(p.shape)


class Buckets:
    """The optimizer's buckets: built from the per-parameter states, grown by new parameters, split by partial
    steps, merged again when their step counts meet. ``key(group_index, p)`` says which members may stack.

    A *member* is a parameter, or a block of one (a view, ``precond.blocking``): ``members(group)`` lists a group's
    members and ``layout_of(group, member)`` gives a member's layout (by default every parameter is a member, planned
    whole)."""

    def __init__(self, key: Callable[[int, torch.Tensor], Hashable], members: Members = _whole,
                 layout_of: LayoutOf = _plan) -> None:
        self.key = key
        self.members = members
        self.layout_of = layout_of
        self.items: Optional[list[Bucket]] = None
        self._split = False

    def _bucket(self, key: Hashable, params: list[torch.Tensor], group: dict[str, Any], storage: dict[str, Any],
                step: int, states: Sequence[dict[str, Any]]) -> Bucket:
        _assign_views(storage, states)
        return Bucket(key, params, self.layout_of(group, params[0]), storage, step, group)

    @property
    def built(self) -> bool:
        return self.items is not None

    def __iter__(self) -> Iterator[Bucket]:
        return iter(self.items or ())

    def invalidate(self) -> None:
        """Forget the buckets (after ``load_state_dict``): they are rebuilt from the per-parameter states."""
        self.items = None

    def rebuild(self, param_groups: Sequence[dict[str, Any]], state: States) -> None:
        """Stack the per-member states, one bucket per key and step count."""
        batches: dict[tuple, tuple[dict[str, Any], list[torch.Tensor]]] = {}
        for i, group in enumerate(param_groups):
            for p in self.members(group):
                if state.get(p):
                    if not isinstance(state[p][STEP], torch.Tensor):  # an older checkpoint's plain number
                        state[p][STEP] = new_step() + read_step(state[p])
                    batches.setdefault((self.key(i, p), read_step(state[p])), (group, []))[1].append(p)
        self.items = []
        for (key, step), (group, params) in batches.items():
            states = [state[p] for p in params]
            self.items.append(self._bucket(key, params, group, stack_states(states), step, states))

    def add(self, key: Hashable, params: list[torch.Tensor], group: dict[str, Any], storage: dict[str, Any],
            states: Sequence[dict[str, Any]]) -> Bucket:
        """A new bucket of fresh parameters at step 0 (their per-parameter states become views of ``storage``)."""
        bucket = self._bucket(key, params, group, storage, 0, states)
        if self.items is not None:
            self.items.append(bucket)
        return bucket

    def split(self, bucket: Bucket, positions: Sequence[int], state: States) -> Bucket:
        """Move the members at ``positions`` to a bucket of their own (returned); the rest stay in ``bucket``."""
        chosen_set = set(positions)
        keep = [i for i in range(len(bucket.params)) if i not in chosen_set]
        parts = []
        for chosen in (list(positions), keep):
            index = torch.tensor(chosen, device=bucket.params[0].device)
            params = [bucket.params[i] for i in chosen]
            storage = map_leaves(bucket.storage, lambda t, index=index: t.index_select(0, index))
            states = [state[p] for p in params]
            parts.append(self._bucket(bucket.key, params, bucket.group, storage, bucket.step, states))
        self.items[self.items.index(bucket):self.items.index(bucket) + 1] = parts
        self._split = True
        return parts[0]

    def consolidate(self, state: States) -> None:
        """Merge buckets that share a key and a step count (after partial steps brought them level again)."""
        if not self._split or self.items is None:
            return
        self._split = False
        merged: dict[tuple, list[Bucket]] = {}
        for bucket in self.items:
            merged.setdefault((bucket.key, bucket.step), []).append(bucket)
        items = []
        for (key, step), buckets in merged.items():
            if len(buckets) == 1:
                items.append(buckets[0])
                continue
            params = [p for b in buckets for p in b.params]
            storage = _combine([b.storage for b in buckets], torch.cat)
            items.append(self._bucket(key, params, buckets[0].group, storage, step, [state[p] for p in params]))
        self.items = items

