"""A cheaper refresh that refreshes only the leading columns, against the inverse-root error, offline on refreshes
saved by ``capture_refreshes.py``: for each saved ``(S, Q_old)`` the root error
(``precond.bench.refine_quality.root_error``) of

- the old basis (no refresh), and what the QR power step installs, ``qr(S Q_old)``;
- ``top f``: the QR power step on the leading ``k = f·d`` columns only, ``Q_k = qr(S Q_old[:, :k])``. The other
  ``d − k`` old columns are projected off ``Q_k`` (twice) and orthonormalised symmetrically (Löwdin,
  ``X (XᵀX)^{-1/2}``: the orthonormal set nearest the projected columns, which a Newton–Schulz iteration would give
  on tensor cores). The QR then works on a ``d × k`` panel, and the rest is products.

    OMP_NUM_THREADS=1 python docs/results/refine_root_error_cpu/topk_offline.py /tmp/cap128.pt

The columns of the captured bases are in descending order of their Rayleigh quotients (the first basis comes from
a descending ``eigh``, and the QR power step keeps the order), so "leading" means the largest eigenvalues.
Prints, per mode size ``d ≥ 256``, the mean/median root error of each.
"""

from __future__ import annotations

import collections
import statistics
import sys

import torch

from bases.qr_power_step import power_step
from precond.bench.refine_quality import root_error


def lowdin(x: torch.Tensor) -> torch.Tensor:
    """``X (XᵀX)^{-1/2}`` (the Gram's root from a float64 ``eigh``)."""
    w, v = torch.linalg.eigh((x.mT @ x).double())
    return (x.double() @ (v * w.rsqrt()) @ v.mT).to(x.dtype)


def top_refresh(factor: torch.Tensor, basis: torch.Tensor, k: int) -> torch.Tensor:
    """``[qr(S Q[:, :k]), lowdin(project(Q[:, k:]))]`` (module docstring); QR's column signs made positive."""
    q, r = torch.linalg.qr(factor @ basis[:, :k])
    signs = torch.sign(torch.diagonal(r))
    q = q * torch.where(signs == 0, torch.ones_like(signs), signs)
    rest = basis[:, k:]
    for _ in range(2):
        rest = rest - q @ (q.mT @ rest)
    return torch.cat([q, lowdin(rest)], dim=1)


def main(path: str, fractions: tuple[float, ...] = (0.125, 0.25, 0.5)) -> None:
    rows: dict[int, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for factor, old, _ in torch.load(path):
        d = factor.shape[-1]
        if d < 256:
            continue
        s, q = factor.float(), old.float()
        rows[d]["old basis"].append(root_error(factor, q))
        rows[d]["QR"].append(root_error(factor, power_step(s[None], q[None], power=1)[0]))
        for f in fractions:
            rows[d][f"top {f}"].append(root_error(factor, top_refresh(s, q, int(d * f))))
    for d, columns in sorted(rows.items()):
        cells = "  ".join(f"{name}: {statistics.mean(v):.3f}/{statistics.median(v):.3f}" for name, v in columns.items())
        print(f"d = {d} ({len(columns['QR'])} refreshes, mean/median)  {cells}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
