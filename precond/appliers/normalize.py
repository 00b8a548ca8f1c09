"""``Normalize``: the inner direction rescaled to a fixed RMS (ASGO's update normalisation)."""

from __future__ import annotations

import attrs
import torch

from precond.appliers._norms import batch_norm
from precond.layout import Layout
from precond.parts import Applier, ApplyContext, slot
from precond.validators import positive


@attrs.frozen
class Normalize:
    """``U ← U · rms / (RMS(U) + 1e-16)`` per parameter, applied only where the layout has a dense factor
    (ASGO's update normalisation, RMS 0.2; a parameter without one keeps the inner direction)."""

    inner: Applier = attrs.field(validator=slot(Applier))
    rms: float = attrs.field(default=0.2, validator=positive)

    def exponent(self, layout: Layout) -> float:
        return self.inner.exponent(layout)

    def init_state(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        return self.inner.init_state(grad, layout)

    def apply(self, direction: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        inner = self.inner.apply(direction, ctx)
        if not ctx.layout.dense_modes:
            return inner
        rms = batch_norm(inner) / (inner[0].numel() ** 0.5)
        return inner * (self.rms / (rms + 1e-16))
