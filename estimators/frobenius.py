"""``Frobenius``: eigenvalue-corrected Shampoo, factored or dense (SOAP)."""

from __future__ import annotations

from typing import Literal

from estimators.base import Estimator
from estimators.dense import DenseSpectrum
from estimators.shampoo import Shampoo


def Frobenius(beta: float = 0.95, spectrum: Literal["factored", "dense"] = "dense", bias_correction: bool = True,
              transport: Literal["permute", "keep"] = "permute") -> Estimator:  # noqa: N802 (reads as a part)
    """Eigenvalue correction of Shampoo's factors ``S_k ← ρ S_k + (1−ρ) Gram_k(G)`` (Frobenius-norm view).

    - ``spectrum="factored"``: ``λ_k = diag(Q_kᵀ S_k Q_k)`` recomputed every step in the (stale) basis — the
      per-factor correction of Eschenhagen et al. (2025) (Meta PR #263); returns ``Shampoo(spectrum="every_step")``.
    - ``spectrum="dense"``: a per-entry ``V ← ρ V + (1−ρ) R⊙R`` in the rotated basis, bias-corrected — SOAP
      (Vyas et al. 2025) and eigenvalue-corrected Shampoo; returns ``DenseSpectrum(Shampoo(ρ), ρ, …)``.
    ``beta`` = ρ is shared by the factors and ``V`` (SOAP's ``shampoo_beta = -1``).
    """
    if spectrum == "factored":
        return Shampoo(beta=beta, spectrum="every_step")
    if spectrum == "dense":
        return DenseSpectrum(
            factors=Shampoo(beta=beta), beta=beta, bias_correction=bias_correction, transport=transport
        )
    raise ValueError(f"spectrum must be 'factored' or 'dense', got {spectrum!r}")
