"""``Stateless``: an estimator that keeps no statistic (Muon: the direction alone decides the update)."""

from __future__ import annotations

import attrs
import torch

from estimators.base import Estimator
from precond.layout import Layout
from precond.state import ParamState


@attrs.frozen
class Stateless(Estimator):
    """No ``S_k``, no ``λ_k``, no own tensors: every gradient is ignored. With ``bases.Identity()`` and a structure
    whose modes are all ``"none"`` (``structures.Matrix``) the applier sees only the (momentum) direction, as
    Muon's Newton–Schulz step (``precond.NewtonSchulz``) needs."""

    def update(self, ps: ParamState, grad: torch.Tensor, layout: Layout, first: bool = False) -> None:
        return None
