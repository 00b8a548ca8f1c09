"""The physical floor of one optimizer step: the matrix-product FLOPs and the bytes a step must move, from the shapes.

For one parameter with ``N`` entries whose dense (Kronecker-factored) modes have sizes ``d_k``, ``k ∈ D``, with
``s = Σ_{k∈D} d_k``, a steady-state step of KL-Shampoo (``estimators.KL`` + ``Power``) multiplies matrices:

- the estimator's partial rotations ``G ×_{j≠k} Q_j`` for every ``k ∈ D``: ``2N·(|D|−1)·s``;
- the one full rotation from the cheapest partial: ``2N·min_k d_k``;
- the grams ``Δ_k`` (Eq. 4/5): ``2N·s``;
- the applier's rotation and rotation back ``(M ×_k Q_k) … ×_k Q_kᵀ``: ``4N·s``;

in all ``F_step = 2N·((|D| + 2)·s + min_k d_k)`` (0 without a dense mode), checked against torch's FLOP counter in
``tests/test_bench.py``. A refresh of mode ``k`` by Cholesky-QR2 (``bases.CholeskyQR``) costs ``2d³`` for ``S Q`` and,
per pass, ``2d³`` for ``YᵀY`` and ``2d³`` for the orthogonality check (plus the ``d³/3`` Cholesky and the ``d³``
triangular solve, not matrix products): ``10 d³`` of products every ``T`` steps.

Bytes (float32 state, 4 bytes an entry), the least a step must read or write once: the gradient (read), the
momentum (read, write), the parameter (read, write), every ``Q_k`` (read by estimator and applier) and ``S_k``
(read, write): ``4·(5N + Σ_k 4 d_k²)``. Intermediates that a fused kernel could keep on chip are not counted, so
the floor is a lower bound: ``max(F / peak FLOP/s, bytes / bandwidth)``.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Optional, Sequence

from precond.bench.shapes import PRESETS

H100_SXM = {"tf32_flops": 494.7e12, "fp32_flops": 66.9e12, "bandwidth": 3.35e12}
"""NVIDIA H100 SXM5 datasheet: dense TF32 tensor-core and FP32 (non-tensor) peaks, HBM3 bandwidth (bytes/s)."""


def dense_modes(shape: Sequence[int], max_dim: Optional[int]) -> list[int]:
    """Sizes of the modes ``NMode(max_dim)`` gives a dense factor (size-1 modes dropped; a vector gets none)."""
    kept = [d for d in shape if d > 1]
    if len(kept) <= 1:
        return []
    return [d for d in kept if max_dim is None or d <= max_dim]


def step_flops(shape: Sequence[int], max_dim: Optional[int]) -> int:
    """Matrix-product FLOPs of one steady-state KL-Shampoo step of a parameter (module docstring)."""
    modes = dense_modes(shape, max_dim)
    if not modes:
        return 0
    n = math.prod(shape)
    return 2 * n * ((len(modes) + 2) * sum(modes) + min(modes))


def refresh_flops(shape: Sequence[int], max_dim: Optional[int]) -> int:
    """Matrix-product FLOPs of refreshing every dense mode once by Cholesky-QR2."""
    return sum(10 * d**3 for d in dense_modes(shape, max_dim))


def step_bytes(shape: Sequence[int], max_dim: Optional[int]) -> int:
    return 4 * (5 * math.prod(shape) + sum(4 * d * d for d in dense_modes(shape, max_dim)))


def floor(shapes: Sequence[Sequence[int]], max_dim: Optional[int], every: int, device: dict = H100_SXM) -> dict:
    """FLOPs, bytes and the floor time (ms) of one step, refreshes amortised over ``every`` steps: ``floor_ms`` with
    TF32 tensor-core products, ``floor_fp32_ms`` with full-float32 products (torch's default for matmuls)."""
    flops = sum(step_flops(s, max_dim) for s in shapes) + sum(refresh_flops(s, max_dim) for s in shapes) / every
    moved = sum(step_bytes(s, max_dim) for s in shapes)
    compute_ms = flops / device["tf32_flops"] * 1e3
    memory_ms = moved / device["bandwidth"] * 1e3
    return {"gflops": flops / 1e9, "gbytes": moved / 1e9, "compute_ms": compute_ms, "memory_ms": memory_ms,
            "floor_ms": max(compute_ms, memory_ms),
            "floor_fp32_ms": max(flops / device["fp32_flops"] * 1e3, memory_ms)}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(PRESETS), default="gpt2-small")
    parser.add_argument("--max-dim", type=int, default=2048)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--measured", type=str, default=None,
                        help="a bench JSON: print the fraction of the floor each optimizer reaches")
    args = parser.parse_args(argv)
    result = floor(PRESETS[args.shapes], args.max_dim, args.every)
    print(json.dumps({k: round(v, 3) for k, v in result.items()}))
    if args.measured:
        with open(args.measured) as handle:
            measured = json.load(handle)
        for name, row in measured.get("results", measured).items():
            if isinstance(row, dict) and "mean_ms" in row:
                print(f"{name}: mean {row['mean_ms']:.2f} ms, floor / mean = {result['floor_ms'] / row['mean_ms']:.3f}")


if __name__ == "__main__":
    main()
