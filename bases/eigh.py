"""``Eigh``: exact eigendecomposition of each factor every ``T`` steps."""

from __future__ import annotations

from typing import Optional

import attrs
import torch

from bases._common import every_field, nonzero_factor
from precond.fallbacks import FallbackCounter
from precond.refresh import Refresh, rayleigh_quotients


def _eigh_or_none(matrix: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``eigh`` that reports failure (an exception, or NaN/Inf in its output) as ``None``."""
    try:
        values, vectors = torch.linalg.eigh(matrix)
    except RuntimeError:
        return None
    if not (torch.isfinite(values).all() and torch.isfinite(vectors).all()):
        return None
    return values, vectors


def descending_eigh(factor: torch.Tensor, counter: Optional[FallbackCounter] = None,
                    previous: Optional[torch.Tensor] = None) -> Refresh:
    """``Q, λ = eigh(S)`` with columns in descending eigenvalue order.

    A counted ladder on failure (an exception, or a non-finite result, which LAPACK returns for some
    rank-deficient factors): the working precision; then with a jitter ``1e-6·mean(diag S)·I``, which leaves the
    eigenvectors alone; then in float64; then keep ``previous`` (or the identity at initialisation), with the
    Rayleigh quotients as eigenvalues. A training run never crashes on, nor is poisoned by, a bad factor.
    """
    work = factor if factor.dtype in (torch.float32, torch.float64) else factor.float()
    eye = torch.eye(work.shape[-1], dtype=work.dtype, device=work.device)
    jitter = 1e-6 * torch.diagonal(work, dim1=-2, dim2=-1).mean(-1).abs().clamp_min(1e-30).view(-1, 1, 1) * eye
    result = _eigh_or_none(work)
    for rung, matrix, message in (
        ("eigh_jitter", work + jitter, "eigh failed in working precision; retried with a jitter"),
        ("eigh_float64", (work + jitter).double(), "eigh failed with a jitter too; retried in float64"),
    ):
        if result is not None:
            break
        if counter is not None:
            counter.count(rung, message)
        result = _eigh_or_none(matrix)
    if result is None:
        if counter is not None:
            counter.count("eigh_kept_old_basis", "eigh failed in float64 too; kept the previous basis")
        kept = previous if previous is not None else eye.expand_as(work).to(factor.dtype)
        return Refresh(basis=kept, eigenvalues=rayleigh_quotients(work.to(kept.dtype), kept))
    values, vectors = result
    values = values.flip(-1).to(factor.dtype)
    vectors = vectors.flip(-1).to(factor.dtype)
    if previous is not None:
        keep = ~nonzero_factor(factor)
        vectors = torch.where(keep, previous, vectors)
    return Refresh(basis=vectors, eigenvalues=values)


@attrs.frozen
class Eigh:
    """Refresh ``Q_k, λ_k ← eigh(S_k)`` (descending) every ``every`` = T steps (Shampoo; Fig. 3 left with T = 1).

    An all-zero factor keeps its previous basis (``eigh(0)`` is an arbitrary basis).
    """

    every: int = every_field
    needs_factors = True

    def initialize(self, factor: torch.Tensor, counter: Optional[FallbackCounter] = None) -> Refresh:
        return descending_eigh(factor, counter)

    def refresh(self, factor: torch.Tensor, basis: torch.Tensor, counter: Optional[FallbackCounter] = None,
                index: int = 0) -> Refresh:
        return descending_eigh(factor, counter, previous=basis)
