"""Appliers that set the *size* of another applier's direction: grafting (Agarwal et al. 2020) and RMS normalisation."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import attrs
import torch

from estimators._common import fold, fold_weights, nonzero_gradient
from precond.layout import Layout
from precond.validators import positive


def _batch_norm(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each batch entry, shaped to broadcast against ``x``."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).view(-1, *([1] * (x.ndim - 1)))


def _unit_interval(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{attribute.name} must lie in [0, 1), got {value!r}")


@attrs.frozen
class Graft:
    """Layer-wise grafting: the inner applier's direction ``U`` with the norm of a diagonal method's,
    ``U ← U · ‖U_graft‖ / (‖U‖ + 1e-16)``, per parameter (per stacked block).

    ``onto``: ``"adam"`` ``U_graft = M / (√v̂ + ε)`` with ``v ← β v + (1−β) g²`` and ``v̂ = v/(1−βᵗ)``;
    ``"rmsprop"`` the same without bias correction; ``"sgd"`` ``U_graft = M``. ``M`` is the optimizer's
    (momentum) direction. Defaults ``beta = 0.999``, ``eps = 1e-10`` are Meta's Distributed Shampoo Adam graft.
    The graft's ``v`` is its only state (``state[p]["applier"]["v"]``).
    """

    inner: Any
    onto: Literal["adam", "rmsprop", "sgd"] = attrs.field(default="adam", validator=attrs.validators.in_(("adam", "rmsprop", "sgd")))
    beta: float = attrs.field(default=0.999, validator=_unit_interval)
    eps: float = attrs.field(default=1e-10, validator=positive)

    def exponent(self, layout: Layout) -> float:
        return self.inner.exponent(layout)

    def init_state(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        state = dict(self.inner.init_state(grad, layout))
        if self.onto != "sgd":
            state["v"] = torch.zeros_like(grad)
        return state

    def direction(self, direction: torch.Tensor, bases: Sequence[Optional[torch.Tensor]],
                  spectra: Sequence[Optional[torch.Tensor]], layout: Layout, *, dense: Optional[torch.Tensor] = None,
                  grad: Optional[torch.Tensor] = None, state: Optional[dict[str, torch.Tensor]] = None,
                  step: int = 0) -> torch.Tensor:
        inner = self.inner.direction(direction, bases, spectra, layout, dense=dense, grad=grad, state=state, step=step)
        if self.onto == "sgd":
            graft = direction
        else:
            if grad is None or state is None:
                raise ValueError("Graft(onto='adam'|'rmsprop') needs the gradient and its state: use Preconditioner.precondition")
            v = state["v"]
            fold(v, grad * grad, self.beta, fold_weights(self.beta, nonzero_gradient(grad), grad.dtype))
            v_hat = v / (1.0 - self.beta ** max(step, 1)) if self.onto == "adam" else v
            graft = direction / (v_hat.sqrt() + self.eps)
        return inner * (_batch_norm(graft) / (_batch_norm(inner) + 1e-16))


@attrs.frozen
class Normalize:
    """``U ← U · rms / (RMS(U) + 1e-16)`` per parameter, applied only where the layout has a dense factor
    (ASGO's update normalisation, RMS 0.2; a parameter without one keeps the inner direction)."""

    inner: Any
    rms: float = attrs.field(default=0.2, validator=positive)

    def exponent(self, layout: Layout) -> float:
        return self.inner.exponent(layout)

    def init_state(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        return self.inner.init_state(grad, layout)

    def direction(self, direction: torch.Tensor, bases: Sequence[Optional[torch.Tensor]],
                  spectra: Sequence[Optional[torch.Tensor]], layout: Layout, **context: Any) -> torch.Tensor:
        inner = self.inner.direction(direction, bases, spectra, layout, **context)
        if not layout.dense_modes:
            return inner
        rms = _batch_norm(inner) / (inner[0].numel() ** 0.5)
        return inner * (self.rms / (rms + 1e-16))
