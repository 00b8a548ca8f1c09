"""``QRPowerStep``: one warm-started subspace-iteration step ``Q ← qr(S Q).Q`` every ``T`` steps (SOAP)."""

from __future__ import annotations

from typing import Optional

import attrs
import torch

from bases._common import every_field, nonzero_factor
from bases.eigh import descending_eigh
from precond.fallbacks import FallbackCounter
from precond.precision import full_precision
from precond.refresh import Refresh, rayleigh_quotients


def sign_fixed_qr(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal ``Q`` of ``qr(matrix)`` with ``diag(R) ≥ 0``, so the basis cannot flip sign between refreshes."""
    q, r = torch.linalg.qr(matrix)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


def power_step(factor: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``qr(S Q).Q`` with ``S Q`` in full float32 (or float64) precision; an all-zero ``S`` keeps ``Q``."""
    work_dtype = torch.float64 if factor.dtype == torch.float64 else torch.float32
    with full_precision():
        product = factor.to(work_dtype) @ basis.to(work_dtype)
    new = sign_fixed_qr(product).to(basis.dtype)
    return torch.where(nonzero_factor(factor), new, basis)


@attrs.frozen
class QRPowerStep:
    """``Q_k ← qr(S_k Q_k).Q`` every ``every`` = T steps (Fig. 3 right; SOAP's refresh), in float32 or better.

    ``sort``: first order the old columns by their Rayleigh quotients ``diag(Q_kᵀ S_k Q_k)``, descending, as
    reference SOAP does; the permutation is returned so per-column state moves with its column. The KL
    prototype does not sort (default). The very first basis comes from ``eigh`` (no warm start exists yet).
    """

    every: int = every_field
    sort: bool = False
    needs_factors = True

    def initialize(self, factor: torch.Tensor, counter: Optional[FallbackCounter] = None) -> Refresh:
        return descending_eigh(factor, counter)

    def refresh(self, factor: torch.Tensor, basis: torch.Tensor, counter: Optional[FallbackCounter] = None,
                index: int = 0) -> Refresh:
        permutation = None
        if self.sort:
            permutation = torch.argsort(rayleigh_quotients(factor, basis), dim=-1, descending=True)
            basis = torch.gather(basis, -1, permutation.unsqueeze(-2).expand_as(basis))
        return Refresh(basis=power_step(factor, basis), permutation=permutation)
