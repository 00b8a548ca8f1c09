"""Who does which work: a deterministic greedy balance of whole parameters (owner mode) or of refresh units
(replicate mode) over the ranks of a process group.

Both plans depend only on the parameters' order, shapes and preconditioners and on the world size ``W``: every
rank computes the same plan without communicating, and a resumed run (at any ``W``) recomputes it.

Owner mode balances two things: the work and the memory. The work of one parameter, in flops up to a constant:

    c(p) = Σ_{k refreshed} d_k³ / T  +  numel(p) · (Σ_{k dense} d_k + 1)                    (1)

the first term the basis refreshes (an ``eigh`` or a QR of each ``d_k × d_k`` factor every ``T`` steps), the
second the per-step products (each dense mode costs one ``numel·d_k`` contraction, rotations in and out and the
fold) plus the elementwise work. Its state, in entries:

    s(p) = Σ_{k dense} (2 d_k² + d_k) + Σ_{k diagonal} d_k + numel(p)                         (2)

(``S_k``, ``Q_k``, ``λ_k`` and one parameter-sized moment). Each parameter's score is its share of both totals,

    σ(p) = c(p) / Σ_q c(q)  +  s(p) / Σ_q s(q)                                                 (3)

so neither a refresh-heavy square matrix nor a state-heavy embedding (on GPT-2 small the token embedding is 31% of
the weights but one dense mode) unbalances the ranks. Parameters are taken by decreasing score, members of one
kind (param group, shape, dtype: those that stack) next to each other, and each goes to the rank with the least
score so far (ties: the rank holding fewer of its kind, then fewer parameters, then the lower rank): the
longest-processing-time rule (Graham 1969: the largest load is at most the average plus the largest item;
Distributed Shampoo's ``distribute_buffer_sizes`` balances bytes greedily too). Equal shapes thus go round the
ranks, so each rank stacks its share of a repeated layer into one batched call, unless a dominant parameter on
one rank makes the others take more of them.

``placement="by_kind"`` trades some of that balance for fewer kernel launches per rank: a step issues a fixed
number of launches per bucket whatever its batch size, so a rank holding a share of *every* kind launches as many
kernels as one process and a launch-bound step barely shrinks with ``W``. There the units balanced are whole kinds
(the sum of their members' scores), and a kind larger than the average load ``Σσ/W`` is cut into
``⌈σ_kind / (Σσ/W)⌉`` units of consecutive members (sizes differing by at most one), so each kind lands on as few
ranks as the balance allows. A unit's score adds its share of the launches to Eq. (3), weighted as much as the work
and the state together (the placement is meant for launch-bound steps),

    σ(u) = Σ_{p ∈ u} σ(p)  +  2 / (number of units)                                            (4)

and the same rule then gives the largest load at most the average plus the largest unit.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

from precond.layout import Layout


def parameter_cost(layout: Layout, refreshed: Sequence[int], every: int | None) -> float:
    """Eq. (1) for one parameter of ``layout`` whose modes ``refreshed`` get a new basis every ``every`` steps;
    ``every=None`` (a basis never refreshed, ``bases.Identity``) or no refreshed mode: no refresh term."""
    refresh = 0.0 if every is None else sum(layout.view_shape[k] ** 3 for k in refreshed) / every
    per_step = layout.numel * (sum(layout.view_shape[k] for k in layout.dense_modes) + 1)
    return refresh + per_step


def state_size(layout: Layout) -> int:
    """Eq. (2): state entries of one parameter of ``layout``."""
    return layout.state_numel() + layout.numel


def balance(scores: Sequence[float], world: int, kinds: Sequence[Hashable] | None = None,
            fixed: Mapping[int, int] | None = None) -> list[int]:
    """The rank of each item: by decreasing score (one kind's items together), each to the least-loaded rank (ties:
    fewer items of its kind there, then fewer items, then the lower rank). Items in ``fixed`` (index → rank) keep
    their rank and count in the loads. Deterministic: it depends only on its arguments; without ``fixed`` the
    largest load is at most the average plus the largest score."""
    if world < 1:
        raise ValueError(f"world size must be ≥ 1, got {world}")
    kinds = list(range(len(scores))) if kinds is None else list(kinds)
    first: dict[Hashable, int] = {}
    for i, kind in enumerate(kinds):
        first.setdefault(kind, i)
    largest: dict[Hashable, float] = {}
    for score, kind in zip(scores, kinds, strict=True):
        largest[kind] = max(largest.get(kind, score), score)
    loads = [0.0] * world
    counts = [0] * world
    of_kind: dict[tuple[Hashable, int], int] = {}
    owner = [0] * len(scores)
    fixed = fixed or {}
    for i in sorted(range(len(scores)), key=lambda i: (i not in fixed, -scores[i], -largest[kinds[i]],
                                                        first[kinds[i]], i)):
        rank = fixed[i] if i in fixed else min(range(world), key=lambda r: (loads[r], of_kind.get((kinds[i], r), 0),
                                                                            counts[r], r))
        owner[i] = rank
        loads[rank] += scores[i]
        counts[rank] += 1
        of_kind[(kinds[i], rank)] = of_kind.get((kinds[i], rank), 0) + 1
    return owner


LAUNCH_WEIGHT = 2.0
"""Eq. (4): the weight of a unit's share of the launches beside Eq. (3)'s two shares (work and state)."""


def kind_units(scores: Sequence[float], kinds: Sequence[Hashable], world: int,
               fixed: Mapping[int, int] | None = None) -> list[int]:
    """``placement="by_kind"``: the unit of each item — one per kind, a kind above the average load ``Σσ/W`` cut
    into ``⌈σ_kind/(Σσ/W)⌉`` units of consecutive items; an item of ``fixed`` is a unit of its own."""
    fixed = fixed or {}
    average = (sum(scores) or 1.0) / world
    members: dict[Hashable, list[int]] = {}
    for i, kind in enumerate(kinds):
        if i not in fixed:
            members.setdefault(kind, []).append(i)
    unit = [0] * len(scores)
    count = 0
    for i in fixed:
        unit[i], count = count, count + 1
    for items in members.values():
        pieces = min(len(items), max(1, math.ceil(sum(scores[i] for i in items) / average - 1e-9)))
        base, extra = divmod(len(items), pieces)
        start = 0
        for piece in range(pieces):
            size = base + (piece < extra)
            for i in items[start:start + size]:
                unit[i] = count
            start, count = start + size, count + 1
    return unit


def owner_plan(entries: Sequence, world: int, fixed: Mapping[int, int] | None = None,
               placement: str = "balanced") -> list[int]:
    """The owner of each parameter (``precond.distributed.runtime.Entry``: layout, preconditioner, group index):
    Eq. (3) scores balanced by :func:`balance`, one kind per (param group, shape, dtype); with ``placement="by_kind"``
    over the units of :func:`kind_units` instead of single parameters. ``fixed``: entries that keep their owner
    (parameters already stepped when a param group is added: their state stays where it is)."""
    costs = [parameter_cost(e.layout, e.preconditioner.refreshable_modes(e.layout), e.preconditioner.basis.every)
             for e in entries]
    sizes = [state_size(e.layout) for e in entries]
    total_cost, total_size = sum(costs) or 1.0, sum(sizes) or 1
    scores = [c / total_cost + s / total_size for c, s in zip(costs, sizes, strict=True)]
    kinds = [(e.group_index, e.layout.shape, e.param.dtype) for e in entries]
    if placement == "balanced":
        return balance(scores, world, kinds, fixed)
    unit = kind_units(scores, kinds, world, fixed)
    units = max(unit, default=-1) + 1
    unit_scores = [LAUNCH_WEIGHT / units] * units  # each unit's share of the buckets, so of the launches: Eq. (4)
    unit_kinds: list[Hashable] = [None] * units
    unit_fixed: dict[int, int] = {}
    for i, u in enumerate(unit):
        unit_scores[u] += scores[i]
        unit_kinds[u] = kinds[i]
        if fixed and i in fixed:
            unit_fixed[u] = fixed[i]
    owner_of_unit = balance(unit_scores, world, unit_kinds, unit_fixed)
    return [owner_of_unit[u] for u in unit]


def refresh_owners(units: Sequence[tuple[Hashable, int, int, int]], world: int) -> dict[Hashable, int]:
    """Replicate mode: the rank computing each refresh unit ``(key, d_k, T, offset)``. Units due at the same steps
    (same ``T`` and stagger offset) are balanced among themselves by ``d_k³``, so every refresh step's work is
    spread over the ranks; without stagger all offsets are 0 and all units are balanced together."""
    slots: dict[tuple[int, int], list[tuple[Hashable, int]]] = {}
    for key, d, every, offset in units:
        slots.setdefault((every, offset), []).append((key, d))
    out: dict[Hashable, int] = {}
    for members in slots.values():
        for (key, _), rank in zip(members, balance([float(d) ** 3 for _, d in members], world), strict=True):
            out[key] = rank
    return out
