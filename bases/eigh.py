"""``Eigh``: exact eigendecomposition of each factor every ``T`` steps."""

from __future__ import annotations

from typing import Optional

import attrs
import torch

from bases._common import Refresh, every_field, nonzero_factor
from precond.stats import FallbackCounter


def descending_eigh(factor: torch.Tensor, counter: Optional[FallbackCounter] = None,
                    previous: Optional[torch.Tensor] = None) -> Refresh:
    """``Q, λ = eigh(S)`` with columns in descending eigenvalue order.

    Ladder on failure (each rung counted): the working precision, then float64, then keep ``previous``
    (with its Rayleigh quotients as eigenvalues), so a training run never crashes on a bad factor.
    """
    work = factor if factor.dtype in (torch.float32, torch.float64) else factor.float()
    try:
        values, vectors = torch.linalg.eigh(work)
    except RuntimeError:
        if counter is not None:
            counter.count("eigh_float64", "eigh failed in working precision; retried in float64")
        try:
            values, vectors = torch.linalg.eigh(work.double())
        except RuntimeError:
            if previous is None:
                raise
            if counter is not None:
                counter.count("eigh_kept_old_basis", "eigh failed in float64 too; kept the previous basis")
            rayleigh = torch.einsum("bij,bik,bkj->bj", previous, work.to(previous.dtype), previous)
            return Refresh(basis=previous, eigenvalues=rayleigh)
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
