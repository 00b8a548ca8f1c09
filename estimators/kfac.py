"""``KFAC``: Kronecker factors from a layer's inputs and output gradients (Martens & Grosse 2015), and ``EKFAC``.

For a layer weight viewed as ``W ∈ R^{d_out × fan_in}`` (:class:`structures.LayerMatrix`), mode 0 is the output
side and mode 1 the input side; a bias ``(d_out,)`` has only the output side. Per step, from the statistics the
module hooks of a :class:`precond.kfac_capture.KFACCapture` recorded for the state's parameters (``ps.params``):

- ``S_G ← ρ S_G + (1−ρ) G_t``,  ``S_A ← ρ S_A + (1−ρ) A_t``, from ``S = I`` (identity init, kfac-pytorch)
- at each basis refresh (``bases.Eigh``, every ``T`` steps): ``Q_k, λ_k = eigh(S_k)``, negative round-off clipped

and the applier ``Power(p=1, eps=damping, eps_placement="outside")`` gives the damped K-FAC step
``Q (R ⊘ (λ_G ⊗ λ_A + damping)) Qᵀ = (S_G ⊗ S_A + damping·I)⁻¹ vec(∇W)`` with ``R = Q_Gᵀ ∇W Q_A``: the damping is
added to the *product* of the Kronecker eigenvalues (kfac-pytorch's eigen method), i.e. it is the applier's ε.

EKFAC (George et al. 2018) keeps the basis and replaces ``λ_G ⊗ λ_A`` by a running average ``V`` of the squared
gradient in that basis: :func:`EKFAC` is :class:`estimators.DenseSpectrum` over these factors with
``transport="reset"`` (``V ← λ_G ⊗ λ_A`` at every refresh, so a fresh basis starts from the K-FAC spectrum, as
Thrandis/EKFAC-pytorch). What ``V`` averages is :meth:`KFAC.rotated_moment`: per-example squared gradients
(``moment="per_example"``, the paper's and curvlinops' ``diag(Qᵀ F Q)``) or the step's gradient squared and scaled by
the loss terms ``m`` (``"batch"``, EKFAC-pytorch's cheaper running-average form).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import attrs
import torch

from estimators._common import beta_field
from estimators.base import Estimator
from estimators.dense import DenseSpectrum
from precond.ema import fold, fold_weights
from precond.layout import Layout
from precond.parts import LayerStatistics, Side, slot
from precond.refresh import Refresh
from precond.state import ParamState
from precond.validators import one_of

Moment = Literal["per_example", "batch"]


@attrs.frozen
class KFAC(Estimator):
    """K-FAC's factor estimator (module docstring for the math).

    - ``capture``: what recorded the layers' ``a`` and ``g`` (:class:`precond.parts.LayerStatistics`), a
      :class:`precond.kfac_capture.KFACCapture` (its ``reduction``/``loss_terms`` fix the scale of ``G``, its
      ``factor_every`` the factor update frequency).
    - ``beta`` — ρ, the EMA weight on the old factor (kfac-pytorch ``factor_decay = 0.95``; ``0`` keeps only the
      current step's statistics).
    - ``moment`` — what a dense spectrum over these factors (EKFAC) averages, see :meth:`rotated_moment`.

    The basis refresh (``bases.Eigh(every=T)``) is the eigendecomposition frequency; a step whose capture recorded
    nothing (between factor updates) leaves the factors as they are. Needs the layout of
    :class:`structures.LayerMatrix` and the parameters of the state (``ps.params``, set by ``precond.Optimizer``).
    """

    capture: LayerStatistics = attrs.field(validator=slot(LayerStatistics))
    beta: float = beta_field
    moment: Moment = attrs.field(default="per_example", validator=one_of(("per_example", "batch")))

    @property
    def needs_whole_parameters(self) -> bool:
        """The factors come from whole layers' inputs and output gradients (``capture``)."""
        return True

    def _sides(self, ps: ParamState, layout: Layout) -> tuple[Side, ...]:
        if not ps.params:
            raise RuntimeError("KFAC reads the statistics its capture recorded for the state's parameters, but this "
                               "state has none: run it through precond.Optimizer, or pass params= to "
                               "Preconditioner.init_state")
        role = self.capture.role(ps.params[0])
        p = ps.params[0]
        expected = (p.shape[0], p[0].numel()) if role == "weight" else (p.shape[0],)
        if tuple(layout.view_shape) != expected:
            raise ValueError(f"KFAC needs each weight viewed as (out, fan_in) = {expected} and each bias as (out,); "
                             f"got the view {layout.view_shape}: use structures.LayerMatrix")
        return ("output", "input") if role == "weight" else ("output",)

    def update(self, ps: ParamState, grad: torch.Tensor, layout: Layout, first: bool = False) -> None:
        """Fold this step's ``A_t``, ``G_t`` of every parameter of the state into ``S_k`` (dense modes) or ``λ_k``
        (diagonal modes: ``diag`` only); entries whose layer recorded nothing are left alone."""
        sides = self._sides(ps, layout)
        for k, side in enumerate(sides):
            target = ps.S[k] if ps.S[k] is not None else ps.lam[k]
            if target is None:
                continue
            dense = ps.S[k] is not None
            if first:  # identity initialisation
                if dense:
                    target.copy_(torch.eye(target.shape[-1], dtype=target.dtype, device=target.device))
                else:
                    target.fill_(1.0)
            stats = [self.capture.factor(p, side, diagonal=not dense, dtype=target.dtype) for p in ps.params]
            active = torch.tensor([s is not None for s in stats], device=target.device)
            new = torch.stack([torch.zeros_like(target[0]) if s is None else s.to(target.device) for s in stats])
            fold(target, new, self.beta, fold_weights(self.beta, active, target.dtype))
        self.capture.mark_consumed(ps.params)

    def rotated_moment(self, ps: ParamState, grad: torch.Tensor, rotated: torch.Tensor,
                       layout: Layout) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The second moment a dense spectrum (EKFAC's ``V``) folds, and the batch entries that fold it.

        ``"per_example"``: ``s Σ_n (Q_Gᵀ ∇W_n Q_A)²`` from the per-example gradients the capture's rows give
        (``diag(Qᵀ F Q)`` for the per-example Fisher ``F`` of the step's data; George et al. 2018, Eq. 8).
        ``"batch"``: ``m · R⊙R`` with ``R = Q_Gᵀ ∇W Q_A`` the step's gradient in the basis and ``m`` the loss terms
        of a mean-reduced loss (1 for a summed one): for independent examples ``E[m R²] = diag(Qᵀ F Q)``.
        """
        self._sides(ps, layout)
        dtype, device = rotated.dtype, rotated.device
        if self.moment == "batch":
            scales = [self.capture.loss_scale(p) for p in ps.params]
            factor = torch.tensor([0.0 if s is None else s for s in scales], dtype=dtype, device=device)
            active = torch.tensor([s is not None for s in scales], device=device)
            return rotated * rotated * factor.view(-1, *([1] * (rotated.ndim - 1))), active
        moments = []
        for i, p in enumerate(ps.params):
            bases = [None if q is None else q[i] for q in ps.Q]
            moments.append(self.capture.rotated_moment(p, bases, dtype=dtype))
        active = torch.tensor([m is not None for m in moments], device=device)
        stacked = torch.stack([torch.zeros_like(rotated[0]) if m is None else m.to(device) for m in moments])
        return stacked, active

    def finish_init(self, ps: ParamState, refreshes: Mapping[int, Refresh], layout: Layout) -> None:
        for k, refresh in refreshes.items():
            self.on_refresh(ps, k, refresh, layout)

    def on_refresh(self, ps: ParamState, k: int, refresh: Refresh, layout: Layout) -> None:
        ps.lam[k].copy_(refresh.spectrum(ps.S[k]).clamp_min(0))


def EKFAC(capture: LayerStatistics, beta: float = 0.95, spectrum_beta: float | None = None,
          moment: Moment = "per_example") -> DenseSpectrum:
    """Eigenvalue-corrected K-FAC (George et al. 2018): K-FAC's factors ``KFAC(capture, beta)`` and basis, with the
    Kronecker spectrum replaced by ``V ← ρ_V V + (1−ρ_V) m_t`` of the rotated second moment ``m_t``
    (:meth:`KFAC.rotated_moment`), not bias-corrected, reset to ``λ_G ⊗ λ_A`` at every basis refresh.
    ``spectrum_beta`` = ρ_V (``None``: the factors' ``beta``, as EKFAC-pytorch's single ``alpha``)."""
    return DenseSpectrum(factors=KFAC(capture, beta=beta, moment=moment),
                         beta=beta if spectrum_beta is None else spectrum_beta, bias_correction=False,
                         transport="reset")
