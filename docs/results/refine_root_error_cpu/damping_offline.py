"""Refine's rotation damping against the inverse-root error, offline on refreshes saved by ``capture_refreshes.py``:
for each saved ``(S, Q_old, Q_QR)``, the root error (``precond.bench.refine_quality.root_error``) and the off-diagonal
ratio ``r`` of QR's basis and of ``bases.Refine`` (2 sweeps) from ``Q_old`` with other dampings of the rotation
``W_ij = n_ij g_ij / (g_ij² + μ_ij²)``: ``μ_ij² = w (ρ_i² + ρ_j²)`` for ``w`` = 0.5 (the default), 0.1, 0.02, and a
damping by the pair's own coupling only, ``μ_ij² = c n_ij²``.

    OMP_NUM_THREADS=2 python docs/results/refine_root_error_cpu/damping_offline.py /tmp/cap128.pt 1
"""

from __future__ import annotations

import collections
import statistics
import sys
from typing import Callable

import torch

import bases
import bases.refine as refine_module
from precond.bench.refine_quality import root_error
from precond.drift import offdiagonal_ratio


def _rotation(damping: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable:
    def rotation(s: torch.Tensor, lam: torch.Tensor, _: str) -> torch.Tensor:
        n = s - torch.diag_embed(torch.diagonal(s, dim1=-2, dim2=-1))
        g = lam.unsqueeze(-2) - lam.unsqueeze(-1)
        denominator = g * g + damping(n, g)
        safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        return torch.where(denominator > 0, n * g / safe, torch.zeros_like(g))
    return rotation


def _residual(weight: float) -> Callable:
    def damping(n: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        rho2 = (n * n).sum(-2)
        return weight * (rho2.unsqueeze(-1) + rho2.unsqueeze(-2))
    return damping


DAMPINGS = {"w 0.5 (default)": _residual(0.5), "w 0.1": _residual(0.1), "w 0.02": _residual(0.02),
            "pair, c 4": lambda n, g: 4.0 * n * n, "pair, c 16": lambda n, g: 16.0 * n * n}


def main(path: str, every: int) -> None:
    captured = torch.load(path)[::every]
    rows: dict[int, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    original = refine_module.rotation
    try:
        for factor, old, qr in captured:
            size = factor.shape[-1]
            rows[size]["QR: root error"].append(root_error(factor, qr))
            rows[size]["QR: r"].append(offdiagonal_ratio(factor[None].double(), qr[None].double()).item())
            for name, damping in DAMPINGS.items():
                refine_module.rotation = _rotation(damping)
                new = bases.Refine(every=10).refresh(factor[None].float(), old[None].float()).basis[0]
                rows[size][f"Refine {name}: root error"].append(root_error(factor, new))
                rows[size][f"Refine {name}: r"].append(
                    offdiagonal_ratio(factor[None].double(), new[None].double()).item())
    finally:
        refine_module.rotation = original
    for size, columns in sorted(rows.items()):
        print(f"d = {size}, {len(columns['QR: r'])} refreshes")
        for name, values in columns.items():
            print(f"  {name:36s} mean {statistics.mean(values):.3f}  median {statistics.median(values):.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
