"""Appliers: how bases and a spectrum turn a direction into the update (the fourth part).

``Power`` applies ``⊗_k Q_k diag(λ_k + ε)^{-p} Q_kᵀ``; ``Graft`` and ``Normalize`` wrap another applier and set
the size of its direction; ``NewtonSchulz`` replaces a matrix direction by its approximate polar factor (Muon);
``Polar`` does so to another applier's direction (Muon after a preconditioner). All are re-exported as
``precond.Power``, ``precond.Graft``, ``precond.Normalize``, ``precond.NewtonSchulz``, ``precond.Polar``.
"""

from precond.appliers.graft import Graft
from precond.appliers.newton_schulz import NewtonSchulz
from precond.appliers.normalize import Normalize
from precond.appliers.polar import Polar
from precond.appliers.power import Exponent, Power

__all__ = ["Exponent", "Graft", "NewtonSchulz", "Normalize", "Polar", "Power"]
