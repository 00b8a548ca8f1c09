"""``Graft``: layer-wise grafting (Agarwal et al. 2020), the inner direction with a diagonal method's norm."""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from precond.appliers._norms import batch_norm
from precond.appliers._wrapper import InnerApplier
from precond.ema import bias_correction, fold, gradient_weights
from precond.layout import Layout
from precond.parts import Applier, ApplyContext, slot
from precond.validators import number, one_of, plain_number, positive


@attrs.frozen
class Graft(InnerApplier):
    """Layer-wise grafting: the inner applier's direction ``U`` with the norm of a diagonal method's,
    ``U ← U · ‖U_graft‖ / (‖U‖ + 1e-16)``, per parameter (per stacked block).

    ``onto``: ``"adam"`` ``U_graft = M / (√v̂ + ε)`` with ``v ← β v + (1−β) g²`` and ``v̂ = v/(1−βᵗ)``;
    ``"rmsprop"`` the same without bias correction; ``"sgd"`` ``U_graft = M``. ``M`` is the optimizer's
    (momentum) direction. Defaults ``beta = 0.999``, ``eps = 1e-10`` are Meta's Distributed Shampoo Adam graft.
    The graft's ``v`` is its only state (``state[p]["applier"]["v"]``).

    ``start_preconditioning_step`` (Meta's option of that name, its Adam warm-up): at steps ``t <
    start_preconditioning_step`` the update is the graft direction ``U_graft`` alone (the inner applier is not
    called; ``v`` is still updated every step). The default 1 preconditions from the first step; Meta's default
    (``-1``) means ``T``, the refresh period, which a preset passes explicitly. Meta computes its roots at ``t =
    start_preconditioning_step`` and then every ``T`` steps; with the start a multiple of ``T`` (its default), or
    ``1`` with ``first_step="update"``, precond's refreshes give the same roots (``docs/conventions.md``).
    """

    inner: Applier = attrs.field(validator=slot(Applier))
    onto: Literal["adam", "rmsprop", "sgd"] = attrs.field(
        default="adam", validator=one_of(("adam", "rmsprop", "sgd"))
    )
    beta: float = attrs.field(default=0.999, converter=plain_number, validator=number(
        low=0, high=1, high_open=True, meaning="EMA weight of the graft's second moment v"))
    eps: float = attrs.field(default=1e-10, converter=plain_number, validator=positive)
    start_preconditioning_step: int = attrs.field(default=1, converter=plain_number, validator=number(
        low=1, integer=True, meaning="first step t that uses the inner applier; before it, the graft direction alone"))

    def init_state(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        state = dict(self.inner.init_state(grad, layout))
        if self.onto != "sgd":
            state["v"] = torch.zeros_like(grad)
        return state

    def apply(self, direction: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        graft = self._graft(direction, ctx)
        if self.start_preconditioning_step > 1:  # Meta's warm-up: the graft direction alone before the start
            if not isinstance(ctx.step, torch.Tensor):
                if ctx.step < self.start_preconditioning_step:
                    return graft
            else:  # a captured step: no host branch on the device count
                inner = self.inner.apply(direction, ctx)
                grafted = inner * (batch_norm(graft) / (batch_norm(inner) + 1e-16))
                return torch.where(ctx.step < self.start_preconditioning_step, graft, grafted)
        inner = self.inner.apply(direction, ctx)
        return inner * (batch_norm(graft) / (batch_norm(inner) + 1e-16))

    def _graft(self, direction: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        """``U_graft`` (folding the current gradient into ``v`` first)."""
        if self.onto == "sgd":
            return direction
        v = ctx.ps.applier["v"]
        fold(v, ctx.grad * ctx.grad, self.beta, gradient_weights(self.beta, ctx.grad))
        v_hat = v / bias_correction(self.beta, ctx.step) if self.onto == "adam" else v
        return direction / (v_hat.sqrt() + self.eps)
