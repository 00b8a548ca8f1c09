"""A cost model of owner mode (``precond.DataParallel(mode="owner")``) against world size ``W``: per-rank
``step()`` time, bytes exchanged and optimizer state, for GPT-2 small, 350M and 1.3B shapes (``docs/scaling.md``,
"A cost model"). Fitted to the 1- and 2-GPU measurements of ``docs/scaling.md`` (two H200s, kl_shampoo, T = 10,
max dim 2048, balanced placement, pipelined exchange); everything above ``W = 2`` is a projection, not a measurement.

    python -m precond.bench.cost_model            # the table
    python -m precond.bench.cost_model --json out.json

Per rank and step (``N`` entries, ``b`` bytes per exchanged element, ``B`` the link's bandwidth):

- state  ``S(W) = 4 · max_r Σ_{p owned by r} s(p)``, ``s(p) = Σ_{k dense}(2d_k² + d_k) + Σ_{k diag} d_k + numel``
  (Eq. 2 of ``precond.distributed.owners``; modes above ``max_dim`` keep nothing, a vector a diagonal), whole
  parameters placed by the library's own plan (``owner_plan``);
- exchange ``X(W) = b · N · (W − 1) / W`` received (the update all-gather; padding to the largest slot ignored);
- time ``t(W) = C · κ · m(W) + F + X(W) / B + c (W − 1) α`` for ``W ≥ 2`` and ``t(1) = C + H``: ``m(W)`` the
  busiest rank's share of Eq. 1's work under the plan, ``κ`` the measured busier rank's kernel share at ``W = 2``
  over the plan's, ``C`` one process's kernel time scaled by Eq. 1's total work, ``H`` its host time, ``F`` the
  fixed cost of owner mode (applying every update on every rank, the finiteness all-reduce, host time) fitted at
  ``W = 2``, ``c`` collectives of ``W − 1`` ring steps of latency ``α``; no overlap of the exchange with compute
  (the pipelined exchange gained 1–2 ms on an already busy GPU).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

from precond.bench.shapes import gpt2

MiB = 2**20

# --- the measurements the model is fitted to (docs/scaling.md, "Measured on two H200s") --------------------------
SINGLE_STEP_MS = 43.5  # one process's step() (its own `single`, balanced pipelined call)
SINGLE_KERNEL_MS = 40.1  # of which in kernels (profile)
OWNER_W2_STEP_MS = 36.1  # the slower rank, owner, balanced, pipelined exchange, fp32
OWNER_W2_KERNEL_MS = 22.1  # the busier rank's compute kernels (19.7 / 22.1)
OWNER_W2_SENT_MIB = 249.0  # update all-gather per rank and step, fp32
MAX_DIM = 2048
EVERY = 10

# --- assumptions (stated in docs/scaling.md) -------------------------------------------------------------------
LINKS = {"nvlink": 360e9, "ib": 40e9}
"""Bytes/s a rank's ring collective achieves: NVLink within a node (H100/H200 NVLink 4: 450 GB/s per direction,
~80 % reached), and across nodes one 400 Gb/s InfiniBand NIC per GPU (50 GB/s, ~80 % reached)."""
GPUS_PER_NODE = 8
RING_STEP_S = 5e-6
"""Latency of one step of a ring collective (NCCL's all-gather is a ring: ``W − 1`` steps per collective)."""
COLLECTIVES = 6
"""Collectives per step (the pipelined exchange's chunks; 6 measured on GPT-2-small shapes, kept for all models)."""

MODELS = {
    # GPT-2 small as in precond.bench.shapes (tied head): 124.4 M
    "gpt2-small": gpt2(layers=12, width=768, vocab=50257, context=1024),
    # GPT-2 medium: 354.8 M
    "gpt2-350m": gpt2(layers=24, width=1024, vocab=50257, context=1024),
    # GPT-3 XL's shapes (24 layers, width 2048, context 2048) on GPT-2's vocabulary: 1.32 B
    "gpt-1.3b": gpt2(layers=24, width=2048, vocab=50257, context=2048),
}
WORLDS = (1, 2, 4, 8, 64, 1024)


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def dense_modes(shape: Sequence[int], max_dim: int = MAX_DIM) -> list[int]:
    """The modes kl_shampoo keeps a dense factor for: every mode ≤ ``max_dim`` of a parameter of order ≥ 2 (larger
    modes get nothing; a vector gets a diagonal ``λ`` if it is ≤ ``max_dim``)."""
    return [d for d in shape if d <= max_dim] if len(shape) >= 2 else []


def state_entries(shape: Sequence[int], max_dim: int = MAX_DIM) -> int:
    """Eq. 2 in closed form for kl_shampoo: ``S_k``, ``Q_k``, ``λ_k`` per dense mode, a vector's diagonal ``λ``,
    one parameter-sized moment."""
    diagonal = shape[0] if len(shape) == 1 and shape[0] <= max_dim else 0
    return sum(2 * d * d + d for d in dense_modes(shape, max_dim)) + diagonal + numel(shape)


def work(shape: Sequence[int], max_dim: int = MAX_DIM, every: int = EVERY) -> float:
    """Eq. 1 in closed form: refreshes ``d³/T`` of the dense modes, contractions ``numel · (Σ_dense d + 1)``."""
    dense = dense_modes(shape, max_dim)
    return sum(d**3 for d in dense) / every + numel(shape) * (sum(dense) + 1)


def exchange_bytes(n: int, world: int, element_bytes: int = 4) -> float:
    """Bytes one rank receives in the update all-gather per step (ring; padding ignored)."""
    return element_bytes * n * (world - 1) / world


def ddp_bytes(n: int, world: int, element_bytes: int = 4) -> float:
    """DDP's gradient all-reduce per rank and step, for scale (ring)."""
    return 2 * element_bytes * n * (world - 1) / world


def exchange_ms(n: int, world: int, link: float, element_bytes: int = 4) -> float:
    """The update all-gather's time per step, not overlapped: bandwidth plus ring latency."""
    if world == 1:
        return 0.0
    return (exchange_bytes(n, world, element_bytes) / link + COLLECTIVES * (world - 1) * RING_STEP_S) * 1e3


def _entries(shapes):
    import torch

    import precond
    from precond.distributed.runtime import entries_of

    params = [torch.nn.Parameter(torch.empty(shape, device="meta")) for shape in shapes]
    return entries_of(precond.kl_shampoo(params, max_dim=MAX_DIM, every=EVERY))


def shares(shapes, world: int, entries=None) -> tuple[float, float]:
    """The busiest rank's share of the state and of the work under the library's owner plan (balanced)."""
    from precond.distributed import owners

    if world == 1:
        return 1.0, 1.0
    entries = entries if entries is not None else _entries(shapes)
    owner = owners.owner_plan(entries, world)
    sizes = [state_entries(e.layout.shape) for e in entries]
    costs = [work(e.layout.shape) for e in entries]
    out = []
    for values in (sizes, costs):
        loads = [0.0] * world
        for v, o in zip(values, owner, strict=True):
            loads[o] += v
        out.append(max(loads) / sum(values))
    return out[0], out[1]


def fitted(reference=MODELS["gpt2-small"]) -> dict[str, float]:
    """The constants fitted to the two measured points (GPT-2 small)."""
    _, m2 = shares(reference, 2)
    n = sum(map(numel, reference))
    x2 = exchange_ms(n, 2, LINKS["nvlink"])
    return {"ms_per_work": SINGLE_KERNEL_MS / sum(map(work, reference)),
            "host_ms": SINGLE_STEP_MS - SINGLE_KERNEL_MS,
            "kappa": (OWNER_W2_KERNEL_MS / SINGLE_KERNEL_MS) / m2,
            "fixed_ms": OWNER_W2_STEP_MS - OWNER_W2_KERNEL_MS - x2,
            "plan_share_w2": m2, "exchange_w2_ms": x2}


def project(name: str, shapes, worlds=WORLDS, constants=None) -> list[dict[str, float]]:
    """One row per ``W``: flat owner mode over all ``W`` ranks (crossing nodes above ``GPUS_PER_NODE``), and the
    hierarchical alternative (owner within a node, replicated across nodes: the 2-D mesh)."""
    c = constants or fitted()
    entries = _entries(shapes)
    n = sum(map(numel, shapes))
    total_state = 4 * sum(state_entries(s) for s in shapes)
    compute = c["ms_per_work"] * sum(map(work, shapes))
    rows = []
    for world in worlds:
        state_share, work_share = shares(shapes, world, entries)
        if world == 1:
            step = compute + c["host_ms"]
            exchanged = 0.0
        else:
            link = LINKS["nvlink"] if world <= GPUS_PER_NODE else LINKS["ib"]
            exchanged = exchange_bytes(n, world)
            step = compute * min(1.0, c["kappa"] * work_share) + c["fixed_ms"] + exchange_ms(n, world, link)
        inner = min(world, GPUS_PER_NODE)
        inner_state, inner_work = shares(shapes, inner, entries)
        hier = (compute + c["host_ms"] if inner == 1 else compute * min(1.0, c["kappa"] * inner_work) + c["fixed_ms"]
                + exchange_ms(n, inner, LINKS["nvlink"]))
        rows.append({"model": name, "W": world, "N": n, "state_MiB": total_state * state_share / MiB,
                     "state_share": state_share, "work_share": work_share, "exchange_MiB": exchanged / MiB,
                     "ddp_MiB": ddp_bytes(n, world) / MiB, "step_ms": step, "single_ms": compute + c["host_ms"],
                     "hier_step_ms": hier, "hier_state_MiB": total_state * inner_state / MiB})
    return rows


def table(rows) -> str:
    head = ("| model | W | state MiB per rank (share) | update all-gather MiB | DDP all-reduce MiB "
            "| step ms, flat owner | step ms, owner within a node | one process ms | flat / one process |")
    lines = [head, "|" + " --- |" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['W']} | {r['state_MiB']:.0f} ({r['state_share']:.3f}) | "
                     f"{r['exchange_MiB']:.0f} | {r['ddp_MiB']:.0f} | {r['step_ms']:.1f} | {r['hier_step_ms']:.1f} | "
                     f"{r['single_ms']:.1f} | {r['step_ms'] / r['single_ms']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    constants = fitted()
    print("fitted:", ", ".join(f"{k}={v:.4g}" for k, v in constants.items()))
    rows = [row for name, shapes in MODELS.items() for row in project(name, shapes, constants=constants)]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"constants": constants, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
