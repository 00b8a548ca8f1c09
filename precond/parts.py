"""The four part protocols a :class:`precond.Preconditioner` is assembled from (``docs/design.md``, "Parts").

Every hook takes the typed state view :class:`precond.state.ParamState` first, then the gradient or direction,
then the layout, then what else it needs. Tensors carry a leading batch axis ``B`` (parameters of one layout are
stacked). A part never imports another part; what two parts share (``Refresh``, the EMA ``fold``) is in the
kernel (``precond.refresh``, ``precond.ema``).

Each protocol lists *everything* the core (and a part wrapping another, as ``estimators.DenseSpectrum``) reads of
a part: nothing is looked up with a default behind the protocol's back, so a part that implements exactly its
protocol works in every mode, and one that misses a member is refused when the ``Preconditioner`` is built
(:func:`slot` names the missing members). A member a part has no use for still has to be there, with the neutral
value its docstring gives ("a hook with a default"): ``Structure.blocks`` returning ``None``,
``Estimator.needs_whole_parameters = False``, ``Estimator.rotated_moment`` returning ``None``, ``Basis.every =
None`` for a basis that is never refreshed. The library's estimators inherit the neutral hooks from
``estimators.base.Estimator``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Mapping, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import attrs
import torch

from precond.ema import Step
from precond.fallbacks import FallbackCounter
from precond.layout import Layout
from precond.refresh import Refresh
from precond.state import ParamState

if TYPE_CHECKING:
    from precond.layout import Blocks


@runtime_checkable
class Structure(Protocol):
    """Which modes of the (viewed) weight get a dense factor: ``plan(shape) -> Layout``; and ``blocks(shape) ->
    Optional[precond.layout.Blocks]``: the blocks a weight is cut into, each preconditioned as a parameter of its
    own (``NMode(large="block")``), or ``None`` (the default of every structure that does not cut: ``plan`` covers
    the weight whole)."""

    def plan(self, shape: Sequence[int]) -> Layout: ...

    def blocks(self, shape: Sequence[int]) -> Optional["Blocks"]: ...


class Rotations(NamedTuple):
    """The gradient's rotations into the bases that a step forms once and shares (``Preconditioner``'s
    ``momentum_in_basis``), from an estimator's optional ``rotations(ps, grad, layout)`` hook
    (``estimators.base.Estimator.rotations``): the full ``R = G ×_j Q_j`` and, by mode ``k``, any partial rotation
    the estimator's ``update`` would form again (KL's ``G ×_{j≠k} Q_j``). An estimator that returns partial rotations
    takes them back as ``update(..., rotations=...)`` (:func:`update_with`)."""

    full: torch.Tensor
    partial: Mapping[int, torch.Tensor]


def update_with(estimator: Any, ps: ParamState, grad: torch.Tensor, layout: Layout,
                rotations: Optional[Rotations], first: bool = False) -> None:
    """``estimator.update(ps, grad, layout, first)``, handing back ``rotations`` where they hold partial rotations
    (:class:`Rotations`; an estimator without them keeps the protocol's signature)."""
    if rotations is not None and rotations.partial:
        estimator.update(ps, grad, layout, first, rotations=rotations)
    else:
        estimator.update(ps, grad, layout, first)


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

    Three members with a neutral default (``estimators.base.Estimator`` has them):

    - ``needs_whole_parameters`` (default ``False``): the statistics come from something that only knows whole
      parameters (K-FAC's layer captures), so the parameter may not be cut into blocks;
    - ``rotated_moment(ps, grad, rotated, layout)`` (default ``None``): for a dense spectrum over these factors
      (``estimators.DenseSpectrum``), the second moment it folds in the basis and the ``(B,)`` mask of the entries
      that fold it; ``None`` means ``R⊙R`` of the gradient's rotation ``rotated``;
    - ``tracked_diagonal(ps, k)`` (default ``None``): ``diag(Q_kᵀ S_k Q_k)`` kept current by the estimator
      (``KL(track_drift=True)``), which ``drift_tolerance`` then reads instead of forming ``S_k Q_k``.

    One optional hook outside the protocol (looked up by name, so an estimator without it still fits):
    ``rotations(ps, grad, layout)`` → :class:`Rotations`, the gradient's rotation into the bases that
    ``Preconditioner(momentum_in_basis=True)`` shares with the step (``estimators.base.Estimator`` has it; an
    estimator that has it also takes ``rotated=`` in ``prepare``).
    """

    needs_whole_parameters: bool

    def init_state(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]: ...

    def update(self, ps: ParamState, grad: torch.Tensor, layout: Layout, first: bool = False) -> None: ...

    def finish_init(self, ps: ParamState, refreshes: Mapping[int, Refresh], layout: Layout) -> None: ...

    def prepare(self, ps: ParamState, grad: torch.Tensor, layout: Layout, step: int) -> None: ...

    def on_refresh(self, ps: ParamState, k: int, refresh: Refresh, layout: Layout) -> None: ...

    def dense_spectrum(self, ps: ParamState, step: int) -> Optional[torch.Tensor]: ...

    def rotated_moment(self, ps: ParamState, grad: torch.Tensor, rotated: torch.Tensor,
                       layout: Layout) -> Optional[tuple[torch.Tensor, torch.Tensor]]: ...

    def tracked_diagonal(self, ps: ParamState, k: int) -> Optional[torch.Tensor]: ...


@runtime_checkable
class Basis(Protocol):
    """How ``Q_k`` is computed from ``S_k``: ``initialize`` once (no warm start yet), ``refresh`` every ``every``
    steps (the ``index``-th refresh, 0-based).

    - ``every``: the refresh period ``T`` (an int ≥ 1: mode ``k`` is refreshed after the update of the steps with
      ``(t + o) mod T = 0``, ``o`` its stagger offset, :func:`precond.refresh.is_due`), or ``None``: never refreshed,
      ``Q_k`` stays what ``initialize`` gave (``bases.Identity``). It is also the ``T`` of the refresh work in the
      owner-mode cost model (``precond.distributed.owners``).
    - ``needs_factors = False`` means ``Q_k = I`` forever: no ``S_k`` is kept, dense modes become diagonal and
      neither ``initialize`` nor ``refresh`` is called (``bases.Identity``, whose ``every`` is ``None``).
    """

    needs_factors: bool
    every: Optional[int]

    def initialize(self, factor: torch.Tensor, counter: Optional[FallbackCounter] = None) -> Refresh: ...

    def refresh(self, factor: torch.Tensor, basis: torch.Tensor, counter: Optional[FallbackCounter] = None,
                index: int = 0) -> Refresh: ...


Side = Literal["input", "output"]
"""A layer's Kronecker factor: of its inputs (``A``, ``"input"``) or of its output gradients (``G``, ``"output"``)."""


@runtime_checkable
class LayerStatistics(Protocol):
    """What an estimator whose factors come from whole layers (``estimators.KFAC``, ``EKFAC``) reads of the statistics
    a step recorded, per parameter ``p`` (``precond.kfac_capture.KFACCapture`` records them with module hooks); the
    estimator names this protocol, never the capture, so a part package imports only the kernel.

    - ``role(p)``: ``"weight"`` or ``"bias"`` (an error for a parameter it does not know);
    - ``factor(p, side, diagonal, dtype)``: this step's ``A_t`` or ``G_t`` of ``p``'s layer (``diag`` only with
      ``diagonal``), or ``None`` when nothing was recorded;
    - ``loss_scale(p)``: the loss-term count ``s`` of this step's records, or ``None``;
    - ``rotated_moment(p, bases, dtype)``: ``s Σ_n (Q_Gᵀ ∇W_n Q_A)²`` of the per-example gradients in the bases
      (``None`` entries: identity), shaped like the viewed parameter, or ``None``;
    - ``mark_consumed(params)``: the estimator has folded these parameters' records.
    """

    def role(self, p: torch.Tensor) -> str: ...

    def factor(self, p: torch.Tensor, side: Side, diagonal: bool = False,
               dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]: ...

    def loss_scale(self, p: torch.Tensor) -> Optional[float]: ...

    def rotated_moment(self, p: torch.Tensor, bases: Sequence[Optional[torch.Tensor]],
                       dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]: ...

    def mark_consumed(self, params: Sequence[torch.Tensor]) -> None: ...


@attrs.frozen
class ApplyContext:
    """What an applier may read: the pre-step state view ``ps`` (bases, spectra, the applier's own tensors), the
    layout, the raw gradient ``grad``, the step ``t`` (an int, or a 0-d device tensor in a captured step: use
    :func:`precond.ema.bias_correction`), the estimator's full-size spectrum ``dense`` (or None), ``in_basis`` and
    ``rotation_dtype``: the operand dtype of the rotations into and out of the bases (bfloat16 or float16, products
    accumulated in the state dtype; ``None``: the state dtype, see :func:`precond.contractions.rotate`)."""

    ps: ParamState
    layout: Layout
    grad: torch.Tensor
    step: Step
    dense: Optional[torch.Tensor] = None
    rotation_dtype: Optional[torch.dtype] = None
    in_basis: bool = False
    """The direction is already rotated into the bases (``Preconditioner(momentum_in_basis=True)``): an applier that
    rotates it (``precond.Power``) only scales it and rotates it back."""


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
    LayerStatistics: "a capture of the layers' statistics such as precond.KFACCapture(model)",
}


def members(protocol: type) -> tuple[str, ...]:
    """The names a part of ``protocol`` must have: its declared attributes and its methods (sorted)."""
    names = set(vars(protocol).get("__annotations__", {}))
    names |= {name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")}
    return tuple(sorted(names))


def slot(protocol: type) -> Any:
    """attrs validator: the value must implement ``protocol`` (all its methods and attributes), else a clear error
    that names the slot, what it expects and which members the value lacks."""

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if isinstance(value, type) or not isinstance(value, protocol):
            what = f"the class {value.__name__} (not an instance)" if isinstance(value, type) else (
                f"{type(value).__name__} {value!r}")
            declared = vars(protocol).get("__annotations__", {})  # attributes; the other members are methods
            missing = [] if isinstance(value, type) else [
                name for name in members(protocol)
                if not hasattr(value, name) or (name not in declared and getattr(value, name) is None)]
            lacks = (f": it lacks {', '.join(missing)} (precond.parts.{protocol.__name__} lists every member a part "
                     f"must have, with the neutral value of each optional hook)") if missing else ""
            raise TypeError(f"{attribute.name} must be {_EXAMPLES[protocol]}, got {what}{lacks}")

    return check
