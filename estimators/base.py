"""The estimator base class: no-op defaults for the optional hooks of :class:`precond.parts.Estimator`."""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from precond.contractions import rotate
from precond.layout import Layout
from precond.parts import Rotations
from precond.refresh import Refresh
from precond.state import ParamState


class Estimator:
    """Base of the estimators; the call order is :class:`precond.parts.Estimator`'s. ``update`` is required."""

    @property
    def needs_whole_parameters(self) -> bool:
        """Whether the statistics come from something other than the parameter's gradient that only knows whole
        parameters (K-FAC's layer captures): then a structure may not cut the parameter into blocks."""
        return False

    def init_state(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        return {}

    def prepare(self, ps: ParamState, grad: torch.Tensor, layout: Layout, step: int,
                rotated: Optional[torch.Tensor] = None) -> None:
        """Statistics the step's direction must already see (none here). ``rotated``: ``G ×_k Q_k`` when the step
        has formed it already (``Preconditioner(momentum_in_basis=True)``, which passes it to an estimator with a
        ``rotations`` hook), for an estimator that would rotate the gradient itself (``DenseSpectrum``'s ``V``)."""
        return None

    def dense_spectrum(self, ps: ParamState, step: int) -> Optional[torch.Tensor]:
        return None

    def rotated_moment(self, ps: ParamState, grad: torch.Tensor, rotated: torch.Tensor,
                       layout: Layout) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """For a dense spectrum over these factors (:class:`estimators.DenseSpectrum`): the second moment it folds
        in the basis and the ``(B,)`` mask of entries that fold it; ``None`` means ``R⊙R`` of the gradient's
        rotation ``rotated``, for entries with a nonzero gradient (K-FAC's hooks give per-example moments)."""
        return None

    def tracked_diagonal(self, ps: ParamState, k: int) -> Optional[torch.Tensor]:
        """``diag(Q_kᵀ S_k Q_k)`` if the estimator keeps it current (``KL(track_drift=True)``), else ``None``."""
        return None

    def update(self, ps: ParamState, grad: torch.Tensor, layout: Layout, first: bool = False) -> None:
        raise NotImplementedError

    def rotations(self, ps: ParamState, grad: torch.Tensor, layout: Layout) -> Rotations:
        """The gradient rotated into the current bases (optional hook, read by ``Preconditioner`` with
        ``momentum_in_basis=True`` before a step's fold): ``R = G ×_j Q_j`` and no partial rotation. An estimator
        whose fold forms ``R`` from partial rotations returns them too and takes them back in ``update``."""
        return Rotations(rotate(grad, ps.Q), {})

    def finish_init(self, ps: ParamState, refreshes: Mapping[int, Refresh], layout: Layout) -> None:
        return None

    def on_refresh(self, ps: ParamState, k: int, refresh: Refresh, layout: Layout) -> None:
        return None
