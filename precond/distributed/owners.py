"""Who does which work: a deterministic greedy balance of whole parameters (owner mode) or of refresh units
(replicate mode) over the ranks of a process group.

Both plans depend only on the parameters' order, shapes and preconditioners and on the world size ``W``: every
rank computes the same plan without communicating, and a resumed run (at any ``W``) recomputes it.

Cost of one parameter (owner mode), in flops up to a constant (``docs/scaling.md``):

    c(p) = Σ_{k refreshed} d_k³ / T  +  numel(p) · (Σ_{k dense} d_k + 1)                    (1)

the first term the basis refreshes (an ``eigh`` or a QR of each ``d_k × d_k`` factor every ``T`` steps), the
second the per-step products (each dense mode costs one ``numel·d_k`` contraction, rotations in and out and the
fold) plus the elementwise work. Parameters that would stack (one param group, shape and dtype) are dealt round the
ranks together, least-loaded rank first, and such kinds are taken largest cost first: the longest-processing-time
rule (Graham 1969; Distributed Shampoo's ``distribute_buffer_sizes`` balances bytes greedily too) made to spread
equal shapes, so every rank holds its ⌊n/W⌋ or ⌈n/W⌉ share of a repeated layer and still stacks it into one
batched call.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from precond.layout import Layout


def parameter_cost(layout: Layout, refreshed: Sequence[int], every: int) -> float:
    """Eq. (1) for one parameter of ``layout`` whose modes ``refreshed`` get a new basis every ``every`` steps."""
    refresh = sum(layout.view_shape[k] ** 3 for k in refreshed) / every
    per_step = layout.numel * (sum(layout.view_shape[k] for k in layout.dense_modes) + 1)
    return refresh + per_step


def balance(costs: Sequence[float], world: int, kinds: Sequence[Hashable] | None = None) -> list[int]:
    """The rank of each item. Items of one kind (``kinds[i]``, e.g. one param group, shape and dtype: members that
    stack; by default equal cost) are dealt round the ranks, least-loaded rank first, so every rank gets ⌊n/W⌋ or
    ⌈n/W⌉ of them; kinds are taken largest item cost first (the longest-processing-time order). Ties: fewer items,
    then the lower rank. Deterministic: it depends only on its arguments."""
    if world < 1:
        raise ValueError(f"world size must be ≥ 1, got {world}")
    kinds = list(costs) if kinds is None else list(kinds)
    members: dict[Hashable, list[int]] = {}
    for i in range(len(costs)):
        members.setdefault(kinds[i], []).append(i)
    loads = [0.0] * world
    counts = [0] * world
    owner = [0] * len(costs)
    for kind in sorted(members, key=lambda k: (-max(costs[i] for i in members[k]), members[k][0])):
        order = sorted(range(world), key=lambda r: (loads[r], counts[r], r))
        for j, i in enumerate(members[kind]):
            rank = order[j % world]
            owner[i] = rank
            loads[rank] += costs[i]
            counts[rank] += 1
    return owner


def refresh_owners(units: Sequence[tuple[Hashable, int, int, int]], world: int) -> dict[Hashable, int]:
    """Replicate mode: the rank computing each refresh unit ``(key, d_k, T, offset)``. Units due at the same steps
    (same ``T`` and stagger offset) are balanced among themselves by ``d_k³``, so every refresh step's work is
    spread over the ranks; without stagger all offsets are 0 and all units are balanced together."""
    slots: dict[tuple[int, int], list[tuple[Hashable, int]]] = {}
    for key, d, every, offset in units:
        slots.setdefault((every, offset), []).append((key, d))
    out: dict[Hashable, int] = {}
    for members in slots.values():
        for (key, _), rank in zip(members, balance([float(d) ** 3 for _, d in members], world,
                                                   [d for _, d in members])):
            out[key] = rank
    return out
