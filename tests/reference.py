"""Independent dense float64 references: unfoldings, Kronecker products and the KL objective (Eq. 2).

Nothing here imports the library; every function is written from the math in docs/design.md and the paper.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch

F64 = torch.float64


def unfold(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mode-k unfolding ``X_(k)`` (row-major order of the remaining modes)."""
    return torch.movedim(x, k, 0).reshape(x.shape[k], -1)


def kron_all(mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """``A_1 ⊗ A_2 ⊗ …`` (acts on the row-major ``vec`` of a tensor)."""
    return functools.reduce(torch.kron, [m.contiguous() for m in mats])


def random_orthogonal(d: int, gen: torch.Generator, dtype=F64) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def random_spd(d: int, gen: torch.Generator, dtype=F64) -> torch.Tensor:
    a = torch.randn(d, 2 * d, generator=gen, dtype=F64)
    return (a @ a.T / (2 * d) + 0.1 * torch.eye(d, dtype=F64)).to(dtype)


def mode_matrix(kind: str, q: Optional[torch.Tensor], values: Optional[torch.Tensor], d: int) -> torch.Tensor:
    """``Q diag(values) Qᵀ`` for a dense mode, ``diag(values)`` for a diagonal one, ``I`` otherwise."""
    if kind == "none":
        return torch.eye(d, dtype=F64)
    if kind == "diagonal" or q is None:
        return torch.diag(values.to(F64))
    q = q.to(F64)
    return q @ torch.diag(values.to(F64)) @ q.T


def kl_objective(sigma: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. 2 without constants: ``½ (log det S + tr(Σ S⁻¹))`` with ``S = ⊗_k S_k`` (dense, float64)."""
    s = kron_all([f.to(F64) for f in factors])
    return 0.5 * (torch.logdet(s) + torch.trace(sigma @ torch.linalg.inv(s)))


def second_moment(samples: torch.Tensor) -> torch.Tensor:
    """``E[g gᵀ]`` over the leading sample axis, with ``g = vec(G)``."""
    flat = samples.reshape(samples.shape[0], -1).to(F64)
    return flat.T @ flat / samples.shape[0]


def reference_scale(rule: str, rows: int, cols: int) -> float:
    """torch.optim.Muon's ``_adjust_lr`` ratios (its docstring): Keller Jordan's and Moonshot's."""
    return {
        "none": 1.0,
        "original": math.sqrt(max(1.0, rows / cols)),
        "match_rms_adamw": 0.2 * math.sqrt(max(rows, cols)),
    }[rule]
