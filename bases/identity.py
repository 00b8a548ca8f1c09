"""``Identity``: the basis is fixed at ``Q_k = I``, which turns any estimator into its diagonal version."""

from __future__ import annotations

import attrs

from bases._common import every_field


@attrs.frozen
class Identity:
    """``Q_k = I`` forever: dense modes become diagonal ones (only ``λ_k`` is kept, no ``S_k``, no refresh).

    With the Frobenius/Shampoo estimator this is Adafactor-like factored Adam; with a dense spectrum it
    is Adam itself (DESIGN property 5).
    """

    every: int = every_field
    needs_factors = False
