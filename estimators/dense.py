"""``DenseSpectrum``: Adam run in the eigenbasis (SOAP), on top of any factor estimator."""

from __future__ import annotations

from typing import Literal, Mapping, Optional

import attrs
import torch

from estimators.base import Estimator
from estimators.shampoo import Shampoo
from precond.contractions import outer, rotate
from precond.ema import Step, bias_correction, fold, fold_weights, gradient_weights
from precond.layout import Layout
from precond.parts import Estimator as EstimatorProtocol
from precond.parts import Rotations, slot, update_with
from precond.refresh import Refresh
from precond.state import ParamState
from precond.validators import number, one_of, plain_number


def permute_mode(x: torch.Tensor, k: int, permutation: torch.Tensor) -> torch.Tensor:
    """``x`` (``(B, *view)``) with mode ``k`` reordered: ``new[.., i, ..] = old[.., π[i], ..]`` per batch entry."""
    shape = [permutation.shape[0]] + [1] * (x.ndim - 1)
    shape[k + 1] = permutation.shape[1]
    return torch.gather(x, k + 1, permutation.view(shape).expand_as(x))


@attrs.frozen
class DenseSpectrum(Estimator):
    """A full-size second moment in the rotated basis: ``R = G ×_k Q_k``, ``V ← β V + (1−β) R⊙R`` (SOAP, Vyas
    et al. 2025; Adam in the eigenbasis). The applier then scales ``R`` by ``V̂^{-p}`` entrywise instead of the
    Kronecker ``⊗λ_k``; ``V̂ = V / (1−βᵗ)`` with ``bias_correction`` (SOAP's ``correct_bias``).

    ``factors`` is the estimator of ``S_k`` (``Shampoo`` for SOAP; ``KL`` gives KL-SOAP, whose ``λ_k`` then only
    feed its ``Δ_k``). ``V`` sees the current gradient before the update is formed (as SOAP's ``exp_avg_sq``),
    in the current basis. At a refresh ``transport="permute"`` reorders ``V`` with a sorted basis (reference
    SOAP); ``"keep"`` leaves it as is (the KL prototype's KL-SOAP, Meta's eigenvalue-corrected Shampoo); ``"reset"``
    restarts it at the factors' Kronecker spectrum ``V ← ⊗_k λ_k`` (also after the first bases), so a fresh basis
    starts from the factored estimate (EKFAC, George et al. 2018, as Thrandis/EKFAC-pytorch); ``V`` then never
    starts from zero and ``bias_correction`` must be off.

    What ``V`` averages is ``R⊙R`` unless the factor estimator's ``rotated_moment`` hook
    (:class:`precond.parts.Estimator`; :meth:`estimators.base.Estimator.rotated_moment` returns ``None``) gives
    another second moment in the basis (K-FAC: the per-example gradients its module hooks see).
    """

    factors: EstimatorProtocol = attrs.field(factory=Shampoo, validator=slot(EstimatorProtocol))
    beta: float = attrs.field(default=0.95, converter=plain_number, validator=number(
        low=0, high=1, high_open=True, meaning="β₂ of the dense second moment V"))
    bias_correction: bool = True
    transport: Literal["permute", "keep", "reset"] = attrs.field(
        default="permute", validator=one_of(("permute", "keep", "reset")))

    @property
    def needs_whole_parameters(self) -> bool:
        """As its factors' estimator (EKFAC: K-FAC's layer captures)."""
        return self.factors.needs_whole_parameters

    def __attrs_post_init__(self) -> None:
        if self.transport == "reset" and self.bias_correction:
            raise ValueError("transport='reset' restarts V at the Kronecker spectrum ⊗λ_k instead of at zero, so V "
                             "has no start-up bias to correct: pass bias_correction=False")

    def init_state(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        return {**self.factors.init_state(grad, layout), "V": torch.zeros_like(grad)}

    def prepare(self, ps: ParamState, grad: torch.Tensor, layout: Layout, step: int,
                rotated: Optional[torch.Tensor] = None) -> None:
        """Fold ``R ⊙ R`` (or the factors' own moment) into ``V``; ``R = G ×_k Q_k``, or ``rotated`` where the step
        has formed it (``estimators.base.Estimator.prepare``)."""
        self.factors.prepare(ps, grad, layout, step)
        rotated = rotate(grad, ps.Q) if rotated is None else rotated
        custom = self.factors.rotated_moment(ps, grad, rotated, layout)
        if custom is None:
            fold(ps.estimator["V"], rotated * rotated, self.beta, gradient_weights(self.beta, grad))
        else:
            moment, active = custom
            fold(ps.estimator["V"], moment, self.beta, fold_weights(self.beta, active, grad.dtype))

    def dense_spectrum(self, ps: ParamState, step: Step) -> Optional[torch.Tensor]:
        v = ps.estimator["V"]
        return v / bias_correction(self.beta, step) if self.bias_correction else v

    def rotations(self, ps: ParamState, grad: torch.Tensor, layout: Layout) -> Rotations:
        """Its factors' estimator's (``estimators.base.Estimator.rotations``; the default where it has none)."""
        hook = getattr(self.factors, "rotations", None)
        return hook(ps, grad, layout) if hook is not None else super().rotations(ps, grad, layout)

    def update(self, ps: ParamState, grad: torch.Tensor, layout: Layout, first: bool = False,
               rotations: Optional[Rotations] = None) -> None:
        update_with(self.factors, ps, grad, layout, rotations, first)

    def tracked_diagonal(self, ps: ParamState, k: int) -> Optional[torch.Tensor]:
        return self.factors.tracked_diagonal(ps, k)

    def finish_init(self, ps: ParamState, refreshes: Mapping[int, Refresh], layout: Layout) -> None:
        self.factors.finish_init(ps, refreshes, layout)
        if self.transport == "reset":
            self._reset(ps)

    def on_refresh(self, ps: ParamState, k: int, refresh: Refresh, layout: Layout) -> None:
        self.factors.on_refresh(ps, k, refresh, layout)
        if self.transport == "permute" and refresh.permutation is not None:
            ps.estimator["V"].copy_(permute_mode(ps.estimator["V"], k, refresh.permutation))
        elif self.transport == "reset":
            self._reset(ps)

    @staticmethod
    def _reset(ps: ParamState) -> None:
        """``V ← ⊗_k λ_k`` (modes without a spectrum count 1)."""
        v = ps.estimator["V"]
        if any(lam is not None for lam in ps.lam):
            v.copy_(outer(ps.lam, v.shape))
        else:
            v.fill_(1.0)
