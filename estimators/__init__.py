"""Estimators: how the factor statistics ``S_k`` and the spectrum ``λ_k`` are updated from a gradient.

See :class:`estimators.base.Estimator` for the protocol the preconditioner calls.
"""

from estimators.base import Estimator
from estimators.dense import DenseSpectrum
from estimators.frobenius import Frobenius
from estimators.kfac import EKFAC, KFAC
from estimators.kl import KL
from estimators.shampoo import Shampoo
from estimators.stateless import Stateless

__all__ = ["DenseSpectrum", "EKFAC", "Estimator", "Frobenius", "KFAC", "KL", "Shampoo", "Stateless"]

from precond.safe_globals import allow_package  # after the classes: weights_only loads may rebuild them

allow_package(__name__)
