"""``Power``: the Kronecker (or dense) spectrum raised to ``-p`` in the eigenbasis."""

from __future__ import annotations

from typing import Literal, Optional, Union

import attrs
import torch

from precond.contractions import broadcast_outer, each, rotate, scale, unrotate
from precond.ema import bias_correction
from precond.layout import Layout
from precond.parts import ApplyContext
from precond.validators import nonnegative, number, one_of, plain_number

Exponent = Union[float, Literal["1/(2N)"]]


@attrs.frozen
class Power:
    """``U = (R ⊙ ⊗_k (λ_k + ε)^{-p}) ×_k Q_kᵀ`` with ``R = M ×_k Q_k``: the dense matrix
    ``⊗_k Q_k diag(λ_k + ε)^{-p} Q_kᵀ`` applied to ``vec(M)`` (``docs/design.md``, "Appliers").

    - ``p``: root per factor. ``1/2`` is Shampoo² / KL-Shampoo / SOAP; ``"1/(2N)"`` is the original Shampoo
      (``1/4`` for a matrix, ``N`` = number of modes with a spectrum); ``0`` returns ``M`` (momentum SGD).
    - ``eps_placement``: ``"factor"`` adds ε to each ``λ_k`` (the formula above); ``"outside"`` divides by
      ``(∏_k λ_k)^p + ε`` instead, ε outside the root as in the KL-Shampoo prototype.
    Modes without a spectrum are identity (``λ = 1``, no ε). With a dense spectrum ``V̂`` (SOAP's, from the
    estimator) it replaces ``⊗_k λ_k``: ``R ⊙ (V̂ + ε)^{-p}`` or ``R / (V̂^p + ε)`` (Adam's form, ``"outside"``);
    ``"1/(2N)"`` keeps ``N`` the number of modes with a spectrum (``V̂^{-1/4}`` for a matrix, as ``(λ_1 ⊗ λ_2)^{-1/4}``;
    ``tests/test_update_reference.py``).
    - ``eps_uncorrected_beta``: ``None`` (default) adds ε to the spectrum as given. A number β says the spectrum
      is bias-corrected, ``V̂ = V/(1−βᵗ)``, and ε is to be added to the *uncorrected* ``V`` instead: ε becomes
      ``ε_t = ε/(1−βᵗ)^p`` with ``"outside"`` (``(V^p + ε)/(1−βᵗ)^p`` in the denominator) and ``ε/(1−βᵗ)`` with
      ``"factor"``. With ``p = ½``, ``"outside"`` and the optimizer's ``1/(1−β₁ᵗ)`` this is the official SOAP update
      ``η·√(1−β₂ᵗ)/(1−β₁ᵗ)·m/(√v + ε)`` (nikhilvyas/SOAP ``correct_bias``; Adam's Algorithm 1 with ε̂), where
      ``None`` gives torch's Adam form ``m̂/(√v̂ + ε)``. ``β`` must be the spectrum's (e.g. ``DenseSpectrum.beta``).
    - ``floor``: a relative floor on the spectrum of every rotated mode, before ε: ``λ_k ← max(λ_k, f·max λ_k)``,
      or ``V̂ ← max(V̂, f·max V̂)``, per parameter. ``0`` (default) keeps the spectra exact, as the references.
      ``"roundoff"`` takes ``f`` from the round-off of the statistic itself: ``f = d_k·u`` for ``λ_k`` (the backward
      error of ``eigh``; the rank tolerance of ``torch.linalg.matrix_rank`` and of Meta's ``PseudoInverseConfig``)
      and ``f = (u·Σ_k d_k)²`` for ``V̂`` (the error of an entry of ``R = G ×_k Q_k``, squared). ``u`` is the unit
      round-off of the state dtype, ``d_k`` the sizes of the modes with a basis (a diagonal spectrum is not rotated
      and not floored; ``rotation_dtype`` is an approximation asked for and does not change ``f``). Why: with a
      float32 basis a direction that no gradient touched still gets ``~u·‖G‖`` of every gradient (``Q`` is
      orthogonal only to ``~d·u``, and each rotated entry sums ``d`` products), so its ``V̂`` or ``λ_k`` is
      round-off, often exactly 0, and ``R/(√V̂ + ε)`` or ``(λ_k + ε)^{-p}`` with Meta's ``ε = 1e-12`` turns that
      round-off into update entries up to ``~1e-7·|G|/ε`` (1e5 for ``|G| = 1``). Every entry above the round-off
      is left as it is; unlike a larger ε the floor has no scale. In float64 it is ``d·2.2e-16`` of the largest
      entry and still acts on the entries that are round-off there (so a reference comparison passes ``0``).

    The two rotations use ``ctx.rotation_dtype`` operands when it is set (``precond.Optimizer(rotation_dtype=...)``);
    the scaling between them stays in the state dtype. Each basis is rounded to that dtype once per step and the
    rounded copy serves both rotations (the same numbers as rounding it in each, one cast kernel fewer per basis).
    With ``ctx.in_basis`` (``Preconditioner(momentum_in_basis=True)``) the direction arrives rotated, in the state
    dtype, and only the rotation back takes place.
    """

    p: Exponent = attrs.field(default=0.5, converter=plain_number, validator=number(
        low=0, high=1, also=("1/(2N)",), meaning="the root applied per factor"))
    eps: float = attrs.field(default=1e-8, converter=plain_number, validator=nonnegative)
    eps_placement: Literal["factor", "outside"] = attrs.field(
        default="factor", validator=one_of(("factor", "outside"))
    )
    eps_uncorrected_beta: Optional[float] = attrs.field(default=None, converter=plain_number, validator=number(
        low=0, high=1, high_open=True, optional=True,
        meaning="β of the spectrum's bias correction, ε on the uncorrected V"))
    floor: Union[float, Literal["roundoff"]] = attrs.field(default=0.0, converter=plain_number, validator=number(
        low=0, high=1, also=("roundoff",), meaning="relative floor of each rotated spectrum"))

    def exponent(self, layout: Layout) -> float:
        if self.p == "1/(2N)":
            return 1.0 / (2 * max(1, len(layout.spectral_modes)))
        return float(self.p)

    def init_state(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, direction: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        """Precondition ``direction`` (``(B, *view)``) with the bases and spectra of the pre-step state."""
        p = self.exponent(ctx.layout)
        if p == 0.0:
            return unrotate(direction, ctx.ps.Q) if ctx.in_basis else direction
        bases, spectra, dense = ctx.ps.Q, ctx.ps.broadcast_spectra(), ctx.dense  # λ_k already in broadcast shape
        eps = self._eps(ctx.step, p)
        if self.floor != 0.0:
            spectra, dense = self._floored(spectra, dense, bases)
        rotation_dtype = ctx.rotation_dtype
        if rotation_dtype is not None and not ctx.in_basis:  # each basis rounded once, for both rotations
            bases = [None if q is None else q.to(rotation_dtype) for q in bases]
        rotated = direction if ctx.in_basis else rotate(direction, bases, rotation_dtype)
        if dense is not None:
            rotated = (
                rotated * (dense + eps).pow(-p) if self.eps_placement == "factor" else rotated / (dense.pow(p) + eps)
            )
        elif self.eps_placement == "factor":
            rotated = scale(rotated, [None if lam is None else (lam + eps).pow(-p) for lam in spectra])
        elif any(lam is not None for lam in spectra):
            # λ^½ as one _foreach_sqrt over the modes: torch's pow(x, 0.5) is its sqrt kernel (CPU and CUDA), so
            # the same numbers in one op
            powers = (each(torch._foreach_sqrt, spectra) if p == 0.5
                      else [None if lam is None else lam.pow(p) for lam in spectra])
            rotated = rotated / (broadcast_outer(powers, rotated.ndim - 1) + eps)
        else:
            rotated = rotated / (1.0 + eps)
        return unrotate(rotated, bases, rotation_dtype)

    def _floored(self, spectra: list, dense: Optional[torch.Tensor],
                 bases: list) -> tuple[list, Optional[torch.Tensor]]:
        """The spectra of the rotated modes (those with a basis ``Q_k``) raised to ``floor`` times their largest
        entry, per parameter (batch entry); see the class docstring. New tensors: the state is not written."""
        sizes = [None if q is None else q.shape[-1] for q in bases]
        if all(d is None for d in sizes):
            return spectra, dense

        def raised(t: torch.Tensor, f: float) -> torch.Tensor:
            return torch.maximum(t, f * t.flatten(1).amax(1).view(-1, *[1] * (t.ndim - 1)))

        def relative(t: torch.Tensor, size: int, power: int) -> float:
            return (size * torch.finfo(t.dtype).eps) ** power if self.floor == "roundoff" else self.floor

        if dense is not None:
            return spectra, raised(dense, relative(dense, sum(d for d in sizes if d is not None), 2))
        return [lam if lam is None or d is None else raised(lam, relative(lam, d, 1))
                for lam, d in zip(spectra, sizes, strict=True)], dense

    def _eps(self, step: int, p: float) -> float:
        """ε, or ``ε_t`` on the uncorrected spectrum (``eps_uncorrected_beta``)."""
        if self.eps_uncorrected_beta is None:
            return self.eps
        correction = bias_correction(self.eps_uncorrected_beta, step)
        return self.eps / (correction if self.eps_placement == "factor" else correction**p)
