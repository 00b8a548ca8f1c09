"""Estimators: how the factor statistics ``S_k`` and the spectrum ``λ_k`` are updated from a gradient.

Every estimator is a frozen attrs class with ``update(grad, bases, spectra, factors, layout, first)``,
``finish_init(...)`` (``λ_k`` at step 0) and ``on_refresh(k, refresh, ...)`` (carry ``λ_k`` into a new basis).
"""

from estimators.kl import KL
from estimators.shampoo import Shampoo

__all__ = ["KL", "Shampoo"]
