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
    return {str(k): t.contiguous() for k, t in enumerate(tensors) if t is not None}


def _unkeyed(keyed: dict[str, torch.Tensor], order: int) -> list[Optional[torch.Tensor]]:
    return [keyed.get(str(k)) for k in range(order)]


def _keyed_extras(extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.contiguous() for name, t in extras.items()}


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
    ``state["basis"]["Q"][k]`` (``k`` the viewed mode, as a string). Every tensor here has a leading batch axis
    ``B``: parameters of one layout are stacked and processed together (the optimizer hands each parameter a
    view of its slice).
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
        extras = self.estimator.init_extras(grad, layout)
        return {
            "estimator": {"S": _keyed(factors), "lambda": _keyed(spectra), **_keyed_extras(extras)},
            "basis": {"Q": _keyed(bases)},
            "applier": _keyed_extras(self.applier.init_state(grad, layout)),
        }

    @staticmethod
    def parts(state: State, layout: Layout) -> tuple[list, list, list]:
        """``(bases, spectra, factors)`` lists of a (batched) state, one entry per viewed mode (``None`` if absent)."""
        return (
            _unkeyed(state["basis"]["Q"], layout.order),
            _unkeyed(state["estimator"]["lambda"], layout.order),
            _unkeyed(state["estimator"]["S"], layout.order),
        )

    @staticmethod
    def extras(state: State, part: str = "estimator") -> dict[str, torch.Tensor]:
        """A part's tensors beyond ``S``/``lambda`` (e.g. the dense ``V``, a graft's ``v``)."""
        return {k: v for k, v in state.get(part, {}).items() if isinstance(v, torch.Tensor)}

    # --- one step -----------------------------------------------------------------------------
    def precondition(self, grad: torch.Tensor, direction: torch.Tensor, state: State, layout: Layout, step: int,
                     counter: Optional[FallbackCounter] = None, fold: bool = True,
                     refresh: bool = True) -> torch.Tensor:
        """One step for one (batched) parameter: the update for ``direction`` from the pre-step bases and spectra,
        then ``grad`` folded into the statistics (unless ``fold`` is False: the first step of
        ``first_step="update"``, whose gradient the initial fill already holds) and the refresh if due
        (``refresh=False`` leaves refreshing to the caller, e.g. the optimizer's staggered schedule)."""
        bases, spectra, _ = self.parts(state, layout)
        extras = self.extras(state)
        self.estimator.prepare(grad, bases, extras, layout, step)
        update = self.applier.direction(
            direction, bases, spectra, layout, dense=self.estimator.dense_spectrum(extras, step),
            grad=grad, state=self.extras(state, "applier"), step=step)
        if fold:
            self.update(grad, state, layout, step, counter, refresh=refresh)
        return update

    def direction(self, direction: torch.Tensor, state: State, layout: Layout) -> torch.Tensor:
        """The preconditioned ``direction`` (``(B, *view)``) from the current bases and ``λ_k`` (no state change;
        appliers with state of their own, such as grafting, need :meth:`precondition`)."""
        bases, spectra, _ = self.parts(state, layout)
        return self.applier.direction(direction, bases, spectra, layout)

    def update(self, grad: torch.Tensor, state: State, layout: Layout, step: int,
               counter: Optional[FallbackCounter] = None, refresh: bool = True) -> None:
        """Fold ``grad`` into the statistics; refresh the bases when ``step`` is a multiple of ``T``."""
        bases, spectra, factors = self.parts(state, layout)
        self.estimator.update(grad, bases, spectra, factors, layout)
        if refresh and step % self.basis.every == 0:
            self.refresh(state, layout, counter, index=step // self.basis.every - 1)

    def refreshable_modes(self, layout: Layout) -> list[int]:
        """Modes whose basis a refresher updates (dense, with a stored factor)."""
        return list(layout.dense_modes) if self.basis.needs_factors else []

    def compute_refresh(self, state: State, layout: Layout, k: int, counter: Optional[FallbackCounter] = None,
                        index: int = 0):
        """The ``index``-th (0-based) new basis of mode ``k`` from its factor (no state is written)."""
        return self.basis.refresh(state["estimator"]["S"][str(k)], state["basis"]["Q"][str(k)], counter, index=index)

    def apply_refresh(self, state: State, layout: Layout, k: int, result) -> None:
        """Install a refresh of mode ``k``: the estimator carries its per-column state across, then ``Q_k`` moves."""
        bases, spectra, factors = self.parts(state, layout)
        self.estimator.on_refresh(k, result, spectra, factors, layout, self.extras(state))
        bases[k].copy_(result.basis)

    def refresh(self, state: State, layout: Layout, counter: Optional[FallbackCounter] = None, index: int = 0) -> None:
        """Refresh every dense basis from its factor and let the estimator carry its state across."""
        for k in self.refreshable_modes(layout):
            self.apply_refresh(state, layout, k, self.compute_refresh(state, layout, k, counter, index))
