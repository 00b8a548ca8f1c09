"""``Shampoo``: the classical Kronecker factor statistics ``S_k ← ρ S_k + (1−ρ) Gram_k(G)``."""

from __future__ import annotations

from typing import Literal, Mapping

import attrs
import torch

from estimators._common import beta_field, sum_of_squares_except
from estimators.base import Estimator
from precond.contractions import gram
from precond.ema import fold_all, gradient_weights, nonzero_gradient
from precond.layout import Layout
from precond.refresh import Refresh, rayleigh_quotients
from precond.state import ParamState
from precond.validators import one_of


@attrs.frozen
class Shampoo(Estimator):
    """Shampoo's estimator (Gupta et al. 2018; Eq. 1 of the seed paper).

    - ``Δ_k = G_(k) G_(k)ᵀ`` and ``S_k ← ρ S_k + (1−ρ) Δ_k`` (``beta`` = ρ; ``beta = 1`` sums, as the
      original AdaGrad-style Shampoo with ``H_k ← H_k + Δ_k``). A diagonal mode keeps ``diag(Δ_k)`` only.
    - Spectrum ``λ_k``: ``spectrum="refresh"`` takes it at each basis refresh, the eigenvalues from ``Eigh``
      or the Rayleigh quotients ``diag(Q_kᵀ S_k Q_k)`` from a QR step, and keeps it until the next one (the
      stale roots of Shampoo); ``"every_step"`` recomputes ``diag(Q_kᵀ S_k Q_k)`` after every update, the
      per-factor Frobenius correction of Eschenhagen et al. (2025).
    - Initial fill ``S_k = (1−ρ) Gram_k(G)`` (SOAP's), then ``λ_k`` from the first ``eigh``.
    - ``bias_correction`` (off by default; Meta's Distributed Shampoo with ``use_bias_correction=True`` and
      ``β₂ < 1``): the factors are divided by ``1−ρⁿ`` before the root, ``Ŝ_k = S_k/(1−ρⁿ)`` after ``n`` folded
      gradients (``n = t`` unless some gradient was all zero: precond skips those, so ``n`` counts the folds;
      the fill counts as one). ``Ŝ_k`` is what is stored, updated as ``Ŝ_k ← Ŝ_k + w_n (Δ_k − Ŝ_k)`` with
      ``w_n = (1−ρ)/(1−ρⁿ)``, which equals ``(ρ S_{n−1} + (1−ρ) Δ_k)/(1−ρⁿ)``; so the refreshed bases are unchanged
      (a positive scale) and every spectrum — eigenvalues, Rayleigh quotients, a diagonal mode's ``λ_k`` — is the
      corrected one. The fill stores ``Gram_k(G)``. The fold count ``n`` is the estimator's own state
      (``"count"``, one per parameter). With ``beta = 1`` (a sum) there is nothing to correct: no effect.
    Negative eigenvalue estimates (round-off) are clipped at 0; the applier's ``eps`` is the damping.
    """

    beta: float = beta_field
    spectrum: Literal["refresh", "every_step"] = attrs.field(
        default="refresh", validator=one_of(("refresh", "every_step"))
    )
    bias_correction: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    @property
    def _corrects(self) -> bool:
        return self.bias_correction and self.beta < 1.0

    def init_state(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        """The fold count ``n`` (``(B, 1)``) when bias-correcting: 1 after a nonzero fill, else 0."""
        if not self._corrects:
            return {}
        return {"count": nonzero_gradient(grad).to(grad.dtype).unsqueeze(-1)}

    def _weights(self, ps: ParamState, grad: torch.Tensor, first: bool) -> torch.Tensor:
        """``(B,)`` fold weights: ``1−ρ`` (uncorrected), or ``(1−ρ)/(1−ρⁿ)`` with ``n`` the count after this fold."""
        if not self._corrects:
            return gradient_weights(self.beta, grad)
        active = nonzero_gradient(grad).to(grad.dtype)
        if first:  # n = 1: w = 1, the fill is Gram_k(G) itself
            return active
        count = ps.estimator["count"]
        count.add_(active.unsqueeze(-1))
        n = count.squeeze(-1)
        corrected = (1.0 - self.beta) / (1.0 - torch.pow(self.beta, n.clamp_min(1.0)))
        return active * corrected

    def update(self, ps: ParamState, grad: torch.Tensor, layout: Layout, first: bool = False) -> None:
        """Fold ``grad`` (``(B, *view)``) into the factors (dense modes) or spectra (diagonal modes), in place."""
        active = self._weights(ps, grad, first)
        bases, factors = ps.Q, ps.S
        modes = [k for k, lam in enumerate(ps.lam) if lam is not None]
        fold_all([(factors[k], gram(grad, k)) if factors[k] is not None else (ps.lam[k], sum_of_squares_except(grad, k))
                  for k in modes], self.beta, active)  # every mode's fold in one op
        if self.spectrum == "every_step" and not first:  # each reads only its own mode's new factor
            for k in modes:
                if factors[k] is not None and bases[k] is not None:
                    ps.lam[k].copy_(rayleigh_quotients(factors[k], bases[k]).clamp_min(0))

    def finish_init(self, ps: ParamState, refreshes: Mapping[int, Refresh], layout: Layout) -> None:
        for k, refresh in refreshes.items():
            self.on_refresh(ps, k, refresh, layout)

    def on_refresh(self, ps: ParamState, k: int, refresh: Refresh, layout: Layout) -> None:
        ps.lam[k].copy_(refresh.spectrum(ps.S[k]).clamp_min(0))
