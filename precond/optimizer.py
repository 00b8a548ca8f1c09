"""``precond.Optimizer``: a ``torch.optim.Optimizer`` that runs a :class:`Preconditioner` per parameter."""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional, Union

import attrs
import torch

from precond import compatibility
from precond.blocking import Blocks, Members, MemberStates
from precond.buckets import Bucket, Buckets
from precond.captured import CapturedSteps
from precond.checkpoint import allow_parts, describe, restore
from precond.ema import Step, bias_correction
from precond.fallbacks import FallbackCounter
from precond.gradient_check import largest_entries, verdict
from precond.layout import Layout
from precond.moves import PendingMoves, move
from precond.overlap import BackwardOverlap
from precond.param_groups import check_hyperparameters, named, params_list, plain_hyperparameters
from precond.precision import in_dtype, tf32_matmuls
from precond.preconditioner import Preconditioner
from precond.refresh_schedule import RefreshSchedule
from precond.state import BLOCKS, STEP, new_step

_CONFIG_KEY = "preconditioner"
_PART_KEYS = ("structure", "estimator", "basis", "applier", "first_step")

COMPILE_REFUSAL = (
    "precond.Optimizer.step cannot be compiled with torch.compile: the step runs Python control flow (buckets, "
    "refresh schedules, host-side checks) that TorchDynamo does not trace. For a faster step use capture=True (each "
    "bucket's steady-state update replayed as one CUDA graph, precond.captured). To compile the rest of training, "
    "compile the model (torch.compile(model)) and call optimizer.step() outside the compiled function, or call "
    "torch.compiler.disable(optimizer.step)() inside it")


def _refusal() -> bool:
    """Raise :data:`COMPILE_REFUSAL` (a no-op ``False`` outside TorchDynamo's tracing).

    Marked by ``torch.compiler.assume_constant_result`` (when an optimizer is built), so TorchDynamo runs it for real
    while tracing and the error reaches the user as it is: a plain ``raise`` would become a graph break (an error of
    its own with ``fullgraph=True``), then run eagerly, where the check is false. A ``UserError`` (TorchDynamo's
    "valid in eager, not supported here", a ``RuntimeError``) is re-raised unchanged, where any other exception would
    be wrapped as an internal error of TorchDynamo's."""
    if torch.compiler.is_compiling():
        try:
            from torch._dynamo.exc import UserError, UserErrorType
        except ImportError:  # pragma: no cover - a torch without TorchDynamo's user errors
            raise RuntimeError(COMPILE_REFUSAL) from None
        raise UserError(UserErrorType.ANTI_PATTERN, COMPILE_REFUSAL)
    return False


def _refuse_compilation(*hook_args: Any) -> None:
    """Refuse ``torch.compile`` of ``step()``: the first step pre-hook of every :class:`Optimizer` (before any other
    hook, K-FAC's statistics exchange, is traced) and the first line of :meth:`Optimizer.step`. Eagerly it costs one
    flag check."""
    if torch.compiler.is_compiling():
        _refusal()


class Optimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` running ``preconditioner`` on every parameter (per-group overrides allowed).

    The optimizer owns only what is not a preconditioner part (``docs/design.md``, "Parts"):

    - ``lr`` η (float or tensor, schedulable);
    - ``momentum`` β₁: ``m ← β₁ m + (1−β₁) g`` in the original space (0 = none); ``nesterov`` uses
      ``(1−β₁) g + β₁ m`` as the direction;
    - ``weight_decay``: decoupled, ``W ← W − η·wd·W``, applied ``decay_order="before"`` the update (AdamW)
      or ``"after"`` it (SOAP, the KL-Shampoo prototype);
    - ``bias_correction``: use ``m̂ = m / (1−β₁ᵗ)`` (Adam, SOAP) instead of ``m``;
    - the step count ``state[p]["step"]`` (number of parameter updates, ``t = 1`` at the first one).

    Factor state lives in ``state_dtype`` (float32 by default, whatever the parameter dtype: bfloat16 loses the
    ``1−ρ`` increments and the orthogonality of ``Q``); the update is scaled by ``η`` in that dtype and cast to
    the parameter's dtype last (a float16 weight never sees an unscaled update).

    ``on_nonfinite`` — every step first reads the largest ``|g|`` of each gradient (and a tensor ``lr``), one host
    synchronisation, before anything is touched:

    - ``"raise"`` (default): a NaN/Inf gradient or ``lr`` raises ``FloatingPointError``, leaving all state as it was;
    - ``"skip"``: such a step is skipped instead (nothing changes, the step is not counted), counted in
      ``stats()["nonfinite_skipped"]`` and warned about once;
    - ``"ignore"``: no check at all (``step()`` never synchronises with the device).

    With ``"raise"`` and ``"skip"``, a finite gradient whose largest entry exceeds ``2⁴⁰`` (≈1.1e12, far beyond
    healthy training, where float32 grams start to risk overflow) is scaled by a power of two (exact) down to that
    bound before momentum and statistics see it, counted in ``stats()["gradient_rescaled"]``: gradients up to
    float32's range leave the parameters finite.

    Speed (see ``docs/benchmarks.md``): ``stack`` batches parameters of equal layout (``False`` is the simple
    reference path, with the same updates); ``stagger`` spreads the basis refreshes over the ``T`` steps so no
    step spikes (each factor still refreshes every ``T`` steps, at its own phase); ``async_refresh`` runs them on
    side CUDA streams, overlapped with the next forward/backward and installed before the next update (the same
    updates as without it); ``tf32``
    True/False forces TF32 on/off for the per-step products (refresh products always run in full float32),
    ``None`` leaves torch's global setting alone. ``capture=True`` replays each bucket's steady-state update as one
    CUDA graph (``precond.captured``: the same updates to float32 round-off, refreshes still eager);
    ``"emulate"`` runs that path without graphs (its CPU reference). ``torch.compile(optimizer.step)`` is refused
    with :data:`COMPILE_REFUSAL` (the step is Python control flow TorchDynamo does not trace): use ``capture=True``;
    ``torch.compile(model)`` with an eager ``step()`` works. ``overlap_backward=True`` starts each bucket's
    preconditioning inside the backward pass, as soon as its gradients are final (``precond.overlap``: the same
    updates; needs ``on_nonfinite="ignore"``, no gradient clipping or unscaling between backward and ``step()``,
    and ``with optimizer.accumulating():`` around all but the last backward of an accumulated step).

    A parameter that its structure cuts into blocks (``NMode(max_dim=b, large="block")``, Meta's blocking) is
    stepped as its blocks, each a parameter of its own (``precond.blocking``): its state is
    ``state[p] = {"blocks": {"0": …, …}}`` and :meth:`layout` gives its ``Blocks``. Not with ``overlap_backward`` or
    ``distributed`` (refused at construction).

    ``rotation_dtype`` (opt-in, a group hyperparameter: ``torch.bfloat16`` or ``torch.float16``; ``None``, the
    default, changes nothing): the applier's rotations of the direction into the eigenbasis and back
    (``M ×_k Q_k`` and ``R ×_k Q_kᵀ``, most of a step's matmul work) take operands rounded to that dtype and
    accumulate in ``state_dtype`` (``precond.contractions``); the bases, factors, spectra and every other product stay
    in ``state_dtype``. It works with ``capture``, ``overlap_backward`` and ``distributed`` (they run the same
    apply); ``docs/benchmarks.md`` ("bf16 rotations") measures its effect on the final loss.

    ``distributed`` (optional, ``precond.DataParallel(...)``): spread the work and (``mode="owner"``) the state over
    the ranks of a process group, with the same updates (``precond.distributed``, ``docs/scaling.md``); then
    ``stats()`` is a collective, and in owner mode each rank's ``state_dict()`` holds only the parameters it owns
    (checkpoint through ``torch.distributed.checkpoint``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        preconditioner: Preconditioner,
        lr: Union[float, torch.Tensor] = 1e-3,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        decay_order: str = "before",
        bias_correction: bool = False,
        state_dtype: torch.dtype = torch.float32,
        on_nonfinite: str = "raise",
        stack: bool = True,
        stagger: bool = False,
        async_refresh: bool = False,
        tf32: Optional[bool] = None,
        capture: Union[bool, str] = False,
        overlap_backward: bool = False,
        distributed: Optional[Any] = None,
        rotation_dtype: Optional[torch.dtype] = None,
    ) -> None:
        if on_nonfinite not in ("raise", "skip", "ignore"):
            raise ValueError(f"on_nonfinite must be 'raise', 'skip' or 'ignore', got {on_nonfinite!r}")
        if capture not in (False, True, "emulate"):
            raise ValueError(f"capture must be False, True (CUDA graphs) or 'emulate' (the same path without graphs), "
                             f"got {capture!r}")
        compatibility.check(compatibility.option_features(  # the combinations that cannot work: one table
            capture=capture, overlap_backward=overlap_backward, on_nonfinite=on_nonfinite, async_refresh=async_refresh,
            distributed=distributed))
        if state_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"state_dtype must be torch.float32 or torch.float64, got {state_dtype}")
        self._names: dict[int, str] = {}
        self._attached: list[Any] = []  # parts attached to this optimizer's steps (_keep_attached)
        params = params_list(params)
        defaults = plain_hyperparameters(dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, decay_order=decay_order,
            bias_correction=bias_correction, rotation_dtype=rotation_dtype, preconditioner=preconditioner))
        super().__init__(params, defaults)
        self._configure(dict(state_dtype=state_dtype, on_nonfinite=on_nonfinite, stack=stack, stagger=stagger,
                             async_refresh=async_refresh, tf32=tf32, capture=capture,
                             overlap_backward=overlap_backward, distributed=distributed))

    def _configure(self, options: dict[str, Any]) -> None:
        """The optimizer-wide options and the run-time machinery built from them (also after unpickling)."""
        # torch.optim's constructor has imported TorchDynamo by now: marking costs nothing (importing precond does not)
        torch.compiler.assume_constant_result(_refusal)
        self.register_step_pre_hook(_refuse_compilation)  # the first hook: before K-FAC's is traced
        self.state_dtype = options["state_dtype"]
        self.on_nonfinite = options["on_nonfinite"]
        self.stack = options["stack"]
        self.tf32 = options["tf32"]
        self._schedule = RefreshSchedule(stagger=options["stagger"], asynchronous=options["async_refresh"])
        self._members = Members()
        self._buckets = Buckets(self._bucket_key, self._members.of_group, self._member_layout)
        self._fallbacks = FallbackCounter()
        self._indices: dict[tuple, torch.Tensor] = {}  # refresh positions as device tensors (_index)
        self._counts: Optional[list[torch.Tensor]] = None  # step counts to advance at the end of step() (_finish)
        self._pending: Optional[PendingMoves] = None  # parameter moves held back within step() (_apply_moves)
        self.capture = options.get("capture", False)
        self._captured = CapturedSteps(use_graphs=self.capture is True) if self.capture else None
        self.overlap_backward = options.get("overlap_backward", False)
        self._distributed_config = options.get("distributed")
        self._check_groups(self.param_groups)
        self._overlap = BackwardOverlap(self) if self.overlap_backward else None
        if self._overlap is not None:
            self._overlap.register([p for group in self.param_groups for p in group["params"]])
        # [distributed] the optional fifth part (precond.DataParallel): None is the single-process path
        self._distributed = None if self._distributed_config is None else self._distributed_config.attach(self)

    def _options(self) -> dict[str, Any]:
        return dict(state_dtype=self.state_dtype, on_nonfinite=self.on_nonfinite, stack=self.stack,
                    stagger=self._schedule.stagger, async_refresh=self._schedule.asynchronous, tf32=self.tf32,
                    capture=self.capture, overlap_backward=self.overlap_backward,
                    distributed=self._distributed_config)

    def __getstate__(self) -> dict[str, Any]:
        """As ``torch.optim`` (``defaults``, ``state``, ``param_groups``) plus this optimizer's options and parameter
        names, so ``copy.deepcopy`` and pickling give an optimizer that steps exactly like this one. Pending
        asynchronous refreshes are installed first; buckets and streams are rebuilt on the copy's first step."""
        self._schedule.flush()
        params = [p for group in self.param_groups for p in group["params"]]
        attached = [(part, [name for name, value in vars(self).items() if value is part]) for part in self._attached]
        return {**super().__getstate__(), "options": self._options(),
                "names": [self._names.get(id(p)) for p in params], "attached": attached}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "options" not in state:  # torch.optim's load_state_dict passes only state and param_groups
            super().__setstate__(state)
            return
        options, names, attached = state.pop("options"), state.pop("names", []), state.pop("attached", [])
        super().__setstate__(state)
        params = [p for group in self.param_groups for p in group["params"]]
        self._names = {id(p): name for p, name in zip(params, names) if name is not None}
        self._configure(options)  # after the names: its checks name the parameters they refuse
        self._attached = []
        for part, attributes in attached:  # the copied part (K-FAC's capture) on this copy's steps, as the original
            part.attach(self)
            for attribute in attributes:  # e.g. the preset's optimizer.kfac_capture
                setattr(self, attribute, part)

    def _keep_attached(self, part: Any) -> None:
        """Keep ``part``, whose ``attach(optimizer)`` registered hooks on this optimizer's steps (K-FAC's
        :class:`precond.KFACCapture`, which records layer statistics for each step): a step refused or skipped
        (``on_nonfinite``) calls ``part.discard()``, so what it recorded for that step is dropped, and a copy of this
        optimizer (``copy.deepcopy``, pickle) attaches its copy of ``part`` again (torch.optim's copies keep no
        hooks), with the attributes of this optimizer that hold it."""
        if all(kept is not part for kept in self._attached):
            self._attached.append(part)

    def _discard_step(self) -> None:
        """The step is refused or skipped before anything is touched: the attached parts drop its records."""
        for part in self._attached:
            part.discard()

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
        if hasattr(self, "_members"):  # a group added after construction (during it, _configure checks them all)
            try:
                self._check_groups([added])
            except ValueError:
                self.param_groups.pop()
                raise
        self._names.update(zip(map(id, added["params"]), added.get("param_names", ())))
        allow_parts(added[_CONFIG_KEY])
        if getattr(self, "_overlap", None) is not None:
            self._overlap.register(added["params"])

    # --- helpers ---------------------------------------------------------------------------------
    def _name(self, p: torch.Tensor) -> str:
        owner = self._members.owner(p) if hasattr(self, "_members") else None
        if owner is not None:
            return f"{self._name(owner[0])} (block {owner[1]})"
        return self._names.get(id(p), f"of shape {tuple(p.shape)}")

    def _check_groups(self, groups: list[dict[str, Any]]) -> None:
        """Refuse param groups whose parts do not work with this optimizer's options (``precond.compatibility``:
        blocked parameters with ``overlap_backward``, ``distributed`` or K-FAC's whole-layer statistics)."""
        options = compatibility.option_features(
            capture=self.capture, overlap_backward=self.overlap_backward, on_nonfinite=self.on_nonfinite,
            async_refresh=self._schedule.asynchronous, distributed=self._distributed_config)
        compatibility.check_groups(options, groups, self._name)

    @property
    def _states(self) -> MemberStates:
        """The state dict of every member the buckets stack (a parameter, or a block of one)."""
        return self._members.states(self.state)

    def _member_layout(self, group: dict[str, Any], member: torch.Tensor) -> Layout:
        return self._members.layout(member, group[_CONFIG_KEY])

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
        return tuple(self._buckets)

    def refresh_offset(self, p: torch.Tensor, k: int) -> Optional[int]:
        """The stagger offset ``o`` of mode ``k`` of ``p`` (refreshed after steps with ``(t + o) mod T = 0``), or
        None before the schedule was planned (the first step) or for a mode without a refreshed basis."""
        return self._schedule.offset((id(p), k))

    @property
    def stagger(self) -> bool:
        """Basis refreshes spread over the ``T`` steps (an option of the constructor)."""
        return self._schedule.stagger

    @property
    def async_refresh(self) -> bool:
        """Basis refreshes on side CUDA streams, installed before the next update (an option of the constructor)."""
        return self._schedule.asynchronous

    def pending_refreshes(self) -> int:
        """How many asynchronous refreshes wait to be installed (at the start of the next step)."""
        return len(self._schedule.pending)

    def stats(self) -> dict[str, int]:
        """Counts of numerical fallbacks taken so far: ``eigh_jitter``, ``eigh_float64``, ``eigh_kept_old_basis``,
        ``cholesky_qr_kept_old_basis`` (reading the last one synchronises with the device)."""
        counts = self._fallbacks.as_dict()
        return counts if self._distributed is None else self._distributed.stats(counts)  # [distributed] collective

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

    # --- the step --------------------------------------------------------------------------------
    def _gather(self) -> Optional[list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]]:
        """The ``(group, p, grad)`` of every parameter with a gradient, checked; None when the step is skipped.
        Raises before anything is touched when the step must be refused."""
        for group in self.param_groups:  # cheap checks, no synchronisation: values may have changed since
            check_hyperparameters(plain_hyperparameters(group), read_tensor=False)
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(f"parameter {self._name(p)} has a sparse gradient; "
                                       "precond needs dense gradients (use nn.Embedding(sparse=False))")
                if grad.is_complex():
                    raise RuntimeError(f"parameter {self._name(p)} has a complex gradient; "
                                       "precond supports real tensors only")
                work.append((group, p, grad))
        if self._distributed is not None:  # [distributed] this rank's share, the verdict agreed by all ranks
            return self._distributed.gathered(self, work)
        if self.on_nonfinite == "ignore" or not work:
            return work
        return self._checked(work)

    def _checked(self, work: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]):
        """One host synchronisation for the largest ``|g|`` of every gradient and every tensor ``lr``, then
        :meth:`_verdict`."""
        lrs = [group["lr"] for group in self.param_groups if isinstance(group["lr"], torch.Tensor)]
        return self._verdict(work, largest_entries([g for _, _, g in work], lrs))

    def _verdict(self, work: list[tuple[dict[str, Any], torch.Tensor, Optional[torch.Tensor]]], values: list[float]):
        """``precond.gradient_check.verdict`` with this optimizer's policy, names and counters (also called by the
        distributed runtime with the values all ranks agreed on)."""
        return verdict(work, values, self.on_nonfinite, self._name, self._fallbacks)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimisation step; ``closure`` re-evaluates the loss (with gradients) and its value is returned.

        Parameters of one group, shape, dtype and device are stacked (``stack=True``) and updated together: one
        batched contraction per bucket instead of one per tensor. A bucket whose members do not all have a
        gradient this step is split: the members with one run as one batched call (``precond.buckets``).
        Under ``torch.compile`` it raises at once (:data:`COMPILE_REFUSAL`): use ``capture=True``.
        """
        _refuse_compilation()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with contextlib.ExitStack() as stack:
            if self.tf32 is not None:
                stack.enter_context(tf32_matmuls(self.tf32))
            self._step()
        return loss

    def accumulating(self) -> contextlib.AbstractContextManager:
        """With ``overlap_backward``: backward passes inside this block only accumulate gradients (run every
        micro-batch's backward but the last inside it). Without it, a no-op."""
        return self._overlap.accumulating() if self._overlap is not None else contextlib.nullcontext()

    def _step(self) -> None:
        started = self._overlap.take() if self._overlap is not None else []
        try:
            self._step_buckets(started)
        finally:
            if self._overlap is not None:
                self._overlap.index(list(self._buckets))

    def _step_buckets(self, started: list[tuple[Bucket, torch.Tensor]]) -> None:
        try:
            work = self._gather()  # may refuse or skip the step: nothing is touched before it
        except Exception:
            self._discard_step()
            raise
        if work is None:
            self._discard_step()
            return
        self._counts = []  # the step counts that _finish advances, in one op at the end (_count_steps)
        self._pending = PendingMoves() if self._distributed is None else None  # the moves, made together
        try:
            self._run_buckets(work, started)
        finally:
            pending, self._pending = self._pending, None
            if pending is not None:
                pending.flush()
            self._count_steps()

    def _count_steps(self) -> None:
        """Add 1 to every step count that :meth:`_finish` collected during this ``step()`` (one ``_foreach_add_``
        over all buckets instead of one per bucket) and go back to counting at once."""
        counts, self._counts = self._counts, None
        if counts:
            torch._foreach_add_(counts, 1)

    def _run_buckets(self, work: list, started: list[tuple[Bucket, torch.Tensor]]) -> None:
        self._schedule.flush()
        work = self._members.expand(work)  # a blocked parameter: one entry per block (precond.blocking)
        if self._members.changed:  # a blocked parameter's storage was replaced: its views were made again
            self._members.changed = False
            self._buckets.invalidate()
        states = self._states
        fresh = [(group, p, grad) for group, p, grad in work if not states[p]]
        if not self._buckets.built:
            self._buckets.rebuild(self.param_groups, states)
        self._buckets.consolidate(states)
        moves = self._initialize(fresh) if fresh else []
        self._apply_moves(moves)
        if self._captured is not None:
            self._captured.forget_missing(list(self._buckets))
        done = {id(p) for _, p, _ in fresh} | {id(p) for bucket, _ in started for p in bucket.params}
        grads = {id(p): grad for _, p, grad in work if id(p) not in done}
        self._apply_moves(started)  # started during the backward pass (overlap_backward)
        for bucket in list(self._buckets):
            present = [i for i, p in enumerate(bucket.params) if id(p) in grads]
            if not present:
                continue
            if len(present) < len(bucket.params):
                bucket = self._buckets.split(bucket, present, states)
            bucket_grads = [grads[id(p)] for p in bucket.params]
            if self._captured is not None and self._captured.applies_to(bucket):
                self._captured.update(self, bucket, bucket_grads)
                self._finish(bucket, bucket.step + 1)
                continue
            moves.append((bucket, self._advance(bucket, bucket_grads)))
            self._apply_moves(moves)
        if self._distributed is not None:  # [distributed] exchange the updates (or refreshes), move the parameters
            self._distributed.finish(self)

    def _apply_moves(self, moves: list[tuple[Bucket, torch.Tensor]]) -> None:
        """Move the parameters of each ``(bucket, update)`` and empty the list: at once, or inside ``step()`` held back
        and made with the other buckets' moves (a bounded number of update entries, ``precond.moves``)."""
        while moves:
            bucket, update = moves.pop(0)
            if self._distributed is not None and self._distributed.stage(self, bucket, update):  # [distributed]
                continue
            if self._pending is not None:  # inside step(): with the other buckets' moves (precond.moves)
                self._pending.add(bucket.group, bucket.params, update, bucket.layout)
            else:
                self._apply(bucket.group, bucket.params, update, bucket.layout)

    def _bucket_key(self, group_index: int, p: torch.Tensor) -> tuple:
        """Members stack when they share a group, a layout (a parameter's plan of its shape, or a block's layout:
        blocks of a parameter and parameters of the block's shape stack together when viewed alike), a dtype and a
        device."""
        layout = self._member_layout(self.param_groups[group_index], p)
        return (group_index, layout, p.dtype, p.device, None if self.stack else id(p))

    def _initialize(
        self, fresh: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]
    ) -> list[tuple[Bucket, torch.Tensor]]:
        """First gradient of new parameters: a stacked initial fill per bucket; a preconditioner that
        ``updates_on_first_gradient`` also takes step 1 with it at once (its ``(bucket, update)`` are returned)."""
        moves = []
        index = {id(group): i for i, group in enumerate(self.param_groups)}
        batches: dict[tuple, list] = {}
        for group, p, grad in fresh:
            batches.setdefault(self._bucket_key(index[id(group)], p), []).append((group, p, grad))
        for key, items in batches.items():
            group = items[0][0]
            params = [p for _, p, _ in items]
            preconditioner: Preconditioner = group[_CONFIG_KEY]
            layout = self._member_layout(group, params[0])
            grad = torch.stack([layout.view(g) for _, _, g in items]).to(self.state_dtype)
            ps = preconditioner.init_state(grad, layout, self._fallbacks, tuple(params))
            if group["momentum"] > 0:
                ps.momentum = torch.zeros_like(grad)
            states = self._states
            for p in params:
                states[p][STEP] = new_step()
            bucket = self._buckets.add(key, params, group, ps.storage(), [states[p] for p in params])
            if preconditioner.updates_on_first_gradient:
                moves.append((bucket, self._advance(bucket, [g for _, _, g in items])))
        return moves

    def _advance(self, bucket: Bucket, grads: list[torch.Tensor]) -> torch.Tensor:
        """One step of the state of every member of ``bucket``: its update (returned, ``(B, *view)``), the due
        refreshes and the step counts; the parameters are moved afterwards (:meth:`_apply`)."""
        step = bucket.step + 1
        update = self._direction(bucket, grads, step)
        self._finish(bucket, step)
        return update

    def _advance_checked(self, bucket: Bucket, grads: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`_advance` started from a gradient hook (``overlap_backward``): the group is checked first."""
        check_hyperparameters(plain_hyperparameters(bucket.group), read_tensor=False)
        return self._advance(bucket, grads)

    def _finish(self, bucket: Bucket, step: int) -> None:
        """After the update of ``step``: the due refreshes, then the step counts (inside ``step()`` collected and
        advanced with all the others at its end, :meth:`_count_steps`)."""
        if bucket.preconditioner.folds_at(step) and not bucket.preconditioner.folds_before_apply:
            self._refresh(bucket, step)
        bucket.step = step
        states = self._states
        counts = [states[p][STEP] for p in bucket.params]
        if self._counts is not None:  # inside step(): added with every other bucket's at its end
            self._counts.extend(counts)
        else:  # a gradient hook (overlap_backward): at once
            torch._foreach_add_(counts, 1)

    def _direction(self, bucket: Bucket, grads: list[torch.Tensor], step: Step,
                   fold: Optional[bool] = None) -> torch.Tensor:
        """The preconditioned (momentum) direction of a bucket (``(B, *view)``); folds the gradient. ``step`` may be
        a device tensor (a captured step), whose host-side decision ``fold`` is then given."""
        group, layout = bucket.group, bucket.layout
        grad = in_dtype(layout.stack(grads), self.state_dtype)
        beta1 = group["momentum"]
        source = grad
        if beta1 > 0:
            m = bucket.state.momentum
            m.lerp_(grad, 1.0 - beta1)
            source = grad.lerp(m, beta1) if group["nesterov"] else m
            if group["bias_correction"]:
                source = source / bias_correction(beta1, step)
        preconditioner = bucket.preconditioner
        rotation_dtype = group.get("rotation_dtype")
        if not preconditioner.folds_before_apply:
            return preconditioner.precondition(bucket.state, grad, source, layout, step, fold=fold,
                                               rotation_dtype=rotation_dtype)
        # Meta's order: fold step t's gradient, refresh (and install) what is due at t, then precondition with them
        preconditioner.fold(bucket.state, grad, layout, step, fold)
        if preconditioner.folds_at(step):
            self._refresh(bucket, step)
            self._schedule.flush()
        return preconditioner.apply(bucket.state, grad, source, layout, step, rotation_dtype)

    def _refresh(self, bucket: Bucket, step: int) -> None:
        """Refresh the modes of ``bucket``'s members that the schedule says are due after ``step``."""
        preconditioner = bucket.preconditioner
        for k in preconditioner.refreshable_modes(bucket.layout):
            keys = [(id(p), k) for p in bucket.params]
            if not self._schedule.knows(keys):
                self._schedule.plan(self._refresh_units())
            due, refresh_index = self._schedule.due(keys, preconditioner.basis.every, step)
            if not due:
                continue
            if self._distributed is not None and self._distributed.refresh(self, bucket, k, due, refresh_index):
                continue  # [distributed] replicate mode: one rank computes it, every rank installs it
            device = bucket.params[0].device
            index = None if len(due) == len(keys) else self._index(due, device)
            factor, basis = bucket.refresh_inputs(k, index)
            if self._schedule.asynchronous:
                factor = factor.clone()  # a snapshot: the next step's fold must not reach the side stream

            def compute(factor=factor, basis=basis, refresh_index=refresh_index):
                return preconditioner.compute_refresh(factor, basis, self._fallbacks, refresh_index)

            self._schedule.run(device, compute, functools.partial(bucket.install_refresh, k, index), (factor, basis))

    def _index(self, positions: list[int], device: torch.device) -> torch.Tensor:
        """``torch.tensor(positions)`` on ``device``, made once per distinct list (staggered refreshes repeat the same
        few every ``T`` steps): no host-to-device copy per refresh."""
        key = (tuple(positions), device)
        if key not in self._indices:
            self._indices[key] = torch.tensor(positions, device=device)
        return self._indices[key]

    def _refresh_units(self) -> list[tuple[tuple[int, int], int, int]]:
        """Every refreshable mode of every member (parameter or block), in parameter order: ``((id(p), k), d_k, T)``."""
        units = []
        for group in self.param_groups:
            preconditioner: Preconditioner = group[_CONFIG_KEY]
            for p in self._members.of_group(group):
                layout = self._member_layout(group, p)
                for k in preconditioner.refreshable_modes(layout):
                    units.append(((id(p), k), layout.view_shape[k], preconditioner.basis.every))
        return units

    @staticmethod
    def _apply(group: dict[str, Any], params: list[torch.Tensor], update: torch.Tensor, layout: Layout,
               lr: Union[float, torch.Tensor, None] = None) -> None:
        """Decoupled weight decay and ``W ← W − η U``: ``η U`` is formed in the state dtype and cast to the
        parameters' dtype last (one arithmetic path for a float and a tensor ``lr``; ``lr`` overrides the group's)."""
        move(group, [(params, update, layout)], lr)

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim``; each group's preconditioner is stored as a plain description, never an object (the
        state-dict post-hooks see the dict that is returned, description included)."""
        self._schedule.flush()
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
        self._schedule.discard()
        self._buckets.invalidate()
        self.param_groups, self.state = groups, state
        self._names.update((id(p), name) for group in groups
                           for p, name in zip(group["params"], group.get("param_names", ())))
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)
