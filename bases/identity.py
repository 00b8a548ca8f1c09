"""``Identity``: the basis is fixed at ``Q_k = I``, which turns any estimator into its diagonal version."""

from __future__ import annotations

from typing import Optional

import attrs
import torch

from precond.fallbacks import FallbackCounter
from precond.refresh import Refresh


@attrs.frozen
class Identity:
    """``Q_k = I`` forever: dense modes become diagonal ones (only ``λ_k`` is kept, no ``S_k``, no refresh).

    With the Frobenius/Shampoo estimator this is Adafactor-like factored Adam; with a dense spectrum it
    is Adam itself (``docs/design.md``, property 5). Since no factor is kept, the preconditioner never calls
    :meth:`initialize` or :meth:`refresh`; they state the contract (``Q = I``) for direct callers.

    ``every = None``: never refreshed (:class:`precond.parts.Basis`), so no refresh is scheduled, none is spread
    over ranks in replicate mode, and owner mode's cost model counts no refresh work for it.
    """

    needs_factors = False
    every = None  # a class constant (not a field), as needs_factors: Q_k = I is never refreshed

    def initialize(self, factor: torch.Tensor, counter: Optional[FallbackCounter] = None) -> Refresh:
        eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
        return Refresh(
            basis=eye.expand_as(factor).clone(), eigenvalues=torch.diagonal(factor, dim1=-2, dim2=-1).clone()
        )

    def refresh(self, factor: torch.Tensor, basis: torch.Tensor, counter: Optional[FallbackCounter] = None,
                index: int = 0) -> Refresh:
        return self.initialize(factor, counter)
