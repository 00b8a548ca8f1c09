"""``Preconditioner``: one structure, one estimator, one basis refresher and one applier, composed."""

from __future__ import annotations

import functools
from typing import Any, Literal, Optional, Sequence

import attrs
import torch

from estimators._common import empty_state
from precond.layout import Layout
from precond.stats import FallbackCounter

State = dict[str, Any]


@functools.lru_cache(maxsize=1024)
def _plan(preconditioner: "Preconditioner", shape: tuple[int, ...]) -> Layout:
    layout = preconditioner.structure.plan(shape)
    if not preconditioner.basis.needs_factors:  # Q_k = I: dense modes keep only their spectrum
        layout = layout.with_kinds(tuple("diagonal" if kind == "dense" else kind for kind in layout.kinds))
    return layout


def _keyed(tensors: Sequence[Optional[torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {str(k): t[0].contiguous() for k, t in enumerate(tensors) if t is not None}


def _unkeyed(keyed: dict[str, torch.Tensor], order: int) -> list[Optional[torch.Tensor]]:
    return [keyed[str(k)].unsqueeze(0) if str(k) in keyed else None for k in range(order)]


@attrs.frozen
class Preconditioner:
    """A Kronecker-factored preconditioner assembled from four parts.

    - ``structure`` (``structures.*``): which modes of the (viewed) weight get a dense factor;
    - ``estimator`` (``estimators.*``): how ``S_k`` and ``λ_k`` absorb each gradient;
    - ``basis`` (``bases.*``): how ``Q_k`` is refreshed every ``basis.every`` steps;
    - ``applier`` (``precond.Power``, …): how ``Q_k``, ``λ_k`` turn a direction into the update.

    ``first_step``: ``"fill"`` fills the statistics from the first gradient and does not move the weight
    (SOAP, the KL prototype); ``"update"`` fills them and preconditions that same gradient at once.

    Per step (DESIGN): the update is computed with the pre-step ``(Q_k, λ_k)``; then the estimator folds the
    gradient in; then, at refresh steps, the bases are refreshed from the new ``S_k`` and the estimator
    carries ``λ_k`` across. State is keyed by role: ``state["estimator"]["S"|"lambda"][k]``,
    ``state["basis"]["Q"][k]`` (``k`` the viewed mode, as a string).
    """

    structure: Any
    estimator: Any
    basis: Any
    applier: Any
    first_step: Literal["fill", "update"] = attrs.field(
        default="fill", validator=attrs.validators.in_(("fill", "update"))
    )

    def plan(self, shape: Sequence[int]) -> Layout:
        return _plan(self, tuple(shape))

    # --- state --------------------------------------------------------------------------------
    def init_state(self, grad: torch.Tensor, layout: Layout, counter: Optional[FallbackCounter] = None) -> State:
        """Initial state from the first gradient ``grad`` (``(1, *view)``): fill, first ``eigh``, ``λ_k`` at step 0."""
        factors, spectra = empty_state(layout, self.basis.needs_factors, grad.shape[0], grad.dtype, grad.device, 0.0)
        bases: list[Optional[torch.Tensor]] = [None] * layout.order
        self.estimator.update(grad, bases, spectra, factors, layout, first=True)
        refreshes = {}
        for k, factor in enumerate(factors):
            if factor is not None:
                refreshes[k] = self.basis.initialize(factor, counter)
                bases[k] = refreshes[k].basis
        self.estimator.finish_init(spectra, factors, refreshes, layout)
        return {
            "estimator": {"S": _keyed(factors), "lambda": _keyed(spectra)},
            "basis": {"Q": _keyed(bases)},
        }

    @staticmethod
    def parts(state: State, layout: Layout) -> tuple[list, list, list]:
        """Batched views ``(bases, spectra, factors)`` of one parameter's state (writes go to the state)."""
        return (
            _unkeyed(state["basis"]["Q"], layout.order),
            _unkeyed(state["estimator"]["lambda"], layout.order),
            _unkeyed(state["estimator"]["S"], layout.order),
        )

    # --- one step -----------------------------------------------------------------------------
    def direction(self, direction: torch.Tensor, state: State, layout: Layout) -> torch.Tensor:
        """The preconditioned update for ``direction`` (``(B, *view)``), from the pre-step state."""
        bases, spectra, _ = self.parts(state, layout)
        return self.applier.direction(direction, bases, spectra, layout)

    def update(self, grad: torch.Tensor, state: State, layout: Layout, step: int,
               counter: Optional[FallbackCounter] = None) -> None:
        """Fold ``grad`` into the statistics; refresh the bases when ``step`` is a multiple of ``T``."""
        bases, spectra, factors = self.parts(state, layout)
        self.estimator.update(grad, bases, spectra, factors, layout)
        if step % self.basis.every == 0:
            self.refresh(state, layout, counter)

    def refresh(self, state: State, layout: Layout, counter: Optional[FallbackCounter] = None) -> None:
        """Refresh every dense basis from its factor and let the estimator carry ``λ_k`` across."""
        bases, spectra, factors = self.parts(state, layout)
        for k, factor in enumerate(factors):
            if factor is None:
                continue
            result = self.basis.refresh(factor, bases[k], counter)
            self.estimator.on_refresh(k, result, spectra, factors, layout)
            bases[k].copy_(result.basis)
