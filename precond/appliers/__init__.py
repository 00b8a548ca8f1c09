"""Appliers: how bases and a spectrum turn a direction into the update (the fourth part).

``Power`` applies ``⊗_k Q_k diag(λ_k + ε)^{-p} Q_kᵀ``; ``Graft`` and ``Normalize`` wrap another applier and set
the size of its direction. All are re-exported as ``precond.Power``, ``precond.Graft``, ``precond.Normalize``.
"""

from precond.appliers.graft import Graft
from precond.appliers.normalize import Normalize
from precond.appliers.power import Exponent, Power

__all__ = ["Exponent", "Graft", "Normalize", "Power"]
