"""Named optimizers, each a few lines of composition of the four parts."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import bases
import estimators
import structures
from precond.appliers import Exponent, Power
from precond.optimizer import Optimizer
from precond.preconditioner import Preconditioner


def kl_shampoo(params: Iterable[Any], lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.95),
               weight_decay: float = 0.0, eps: float = 1e-8, every: int = 10, max_dim: Optional[int] = 4096,
               **optimizer_options: Any) -> Optimizer:
    """KL-Shampoo (Lin et al. 2025, Fig. 3 right), without grafting, for weights of any order.

    ``NMode`` factors (modes above ``max_dim`` stay identity) · ``KL(β₂)`` factors and λ-EMA in the stale basis ·
    ``eigh`` once, then ``QRPowerStep`` every ``every`` = T steps (no sort) · ``Power(½)`` with ε outside the root.
    Defaults of the authors' prototype: λ₀ = 0.1, the λ clamp ``max(10, min(d_k, 4000))``, first step fills the
    statistics only, decoupled weight decay after the update; T = 10.
    """
    return Optimizer(
        params, lr=lr, momentum=betas[0], weight_decay=weight_decay,
        preconditioner=Preconditioner(
            structure=structures.NMode(max_dim=max_dim),
            estimator=estimators.KL(beta=betas[1]),
            basis=bases.QRPowerStep(every=every),
            applier=Power(p=0.5, eps=eps, eps_placement="outside"),
        ),
        **{"decay_order": "after", **optimizer_options},
    )


def shampoo(params: Iterable[Any], lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.95),
            weight_decay: float = 0.0, eps: float = 1e-8, every: int = 10, max_dim: Optional[int] = 4096,
            p: Exponent = 0.5, **optimizer_options: Any) -> Optimizer:
    """Shampoo (Gupta et al. 2018; Shi et al. 2023's EMA form), ungrafted.

    ``NMode`` factors · ``Shampoo(β₂)`` grams · ``Eigh`` every ``every`` = T steps (stale roots in between) ·
    ``Power(p)`` with ε added to each eigenvalue. ``p = 1/2`` (default) is Shampoo²; ``p = "1/(2N)"`` (1/4 for
    a matrix) is the original Shampoo.
    """
    return Optimizer(
        params, lr=lr, momentum=betas[0], weight_decay=weight_decay,
        preconditioner=Preconditioner(
            structure=structures.NMode(max_dim=max_dim),
            estimator=estimators.Shampoo(beta=betas[1]),
            basis=bases.Eigh(every=every),
            applier=Power(p=p, eps=eps),
        ),
        **optimizer_options,
    )
