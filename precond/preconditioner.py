"""``Preconditioner``: one structure, one estimator, one basis refresher and one applier, composed."""

from __future__ import annotations

import functools
from typing import Literal, Optional, Sequence

import attrs
import torch

from precond.appliers.power import Power
from precond.contractions import change_basis, rotate
from precond.ema import Step, momentum_direction
from precond.fallbacks import FallbackCounter
from precond.layout import Blocks, Layout
from precond.parts import Applier, ApplyContext, Basis, Estimator, Structure, slot, update_with
from precond.refresh import Refresh, is_due, refresh_index
from precond.state import ParamState
from precond.validators import number, one_of, plain_number


def _factorless(preconditioner: "Preconditioner", layout: Layout) -> Layout:
    if not preconditioner.basis.needs_factors:  # Q_k = I: dense modes keep only their spectrum
        layout = layout.with_kinds(tuple("diagonal" if kind == "dense" else kind for kind in layout.kinds))
    return layout


@attrs.frozen
class Momentum:
    """The optimizer's momentum as :meth:`Preconditioner.precondition_in_basis` folds it: ``β₁``, Nesterov, and
    whether the direction is divided by ``1 − β₁ᵗ`` (``precond.ema.momentum_direction``)."""

    beta: float
    nesterov: bool = False
    bias_correction: bool = False


@functools.lru_cache(maxsize=1024)
def _plan(preconditioner: "Preconditioner", shape: tuple[int, ...]) -> Layout:
    return _factorless(preconditioner, preconditioner.structure.plan(shape))


@functools.lru_cache(maxsize=1024)
def _blocks(preconditioner: "Preconditioner", shape: tuple[int, ...]) -> Optional[Blocks]:
    blocks = preconditioner.structure.blocks(shape)
    if blocks is None:
        return None
    return blocks.with_layouts([_factorless(preconditioner, layout) for layout in blocks.layouts])


@attrs.frozen
class Preconditioner:
    """A Kronecker-factored preconditioner assembled from four parts (``docs/design.md``).

    - ``structure`` (``structures.*``): which modes of the (viewed) weight get a dense factor;
    - ``estimator`` (``estimators.*``): how ``S_k`` and ``λ_k`` absorb each gradient;
    - ``basis`` (``bases.*``): how ``Q_k`` is refreshed every ``basis.every`` steps (``None``: never);
    - ``applier`` (``precond.appliers.*``): how ``Q_k``, ``λ_k`` turn a direction into the update.

    ``first_step``: ``"fill"`` fills the statistics from the first gradient and does not move the weight
    (SOAP, the KL prototype); ``"update"`` fills them and preconditions that same gradient at once (Meta's
    Shampoo), without folding it a second time.

    ``order`` (``docs/conventions.md``): ``"apply_then_fold"`` (default; SOAP, the KL prototype) — per step
    (``docs/design.md``, "Step order") the update is computed with the pre-step ``(Q_k, λ_k)``; then the
    estimator folds the gradient in; then, for modes whose refresh is due, the basis is refreshed from the new
    ``S_k`` and the estimator carries ``λ_k`` across. ``"fold_then_apply"`` (Meta's Distributed Shampoo): the
    gradient is folded first, the due refreshes run on the factors that already hold it, and only then is the
    direction preconditioned, so ``G_t`` is preconditioned with roots that include ``G_t``. The pieces are
    :meth:`fold`, the refreshes (:meth:`refresh_due` or the optimizer's schedule) and :meth:`apply`;
    :meth:`precondition` and :meth:`step` compose them in this order.

    ``fold_every`` ``k`` (default 1): the estimator folds the gradient of step ``t`` only when ``t mod k = 0`` (its
    statistics — ``S_k``, ``λ_k``, K-FAC's captured inputs — are updated every ``k`` steps, as kfac-pytorch's
    ``factor_update_steps``; each fold is one EMA sample, so ``β`` is per fold, not per step: pass ``β^k`` to keep
    the statistics' horizon of ``1/(1−β)`` steps). The update still uses
    the current bases and spectra every step, and refreshes still run when the schedule says, so ``k`` cuts the
    estimator's per-step products (for a matrix, the partial rotations and the grams: about half a KL step's)
    by a factor ``k``. A dense second moment in the basis (SOAP's ``V``) is the applier's statistic, updated every
    step as before.

    ``momentum_in_basis`` (default False): the optimizer's momentum is kept rotated into the bases,
    ``m̃ = m ×_k Q_k``, and folds the gradient's rotation ``R = G ×_k Q_k`` (:meth:`precondition_in_basis`); a
    refresh carries it into the new basis (:meth:`install_refresh`). The same updates as the default up to
    round-off; what changes is the work: the applier no longer rotates the momentum into the bases, and at a step
    that folds, ``R`` is the rotation the estimator forms anyway (KL), so one rotation of the gradient's size per
    step goes (with SOAP's ``V``, which reads the same ``R``, one per step); each refresh of mode ``k`` pays one
    ``d_k × d_k`` change of basis of the momentum. Needs the applier ``precond.Power`` and
    ``order="apply_then_fold"``. It changes what ``state_dict`` holds under ``"momentum"`` (the rotated ``m̃``), so a
    checkpoint is refused by an optimizer with the other setting (the configuration check of ``load_state_dict``).

    *When* a refresh is due is the optimizer's
    refresh schedule's business; this class offers its inputs (:meth:`refresh_inputs`), its computation and its
    installation.
    Every tensor has a leading batch axis ``B`` (parameters of one layout are stacked).
    """

    structure: Structure = attrs.field(validator=slot(Structure))
    estimator: Estimator = attrs.field(validator=slot(Estimator))
    basis: Basis = attrs.field(validator=slot(Basis))
    applier: Applier = attrs.field(validator=slot(Applier))
    first_step: Literal["fill", "update"] = attrs.field(
        default="fill", validator=one_of(("fill", "update"))
    )
    order: Literal["apply_then_fold", "fold_then_apply"] = attrs.field(
        default="apply_then_fold", validator=one_of(("apply_then_fold", "fold_then_apply"))
    )
    fold_every: int = attrs.field(default=1, converter=plain_number, validator=number(
        low=1, integer=True, meaning="the period (in steps) of the estimator's folds"))
    momentum_in_basis: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def __attrs_post_init__(self) -> None:
        if self.fold_every > 1 and self.estimator.needs_whole_parameters:
            raise ValueError("fold_every > 1 with an estimator fed by layer captures (K-FAC): the capture decides "
                             "when statistics are recorded; set its factor_every instead and leave fold_every at 1")
        if self.momentum_in_basis:
            if type(self.applier) is not Power:
                raise ValueError(
                    f"momentum_in_basis=True needs the applier precond.Power, which rotates the direction into the "
                    f"bases, scales it and rotates it back (the momentum then already lives in the bases); got "
                    f"{type(self.applier).__name__}, which reads the direction in the parameter's coordinates: "
                    f"leave momentum_in_basis=False with it")
            if self.folds_before_apply:
                raise ValueError("momentum_in_basis=True runs in the default order='apply_then_fold' (the rotation "
                                 "of the gradient is shared with the fold that follows the update); leave "
                                 "momentum_in_basis=False with order='fold_then_apply'")

    def plan(self, shape: Sequence[int]) -> Layout:
        return _plan(self, tuple(shape))

    def blocks(self, shape: Sequence[int]) -> Optional[Blocks]:
        """The blocks of a weight the structure cuts into blocks (its ``blocks(shape)``, e.g.
        ``NMode(large="block")``), each preconditioned as a parameter of its own; None when it is planned whole."""
        return _blocks(self, tuple(shape))

    # --- the first gradient -------------------------------------------------------------------
    def init_state(self, grad: torch.Tensor, layout: Layout, counter: Optional[FallbackCounter] = None,
                   params: tuple[torch.Tensor, ...] = ()) -> ParamState:
        """Initial state from the first gradient ``grad`` (``(B, *view)``) of ``params``: fill, first bases,
        ``λ_k`` at step 0."""
        ps = ParamState.empty(layout, self.basis.needs_factors, grad.shape[0], grad.dtype, grad.device, params)
        ps.estimator = self.estimator.init_state(grad, layout)  # before finish_init, which may set them (EKFAC's V)
        self.estimator.update(ps, grad, layout, first=True)
        refreshes = {k: self.basis.initialize(factor, counter) for k, factor in enumerate(ps.S) if factor is not None}
        for k, refresh in refreshes.items():
            ps.Q[k] = refresh.basis
        self.estimator.finish_init(ps, refreshes, layout)
        ps.applier = self.applier.init_state(grad, layout)
        return ps

    @property
    def updates_on_first_gradient(self) -> bool:
        """``first_step="update"``: the first gradient also moves the weight (as step 1)."""
        return self.first_step == "update"

    def folds_at(self, step: int) -> bool:
        """Whether step ``t``'s gradient is folded into the statistics: every ``fold_every``-th step (all by
        default), except step 1 of ``first_step="update"``, whose gradient the initial fill already holds."""
        return self.refreshes_at(step) and step % self.fold_every == 0

    def refreshes_at(self, step: int) -> bool:
        """Whether refreshes may follow step ``t`` (when the schedule says they are due): every step except step 1
        of ``first_step="update"`` (the fill's first bases are still fresh)."""
        return not (step == 1 and self.updates_on_first_gradient)

    # --- one step -----------------------------------------------------------------------------
    @property
    def folds_before_apply(self) -> bool:
        """``order="fold_then_apply"``: the fold and the due refreshes of step ``t`` come before its apply."""
        return self.order == "fold_then_apply"

    def precondition(self, ps: ParamState, grad: torch.Tensor, direction: torch.Tensor, layout: Layout,
                     step: Step, fold: Optional[bool] = None,
                     rotation_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The update for ``direction`` and the fold of ``grad``, in ``order``, without any refresh (that is
        :meth:`step`'s, or the optimizer's schedule's): :meth:`apply` then :meth:`fold` by default; :meth:`fold`
        then :meth:`apply` with ``"fold_then_apply"``. A caller that wants Meta's order with refreshes calls
        :meth:`fold`, then the due refreshes, then :meth:`apply` itself (as :meth:`step` does).

        ``step`` may be a 0-d device tensor (a captured step: parts only use it for bias corrections); then
        ``fold``, the host's :meth:`folds_at` verdict for it, must be given. ``rotation_dtype``: see :meth:`apply`."""
        if self.folds_before_apply:
            self.fold(ps, grad, layout, step, fold)
            return self.apply(ps, grad, direction, layout, step, rotation_dtype)
        update = self.apply(ps, grad, direction, layout, step, rotation_dtype)
        self.fold(ps, grad, layout, step, fold)
        return update

    def precondition_in_basis(self, ps: ParamState, grad: torch.Tensor, layout: Layout, step: Step,
                              momentum: Optional[Momentum], fold: Optional[bool] = None,
                              rotation_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """:meth:`precondition` with the momentum kept in the bases (``momentum_in_basis=True``): the update, and
        the fold of ``grad``.

        The gradient is rotated once, ``R = G ×_k Q_k`` (where the step folds, by the estimator's
        ``rotations``, whose partial rotations its ``update`` then reuses: KL's fold forms ``R`` anyway), the
        momentum folds ``R`` (``m̃ ← β₁ m̃ + (1−β₁) R``, :func:`precond.ema.momentum_direction`) and the applier
        scales ``m̃`` and rotates it back. Since ``m̃ = m ×_k Q_k`` for the parameter-space momentum ``m`` of the
        default path (every rotation is linear and the bases orthogonal, and :meth:`install_refresh` carries
        ``m̃`` into each new basis), the updates are the default path's up to round-off, without the applier's
        rotation of ``m`` into the bases: one rotation of the gradient's size fewer per step that folds (and per
        step with a dense spectrum, SOAP's ``V``, whose ``prepare`` takes ``R`` instead of rotating ``G`` again)."""
        folds = self.folds_at(step) if fold is None else fold
        hook = getattr(self.estimator, "rotations", None)  # optional (estimators.base.Estimator has it)
        shared = hook(ps, grad, layout) if folds and hook is not None else None
        rotated = shared.full if shared is not None else rotate(grad, ps.Q)
        source = rotated
        if momentum is not None:
            source = momentum_direction(ps.momentum, rotated, momentum.beta, momentum.nesterov,
                                        momentum.bias_correction, step)
        update = self.apply(ps, grad, source, layout, step, rotation_dtype, in_basis=True,
                            rotated=rotated if hook is not None else None)
        if folds:
            update_with(self.estimator, ps, grad, layout, shared)
        return update

    def apply(self, ps: ParamState, grad: torch.Tensor, direction: torch.Tensor, layout: Layout,
              step: Step, rotation_dtype: Optional[torch.dtype] = None, in_basis: bool = False,
              rotated: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The update for ``direction`` from the current bases and spectra: the estimator's ``prepare`` (statistics
        the direction must already see, e.g. SOAP's ``V``), then the applier. Folds nothing into ``S_k``/``λ_k``.
        ``rotation_dtype`` (bfloat16/float16) is handed to the applier for its rotations of ``direction`` (the
        estimator's statistics are computed in the state dtype whatever it is). ``in_basis``: ``direction`` is
        already rotated into the bases (:meth:`precondition_in_basis`), which also hands the estimator's
        ``prepare`` the gradient's rotation ``rotated`` it formed (SOAP's ``V`` then does not rotate it again)."""
        if rotated is not None:
            self.estimator.prepare(ps, grad, layout, step, rotated=rotated)
        else:
            self.estimator.prepare(ps, grad, layout, step)
        ctx = ApplyContext(ps=ps, layout=layout, grad=grad, step=step,
                           dense=self.estimator.dense_spectrum(ps, step), rotation_dtype=rotation_dtype,
                           in_basis=in_basis)
        return self.applier.apply(direction, ctx)

    def fold(self, ps: ParamState, grad: torch.Tensor, layout: Layout, step: Step,
             fold: Optional[bool] = None) -> None:
        """Fold step ``t``'s gradient into the statistics, unless :meth:`folds_at` (or the host's verdict ``fold``
        for a device ``step``) says the fill holds it already."""
        if self.folds_at(step) if fold is None else fold:
            self.estimator.update(ps, grad, layout)

    def step(self, ps: ParamState, grad: torch.Tensor, direction: torch.Tensor, layout: Layout, step: int,
             counter: Optional[FallbackCounter] = None, rotation_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The whole step of one stack of parameters without an optimizer (tests, references), in ``order``:
        :meth:`apply`, :meth:`fold`, :meth:`refresh_due`; or :meth:`fold`, :meth:`refresh_due`, :meth:`apply`."""
        if self.folds_before_apply:
            self.fold(ps, grad, layout, step)
            self.refresh_due(ps, layout, step, counter)
            return self.apply(ps, grad, direction, layout, step, rotation_dtype)
        update = self.precondition(ps, grad, direction, layout, step, rotation_dtype=rotation_dtype)
        self.refresh_due(ps, layout, step, counter)
        return update

    def absorb(self, ps: ParamState, grad: torch.Tensor, layout: Layout, step: int,
               counter: Optional[FallbackCounter] = None) -> None:
        """Statistics only: :meth:`fold`, then :meth:`refresh_due` (a step whose update is not needed)."""
        self.fold(ps, grad, layout, step)
        self.refresh_due(ps, layout, step, counter)

    def refresh_due(self, ps: ParamState, layout: Layout, step: int, counter: Optional[FallbackCounter] = None) -> None:
        """Refresh every refreshable mode due after step ``t`` by the schedule's rule with offset 0 (no stagger)."""
        if not self.refreshes_at(step):
            return
        for k in self.refreshable_modes(layout):
            if is_due(step, 0, self.basis.every):
                factor, basis = self.refresh_inputs(ps, k)
                index = refresh_index(step, 0, self.basis.every)
                self.install_refresh(ps, k, self.compute_refresh(factor, basis, counter, index), layout)

    # --- refreshes ----------------------------------------------------------------------------
    def refreshable_modes(self, layout: Layout) -> list[int]:
        """Modes whose basis a refresher updates: dense, with a stored factor, and a basis that is refreshed at all
        (``basis.every`` not ``None``). Only these are ever scheduled, so ``basis.every`` is read for them alone."""
        return list(layout.dense_modes) if self.basis.needs_factors and self.basis.every is not None else []

    @staticmethod
    def refresh_inputs(ps: ParamState, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What a refresh of mode ``k`` reads: ``(S_k, Q_k)``."""
        return ps.S[k], ps.Q[k]

    def compute_refresh(self, factor: torch.Tensor, basis: torch.Tensor, counter: Optional[FallbackCounter] = None,
                        index: int = 0) -> Refresh:
        """The ``index``-th (0-based) new basis from ``S_k`` and the old ``Q_k`` (no state is written)."""
        return self.basis.refresh(factor, basis, counter, index=index)

    def install_refresh(self, ps: ParamState, k: int, result: Refresh, layout: Layout) -> None:
        """Install a refresh of mode ``k``: the estimator carries its per-column state across, then ``Q_k`` moves.
        With ``momentum_in_basis`` the momentum moves into the new basis too: ``m̃ ← m̃ ×_k (Q_oldᵀ Q_new)``
        (:func:`precond.contractions.change_basis`), which gives ``m ×_k Q_new`` from ``m̃ = m ×_k Q_old``."""
        self.estimator.on_refresh(ps, k, result, layout)
        if self.momentum_in_basis and ps.momentum is not None:
            ps.momentum.copy_(change_basis(ps.momentum, ps.Q[k], result.basis, k))
        ps.Q[k].copy_(result.basis)
