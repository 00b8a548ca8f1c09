"""Who does which work: a deterministic greedy balance of whole parameters (owner mode) or of refresh units
(replicate mode) over the ranks of a process group.

Both plans depend only on the parameters' order, shapes and preconditioners and on the world size ``W``: every
rank computes the same plan without communicating, and a resumed run (at any ``W``) recomputes it.

Cost of one parameter (owner mode), in flops up to a constant (``docs/scaling.md``):

    c(p) = Σ_{k refreshed} d_k³ / T  +  numel(p) · (Σ_{k dense} d_k + 1)                    (1)

the first term the basis refreshes (an ``eigh`` or a QR of each ``d_k × d_k`` factor every ``T`` steps), the
second the per-step products (each dense mode costs one ``numel·d_k`` contraction, rotations in and out and the
fold) plus the elementwise work. Parameters are taken largest cost first and each goes to the rank with the least
load so far (ties: the rank with fewer parameters, then the lower rank): the longest-processing-time rule, which
puts equal shapes on different ranks in turn, so each rank still stacks its share of a repeated layer into one
batched call (Graham 1969; Distributed Shampoo's ``distribute_buffer_sizes`` balances bytes the same way).
"""

from __future__ import annotations

from typing import Hashable, Sequence

from precond.layout import Layout


def parameter_cost(layout: Layout, refreshed: Sequence[int], every: int) -> float:
    """Eq. (1) for one parameter of ``layout`` whose modes ``refreshed`` get a new basis every ``every`` steps."""
    refresh = sum(layout.view_shape[k] ** 3 for k in refreshed) / every
    per_step = layout.numel * (sum(layout.view_shape[k] for k in layout.dense_modes) + 1)
    return refresh + per_step


def balance(costs: Sequence[float], world: int) -> list[int]:
    """The rank of each item: largest cost first, each to the least-loaded rank (ties: fewer items, lower rank);
    items of equal cost keep their order."""
    if world < 1:
        raise ValueError(f"world size must be ≥ 1, got {world}")
    loads = [0.0] * world
    counts = [0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], counts[r], r))
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
        for (key, _), rank in zip(members, balance([float(d) ** 3 for _, d in members], world)):
            out[key] = rank
    return out
