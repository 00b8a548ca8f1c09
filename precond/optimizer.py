"""``precond.Optimizer``: a ``torch.optim.Optimizer`` that runs a :class:`Preconditioner` per parameter.

The class is the ``torch.optim`` shell (param groups, ``step``, ``state_dict``/``load_state_dict``, hooks,
inspection); the step itself runs in its :class:`precond.engine.Engine` (``docs/design.md``, "Architecture").
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional, Union

import attrs
import torch

from precond.blocking import Blocks
from precond.buckets import Bucket
from precond.checkpoint import describe, restore
from precond.compile_refusal import COMPILE_REFUSAL, mark, refuse_compilation
from precond.engine import Engine, check_options
from precond.layout import Layout
from precond.param_groups import check_hyperparameters, named, params_list, plain_hyperparameters
from precond.precision import tf32_matmuls
from precond.preconditioner import Preconditioner
from precond.safe_globals import allow_parts
from precond.state import BLOCKS

__all__ = ["COMPILE_REFUSAL", "Optimizer"]

_CONFIG_KEY = "preconditioner"
_PART_KEYS = ("structure", "estimator", "basis", "applier", "first_step")


class Optimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` running ``preconditioner`` on every parameter (per-group overrides allowed).

    The optimizer owns only what is not a preconditioner part (``docs/design.md``, "Parts"): ``lr`` η (float or
    tensor, schedulable); ``momentum`` β₁, ``m ← β₁ m + (1−β₁) g`` in the original space (0 = none; ``nesterov`` uses
    ``(1−β₁) g + β₁ m``); decoupled ``weight_decay`` ``W ← W − η·wd·W``, ``decay_order="before"`` the update (AdamW)
    or ``"after"`` it (SOAP, the KL-Shampoo prototype); ``bias_correction`` (``m̂ = m / (1−β₁ᵗ)``, Adam, SOAP); the
    step count ``state[p]["step"]`` (parameter updates, ``t = 1`` at the first).

    Factor state lives in ``state_dtype`` (float32 by default, whatever the parameter dtype: bfloat16 loses the
    ``1−ρ`` increments and the orthogonality of ``Q``); ``η U`` is formed in it and cast to the parameter's dtype last.

    ``on_nonfinite``: every step first reads the largest ``|g|`` of each gradient (and a tensor ``lr``), one host
    synchronisation, before anything is touched. ``"raise"`` (default): a NaN/Inf gradient or ``lr`` raises
    ``FloatingPointError``, all state left as it was; ``"skip"``: such a step is skipped (nothing changes, the step is
    not counted), counted in ``stats()["nonfinite_skipped"]`` and warned about once; ``"ignore"``: no check
    (``step()`` never synchronises). With the first two, a finite gradient whose largest entry exceeds ``2⁴⁰``
    (≈1.1e12, where float32 grams start to risk overflow) is scaled by a power of two (exact) down to that bound
    before momentum and statistics see it, counted in ``stats()["gradient_rescaled"]``.

    Speed (``docs/benchmarks.md``): ``stack`` batches parameters of equal layout (``False``: the simple reference
    path, the same updates); ``stagger`` spreads the basis refreshes over the ``T`` steps (each factor still every
    ``T`` steps, at its own phase); ``async_refresh`` runs them on side CUDA streams, overlapped with the next
    forward/backward and installed before the next update (the same updates); ``tf32`` True/False forces TF32 on/off
    for the per-step products (refreshes always in full float32), ``None`` leaves torch's setting alone.
    ``drift_tolerance`` τ (``None``: off) makes each due refresh conditional: a basis is refreshed only when the
    relative off-diagonal norm of ``Q_kᵀ S_k Q_k`` is at least τ (``precond.drift``: measured without a host
    synchronisation, counted in :meth:`refresh_counts`); ``T`` is then the period of the checks. ``refresh_budget``
    ``B`` (with ``drift_tolerance``) caps each ``step()``'s refreshes at the work ``Σ d_k³ / B`` a fixed schedule of
    period ``B`` spreads on each step, spent on the most drifted bases first (``precond.drift``): with a short
    ``T`` (e.g. 2) the bases are checked often and refreshed where they drifted, at a fixed schedule's cost.
    ``capture=True`` replays each bucket's steady-state update as one CUDA graph (``precond.captured``: the same
    updates to float32 round-off); the refreshes stay eager, except those of a basis made of products alone
    (``bases.Refine``), replayed per factor from one graph per bucket mode (``precond.captured_refresh``).
    ``"emulate"`` runs both paths without graphs (their CPU reference). ``torch.compile(optimizer.step)`` is
    refused with :data:`COMPILE_REFUSAL`: use ``capture=True``;
    ``torch.compile(model)`` with an eager ``step()`` works. ``overlap_backward=True`` starts each bucket's
    preconditioning inside the backward pass once its gradients are final (``precond.overlap``: the same updates;
    needs ``on_nonfinite="ignore"``, no clipping or unscaling between backward and ``step()``, and
    ``with optimizer.accumulating():`` around all but the last backward of an accumulated step).

    A parameter its structure cuts into blocks (``NMode(max_dim=b, large="block")``, Meta's blocking) is stepped as its
    blocks (``precond.blocking``): ``state[p] = {"blocks": {"0": …, …}}``, :meth:`layout` gives its ``Blocks``.

    ``rotation_dtype`` (opt-in group hyperparameter, ``torch.bfloat16``/``torch.float16``; ``None`` changes nothing):
    the applier's rotations into the eigenbasis and back (most of a step's matmul work) take operands rounded to that
    dtype and accumulate in ``state_dtype`` (``precond.contractions``), with every executor and runtime;
    ``docs/benchmarks.md`` ("bf16 rotations") measures its effect on the final loss.

    ``distributed`` (optional, ``precond.DataParallel(...)``): spread the work and (``mode="owner"``) the state over
    the ranks of a process group, with the same updates (``precond.distributed``, ``docs/scaling.md``); then
    ``stats()`` is a collective, and in owner mode each rank's ``state_dict()`` holds only the parameters it owns
    (checkpoint through ``torch.distributed.checkpoint``).
    """

    def __init__(self, params: Iterable[Any], preconditioner: Preconditioner, lr: Union[float, torch.Tensor] = 1e-3,
                 momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0, decay_order: str = "before",
                 bias_correction: bool = False, state_dtype: torch.dtype = torch.float32, on_nonfinite: str = "raise",
                 stack: bool = True, stagger: bool = False, async_refresh: bool = False, tf32: Optional[bool] = None,
                 capture: Union[bool, str] = False, overlap_backward: bool = False, distributed: Optional[Any] = None,
                 rotation_dtype: Optional[torch.dtype] = None, drift_tolerance: Optional[float] = None,
                 refresh_budget: Optional[int] = None) -> None:
        options = dict(state_dtype=state_dtype, on_nonfinite=on_nonfinite, stack=stack, stagger=stagger,
                       async_refresh=async_refresh, tf32=tf32, capture=capture, overlap_backward=overlap_backward,
                       distributed=distributed, drift_tolerance=drift_tolerance, refresh_budget=refresh_budget)
        check_options(options)  # before anything is built: the values, then the compatibility table
        self._names: dict[int, str] = {}
        defaults = plain_hyperparameters(dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, decay_order=decay_order,
            bias_correction=bias_correction, rotation_dtype=rotation_dtype, preconditioner=preconditioner))
        super().__init__(params_list(params), defaults)
        self._configure(options)

    def _configure(self, options: dict[str, Any]) -> None:
        """The optimizer-wide options and the engine built from them (also after unpickling)."""
        mark()
        self.register_step_pre_hook(refuse_compilation)  # the first hook: before K-FAC's is traced
        self.state_dtype, self.on_nonfinite = options["state_dtype"], options["on_nonfinite"]
        self.stack, self.tf32 = options["stack"], options["tf32"]
        self.capture, self.overlap_backward = options.get("capture", False), options.get("overlap_backward", False)
        self.distributed = options.get("distributed")
        self.engine = Engine(self, options, self._names)  # checks the groups first: they name what they refuse

    def __getstate__(self) -> dict[str, Any]:
        """As ``torch.optim`` plus the options and parameter names, so ``copy.deepcopy`` and pickling give an optimizer
        that steps exactly like this one (pending refreshes installed first; the copy builds its own engine)."""
        self.engine.schedule.flush()
        params = [p for group in self.param_groups for p in group["params"]]
        attached = [(part, [name for name, value in vars(self).items() if value is part])
                    for part in self.engine.attached]
        return {**super().__getstate__(), "options": dict(self.engine.options),
                "names": [self._names.get(id(p)) for p in params], "attached": attached}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "options" not in state:  # torch.optim's load_state_dict passes only state and param_groups
            super().__setstate__(state)
            return
        options, names, attached = state.pop("options"), state.pop("names", []), state.pop("attached", [])
        super().__setstate__(state)
        params = [p for group in self.param_groups for p in group["params"]]
        named_params = zip(params, names, strict=False)  # an older pickle saved no names: []
        self._names = {id(p): name for p, name in named_params if name is not None}
        self._configure(options)  # after the names: its checks name the parameters they refuse
        for part, attributes in attached:  # the copied part (K-FAC's capture) on this copy's steps, as the original
            part.attach(self)
            for attribute in attributes:  # e.g. the preset's optimizer.kfac_capture
                setattr(self, attribute, part)

    def keep_attached(self, part: Any) -> None:
        """Keep ``part``, whose ``attach(optimizer)`` hooked this optimizer's steps (:class:`precond.KFACCapture`): a
        step refused or skipped calls ``part.discard()`` (drop what it recorded for the step), and a copy of this
        optimizer (deepcopy, pickle) attaches its copy of ``part`` again, with the attributes that hold it."""
        self.engine.keep_attached(part)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim``; the group is checked first, so a refused group leaves the optimizer unchanged.

        ``params`` may be any iterable (a generator such as ``module.parameters()`` is read once), a lone tensor or
        ``(name, tensor)`` pairs from ``named_parameters()`` (kept as the group's ``param_names``); not a set.
        Besides a whole ``preconditioner``, a group may override single parts: ``structure``, ``estimator``,
        ``basis``, ``applier`` or ``first_step`` replace that part of the default preconditioner, e.g.
        ``{"params": embeddings, "structure": structures.OneSided()}``.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        param_group = dict(param_group)
        param_group["params"] = params_list(param_group["params"], "a param group's 'params'")
        overrides = {name: param_group.pop(name) for name in _PART_KEYS if name in param_group}
        if overrides:
            base = param_group.get(_CONFIG_KEY, self.defaults[_CONFIG_KEY])
            param_group[_CONFIG_KEY] = attrs.evolve(base, **overrides)
        check_hyperparameters({**self.defaults, **plain_hyperparameters(param_group)})
        for item in param_group["params"]:
            name, p = item if named(item) else (None, item)
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise TypeError(f"parameter {name or self._name(p)} is complex; precond supports real parameters only")
        super().add_param_group(param_group)
        added = self.param_groups[-1]
        if hasattr(self, "engine"):  # a group added after construction (the engine checks those of construction)
            try:
                self.engine.check_groups([added])
            except ValueError:
                self.param_groups.pop()
                raise
            self.engine.add_params(added["params"])
        self._names.update(zip(map(id, added["params"]), added.get("param_names", ()), strict=False))  # unnamed: ()
        allow_parts(added[_CONFIG_KEY])

    def _name(self, p: torch.Tensor) -> str:
        return self.engine.name(p) if hasattr(self, "engine") else self._names.get(id(p), f"of shape {tuple(p.shape)}")

    # --- inspection ---------------------------------------------------------------------------------------------------
    def layout(self, p: torch.Tensor) -> Union[Layout, Blocks]:
        """The plan of parameter ``p`` (its group's structure applied to its shape): a :class:`Layout`, or for a
        parameter cut into blocks (``NMode(large="block")``) its :class:`precond.blocking.Blocks`."""
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                blocks = group[_CONFIG_KEY].blocks(p.shape)
                return group[_CONFIG_KEY].plan(p.shape) if blocks is None else blocks
        raise KeyError("parameter is not managed by this optimizer")

    def part_state(self, p: torch.Tensor, part: str) -> dict[str, Any]:
        """One part's state of parameter ``p``: ``part`` is ``"estimator"``, ``"basis"`` or ``"applier"``. For a
        parameter cut into blocks, the same per block: ``{"0": part state of block 0, …}``."""
        blocks = self.state[p].get(BLOCKS)
        if blocks is not None:
            return {i: state.get(part, {}) for i, state in blocks.items()}
        return self.state[p].get(part, {})

    def buckets(self) -> tuple[Bucket, ...]:
        """The current buckets (parameters stacked into one batched state each), for inspection: read, don't write."""
        return tuple(self.engine.buckets)

    def refresh_offset(self, p: torch.Tensor, k: int) -> Optional[int]:
        """The stagger offset ``o`` of mode ``k`` of ``p`` (refreshed after steps with ``(t + o) mod T = 0``), or
        None before the schedule was planned (the first step) or for a mode without a refreshed basis."""
        return self.engine.refresh_offset((id(p), k))

    @property
    def stagger(self) -> bool:
        """Basis refreshes spread over the ``T`` steps (an option of the constructor)."""
        return self.engine.schedule.stagger

    @property
    def async_refresh(self) -> bool:
        """Basis refreshes on side CUDA streams, installed before the next update (an option of the constructor)."""
        return self.engine.schedule.asynchronous

    def pending_refreshes(self) -> int:
        """How many asynchronous refreshes wait to be installed (at the start of the next step)."""
        return len(self.engine.schedule.pending)

    def refresh_counts(self) -> dict[str, dict[int, dict[str, int]]]:
        """With ``drift_tolerance``: per parameter name and mode, the due refreshes checked, those made (the rest
        kept their basis: ``precond.drift``) and those that drifted but the ``refresh_budget`` passed over
        (``"checks"``, ``"refreshes"``, ``"deferred"``); empty without it. Read on the host, no synchronisation.
        Parameters given without names are labelled by shape, with their position when a shape repeats."""
        return self.engine.refresh_counts()

    def stats(self) -> dict[str, int]:
        """Counts of numerical fallbacks taken so far: ``eigh_jitter``, ``eigh_float64``, ``eigh_kept_old_basis``,
        ``cholesky_qr_kept_old_basis``, ``refine_kept_old_basis`` (reading the last two synchronises with the
        device)."""
        return self.engine.stats()

    def describe(self) -> str:
        """Returns (does not print) one line per parameter: shape → view with each mode's kind, and the factor
        memory it needs in ``state_dtype``."""
        lines, total = [], 0
        size = torch.empty((), dtype=self.state_dtype).element_size()
        for i, group in enumerate(self.param_groups):
            for p in group["params"]:
                layout = self.layout(p)
                numel = layout.state_numel()
                total += numel
                lines.append(f"group {i} {self._name(p)}: {layout.describe()}  factors {numel * size / 2**20:.2f} MiB")
        lines.append(f"total factor state: {total * size / 2**20:.2f} MiB "
                     f"({str(self.state_dtype).removeprefix('torch.')})")
        return "\n".join(lines)

    # --- the step -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimisation step; ``closure`` re-evaluates the loss (with gradients) and its value is returned.

        Parameters of one group, shape, dtype and device are stacked (``stack=True``) and updated together: one
        batched contraction per bucket instead of one per tensor. A bucket whose members do not all have a
        gradient this step is split: the members with one run as one batched call (``precond.buckets``).
        Under ``torch.compile`` it raises at once (:data:`COMPILE_REFUSAL`): use ``capture=True``.
        """
        refuse_compilation()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with tf32_matmuls(self.tf32) if self.tf32 is not None else contextlib.nullcontext():
            self.engine.step()
        return loss

    def accumulating(self) -> contextlib.AbstractContextManager:
        """With ``overlap_backward``: backward passes inside this block only accumulate gradients (run every
        micro-batch's backward but the last inside it). Without it, a no-op."""
        return self.engine.accumulating()

    # --- checkpoints --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim``; each group's preconditioner is stored as a plain description, never an object (the
        state-dict post-hooks see the dict that is returned, description included)."""
        self.engine.schedule.flush()
        post_hooks, self._optimizer_state_dict_post_hooks = self._optimizer_state_dict_post_hooks, OrderedDict()
        try:
            result = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
        for group in result["param_groups"]:
            group[_CONFIG_KEY] = describe(group[_CONFIG_KEY])
        for hook in list(post_hooks.values()):
            returned = hook(self, result)
            if returned is not None:
                result = returned
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim``: pre-hooks first (the dict a hook returns is what loads), then the load, then
        post-hooks (they see the loaded optimizer). Unlike it, the factor state keeps its saved dtype (float32
        for bfloat16 parameters), the preconditioners stay this optimizer's own, and a checkpoint of another
        configuration, other group sizes or state shapes that do not fit the parameters is refused with the
        optimizer left exactly as it was (:func:`precond.checkpoint.restore`). An older checkpoint whose ``step``
        is a plain number loads too."""
        state_dict = state_dict.copy()  # shallow, as torch: a hook may change the dict it is given
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            returned = hook(self, state_dict)
            if returned is not None:
                state_dict = returned
        groups, state = restore(self.param_groups, state_dict, self._name, check_hyperparameters)
        self.engine.schedule.discard()
        self.engine.forget_buckets()
        self.param_groups, self.state = groups, state
        self._names.update((id(p), name) for group in groups
                           for p, name in zip(group["params"], group.get("param_names", ()), strict=False))
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)
