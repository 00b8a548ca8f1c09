"""``QRPowerStep``: a warm-started subspace-iteration step ``Q ← qr(S^k Q).Q`` every ``T`` steps (SOAP: ``k = 1``)."""

from __future__ import annotations

from typing import Optional

import attrs
import torch

from bases._common import every_field, nonzero_factor
from bases.eigh import descending_eigh
from precond.fallbacks import FallbackCounter
from precond.precision import full_precision
from precond.reductions import max_abs
from precond.refresh import Refresh, rayleigh_quotients
from precond.validators import number, plain_number


def sign_fixed_qr(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal ``Q`` of ``qr(matrix)`` with ``diag(R) ≥ 0``, so the basis cannot flip sign between refreshes."""
    q, r = torch.linalg.qr(matrix)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


def power_step(factor: torch.Tensor, basis: torch.Tensor, power: int = 1) -> torch.Tensor:
    """``qr(S^k Q).Q`` (``k = power``) with the products in full float32 (or float64) precision; an all-zero ``S``
    keeps ``Q``. Each product after the first multiplies ``S`` into the previous one scaled to a largest entry of 1
    (per batch entry): the QR's ``Q`` does not depend on a column scale, and ``S^k`` of a small or large factor
    would under- or overflow."""
    work_dtype = torch.float64 if factor.dtype == torch.float64 else torch.float32
    s = factor.to(work_dtype)
    with full_precision():
        product = s @ basis.to(work_dtype)
        for _ in range(power - 1):
            scale = max_abs(product, (-2, -1), keepdim=True)
            product = s @ (product / torch.where(scale > 0, scale, torch.ones_like(scale)))
    new = sign_fixed_qr(product).to(basis.dtype)
    return torch.where(nonzero_factor(factor), new, basis)


@attrs.frozen
class QRPowerStep:
    """``Q_k ← qr(S_k^p Q_k).Q`` every ``every`` = T steps (Fig. 3 right and SOAP's refresh: ``p = 1``), in float32
    or better.

    ``sort``: first order the old columns by their Rayleigh quotients ``diag(Q_kᵀ S_k Q_k)``, descending, as
    reference SOAP does; the permutation is returned so per-column state moves with its column. The KL
    prototype does not sort (default). The very first basis comes from ``eigh`` (no warm start exists yet).

    ``power`` = p: the products of ``S_k`` before the one QR. In exact arithmetic ``qr(S^p Q)`` is ``p`` steps of
    orthogonal iteration (Golub & Van Loan, *Matrix Computations*, §8.2.4: the leading ``j`` columns of ``qr(S^p Q)``
    span ``S^p`` of the leading ``j`` columns of ``Q``, as after ``p`` single steps), so each refresh removes the
    off-diagonal energy of ``p`` steps for ``p`` products (``d³`` each, in full float32: a GPU runs them at its full
    float32 throughput) and one QR (the latency-bound part on a GPU). One step leaves much of it: on a 2 × 128
    byte-level GPT at τ = 0.2 a refresh took the relative off-diagonal norm ``r`` (``precond.drift``) from 0.36 to
    0.16, and from 0.40 to 0.21 for the 384-wide modes, which ``drift_tolerance`` then refreshes again at their next
    check; ``p = 2`` took them to 0.09 and 0.13, as two steps do (``python -m precond.bench.refresh_drift``). In
    float32 a direction whose eigenvalue is below ``ε^{1/p}`` of the largest (ε the unit round-off) is lost to
    rounding in ``S^p Q``: the QR still returns an orthonormal ``Q``, but its trailing columns then only span the
    rest, without the convergence ``p`` separate steps (a QR after each product) would give them: keep ``p`` small (2
    or 3).
    """

    every: int = every_field
    sort: bool = False
    power: int = attrs.field(default=1, converter=plain_number,
                             validator=number(low=1, integer=True, meaning="the products of S before each QR"))
    needs_factors = True

    def initialize(self, factor: torch.Tensor, counter: Optional[FallbackCounter] = None) -> Refresh:
        return descending_eigh(factor, counter)

    def refresh(self, factor: torch.Tensor, basis: torch.Tensor, counter: Optional[FallbackCounter] = None,
                index: int = 0) -> Refresh:
        permutation = None
        if self.sort:
            permutation = torch.argsort(rayleigh_quotients(factor, basis), dim=-1, descending=True)
            basis = torch.gather(basis, -1, permutation.unsqueeze(-2).expand_as(basis))
        return Refresh(basis=power_step(factor, basis, self.power), permutation=permutation)
