"""The four part protocols a :class:`precond.Preconditioner` is assembled from (``docs/design.md``, "Parts").

Every hook takes the typed state view :class:`precond.state.ParamState` first, then the gradient or direction,
then the layout, then what else it needs. Tensors carry a leading batch axis ``B`` (parameters of one layout are
stacked). A part never imports another part; what two parts share (``Refresh``, the EMA ``fold``) is in the
kernel (``precond.refresh``, ``precond.ema``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

import attrs
import torch

from precond.ema import Step
from precond.fallbacks import FallbackCounter
from precond.layout import Layout
from precond.refresh import Refresh
from precond.state import ParamState


@runtime_checkable
class Structure(Protocol):
    """Which modes of the (viewed) weight get a dense factor: ``plan(shape) -> Layout``. A structure may also cut a
    weight into blocks preconditioned separately: an optional ``blocks(shape) -> Optional[precond.blocking.Blocks]``
    (None: ``plan`` covers the weight whole), as ``NMode(large="block")``."""

    def plan(self, shape: Sequence[int]) -> Layout: ...


@runtime_checkable
class Estimator(Protocol):
    """How ``S_k`` and ``λ_k`` (and the estimator's own tensors) absorb each gradient; called in this order:

    1. ``update(ps, grad, layout, first=True)`` once, the initial fill; then ``finish_init(ps, refreshes, layout)``
       after the first bases; then ``init_state(grad, layout)``: the estimator's own tensors (e.g. a dense second
       moment ``V``, zero at first);
    2. each step: ``prepare(ps, grad, layout, step)`` (statistics the current direction must already see, SOAP's
       ``V``), the applier, ``update(ps, grad, layout)`` (pre-step bases and spectra, Jacobi), and at refresh steps
       ``on_refresh(ps, k, refresh, layout)``;
    3. ``dense_spectrum(ps, step)``: a full-size spectrum for the applier, or ``None`` (Kronecker ``λ_k``).
    """

    def init_state(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]: ...

    def update(self, ps: ParamState, grad: torch.Tensor, layout: Layout, first: bool = False) -> None: ...

    def finish_init(self, ps: ParamState, refreshes: Mapping[int, Refresh], layout: Layout) -> None: ...

    def prepare(self, ps: ParamState, grad: torch.Tensor, layout: Layout, step: int) -> None: ...

    def on_refresh(self, ps: ParamState, k: int, refresh: Refresh, layout: Layout) -> None: ...

    def dense_spectrum(self, ps: ParamState, step: int) -> Optional[torch.Tensor]: ...


@runtime_checkable
class Basis(Protocol):
    """How ``Q_k`` is computed from ``S_k``: ``initialize`` once (no warm start yet), ``refresh`` every ``every``
    steps (the ``index``-th refresh, 0-based). ``needs_factors = False`` means ``Q_k = I`` forever: no ``S_k`` is
    kept, dense modes become diagonal and the refresher is never called (``bases.Identity``)."""

    needs_factors: bool

    def initialize(self, factor: torch.Tensor, counter: Optional[FallbackCounter] = None) -> Refresh: ...

    def refresh(self, factor: torch.Tensor, basis: torch.Tensor, counter: Optional[FallbackCounter] = None,
                index: int = 0) -> Refresh: ...


@attrs.frozen
class ApplyContext:
    """What an applier may read: the pre-step state view ``ps`` (bases, spectra, the applier's own tensors), the
    layout, the raw gradient ``grad``, the step ``t`` (an int, or a 0-d device tensor in a captured step: use
    :func:`precond.ema.bias_correction`), the estimator's full-size spectrum ``dense`` (or None) and
    ``rotation_dtype``: the operand dtype of the rotations into and out of the bases (bfloat16 or float16, products
    accumulated in the state dtype; ``None``: the state dtype, see :func:`precond.contractions.rotate`)."""

    ps: ParamState
    layout: Layout
    grad: torch.Tensor
    step: Step
    dense: Optional[torch.Tensor] = None
    rotation_dtype: Optional[torch.dtype] = None


@runtime_checkable
class Applier(Protocol):
    """How ``Q_k`` and ``λ_k`` (or a dense spectrum) turn a direction into the update: ``apply(direction, ctx)``."""

    def init_state(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]: ...

    def exponent(self, layout: Layout) -> float: ...

    def apply(self, direction: torch.Tensor, ctx: ApplyContext) -> torch.Tensor: ...


_EXAMPLES = {
    Structure: "a structure such as structures.NMode(max_dim=4096)",
    Estimator: "an estimator such as estimators.KL(beta=0.95)",
    Basis: "a basis refresher such as bases.QRPowerStep(every=10)",
    Applier: "an applier such as precond.Power(p=0.5)",
}


def slot(protocol: type) -> Any:
    """attrs validator: the value must implement ``protocol`` (all its methods and attributes), else a clear error
    that names the slot and what it expects."""

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if isinstance(value, type) or not isinstance(value, protocol):
            what = f"the class {value.__name__} (not an instance)" if isinstance(value, type) else (
                f"{type(value).__name__} {value!r}")
            raise TypeError(f"{attribute.name} must be {_EXAMPLES[protocol]}, got {what}")

    return check
