"""``DenseSpectrum``: Adam run in the eigenbasis (SOAP), on top of any factor estimator."""

from __future__ import annotations

from typing import Any, Literal, Mapping, Optional

import attrs
import torch

from bases import Refresh
from estimators._common import Tensors, fold, fold_weights, nonzero_gradient
from estimators.base import Estimator
from estimators.shampoo import Shampoo
from precond.contractions import rotate
from precond.layout import Layout


def _beta_below_one(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{attribute.name} (β₂ of the dense second moment V) must lie in [0, 1), got {value!r}")


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
    SOAP); ``"keep"`` leaves it as is (the KL prototype's KL-SOAP, Meta's eigenvalue-corrected Shampoo).
    """

    factors: Any = attrs.field(factory=Shampoo)
    beta: float = attrs.field(default=0.95, validator=_beta_below_one)
    bias_correction: bool = True
    transport: Literal["permute", "keep"] = attrs.field(default="permute", validator=attrs.validators.in_(("permute", "keep")))

    def init_extras(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        return {"V": torch.zeros_like(grad)}

    def prepare(self, grad: torch.Tensor, bases: Tensors, extras: dict[str, torch.Tensor], layout: Layout,
                step: int) -> None:
        rotated = rotate(grad, bases)
        fold(extras["V"], rotated * rotated, self.beta, fold_weights(self.beta, nonzero_gradient(grad), grad.dtype))

    def dense_spectrum(self, extras: dict[str, torch.Tensor], step: int) -> Optional[torch.Tensor]:
        v = extras["V"]
        return v / (1.0 - self.beta ** max(step, 1)) if self.bias_correction else v

    def update(self, grad: torch.Tensor, bases: Tensors, spectra: Tensors, factors: Tensors, layout: Layout,
               first: bool = False) -> None:
        self.factors.update(grad, bases, spectra, factors, layout, first)

    def finish_init(self, spectra: Tensors, factors: Tensors, refreshes: Mapping[int, Refresh], layout: Layout) -> None:
        self.factors.finish_init(spectra, factors, refreshes, layout)

    def on_refresh(self, k: int, refresh: Refresh, spectra: Tensors, factors: Tensors, layout: Layout,
                   extras: Optional[dict[str, torch.Tensor]] = None) -> None:
        self.factors.on_refresh(k, refresh, spectra, factors, layout, extras)
        if extras is not None and self.transport == "permute" and refresh.permutation is not None:
            extras["V"].copy_(permute_mode(extras["V"], k, refresh.permutation))
