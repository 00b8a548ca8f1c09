"""``Normalize``: the inner direction rescaled to a fixed RMS (ASGO's update normalisation, SOAP's and the KL
prototype's ``normalize_grads``)."""

from __future__ import annotations

from typing import Literal, Optional

import attrs
import torch

from precond.appliers._norms import batch_norm
from precond.appliers._wrapper import InnerApplier
from precond.ema import bias_correction
from precond.parts import Applier, ApplyContext, slot
from precond.validators import number, one_of, plain_number, positive


def _betas(instance, attribute, value) -> None:
    if value is None:
        return
    if not (isinstance(value, tuple) and len(value) == 2):
        raise ValueError(f"{attribute.name} must be None or a pair (β₁, β₂), e.g. (0.95, 0.95), got {value!r}")
    for name, beta in zip(("β₁", "β₂"), value, strict=True):
        number(low=0, high=1, high_open=True, meaning=f"{name} of the bias corrections to keep")(
            instance, attribute, beta
        )


@attrs.frozen
class Normalize(InnerApplier):
    """``U ← U · rms / (RMS(U) + 1e-16)`` per parameter (ASGO's update normalisation, RMS 0.2).

    - ``where``: ``"dense"`` (default) normalises only where the layout has a dense factor (a parameter without one
      keeps the inner direction, ASGO); ``"all"`` normalises every parameter (SOAP's ``normalize_grads`` also
      normalises the plain-Adam vectors).
    - ``keep_bias_correction``: ``None`` (default) or ``(β₁, β₂)``. The normalisation cancels any positive scalar in
      the inner direction, including the optimizer's ``1/(1−β₁ᵗ)`` and a spectrum's ``(1−β₂ᵗ)^{-1/2}``. SOAP
      (``normalize_grads`` with ``correct_bias``) puts them back on its step size, ``η·√(1−β₂ᵗ)/(1−β₁ᵗ)``; with
      ``(β₁, β₂)`` the normalised direction is multiplied by ``√(1−β₂ᵗ)/(1−β₁ᵗ)`` to match (SOAP's formula; the KL
      prototype, without bias correction, needs ``None``).
    """

    inner: Applier = attrs.field(validator=slot(Applier))
    rms: float = attrs.field(default=0.2, converter=plain_number, validator=positive)
    where: Literal["dense", "all"] = attrs.field(default="dense", validator=one_of(("dense", "all")))
    keep_bias_correction: Optional[tuple[float, float]] = attrs.field(
        default=None, converter=lambda v: tuple(map(plain_number, v)) if isinstance(v, (list, tuple)) else v,
        validator=_betas)

    def apply(self, direction: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        inner = self.inner.apply(direction, ctx)
        if self.where == "dense" and not ctx.layout.dense_modes:
            return inner
        rms = batch_norm(inner) / (inner[0].numel() ** 0.5)
        target = self.rms
        if self.keep_bias_correction is not None:
            beta1, beta2 = self.keep_bias_correction
            target = target * bias_correction(beta2, ctx.step) ** 0.5 / bias_correction(beta1, ctx.step)
        return inner * (target / (rms + 1e-16))
