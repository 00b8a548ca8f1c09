"""The step behind ``precond.Optimizer``'s ``torch.optim`` shell (``docs/design.md``, "Architecture").

An :class:`Engine` belongs to one optimizer and is rebuilt with it (construction, unpickling). It owns the buckets
(``precond.buckets``), the refresh schedule (``precond.refresh_schedule``), the fallback counters, one runtime
(``precond.runtime``: where the work runs) and the executors (``precond.executors``: how each bucket's step runs),
both chosen by the compatibility table (``precond.compatibility``) from the optimizer's options. A step
(:meth:`Engine.step`): gather and check the gradients, let the runtime judge them (and pick this process's share),
install pending refreshes, (re)build and merge the buckets, initialise fresh parameters, then hand each bucket with
gradients to the first executor that takes it; the runtime moves the parameters and ends the step.

The engine is the runtimes' :class:`precond.runtime.Host`: they read it through that interface only.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Optional

import torch

from precond import compatibility
from precond.buckets import Bucket, Buckets
from precond.captured_refresh import RefreshGraphs
from precond.drift import DriftMonitor
from precond.executors import BucketStep, Executor
from precond.fallbacks import FallbackCounter
from precond.gradient_check import Work, verdict
from precond.layout import Layout
from precond.param_groups import check_hyperparameters, plain_hyperparameters
from precond.preconditioner import Preconditioner
from precond.refresh_schedule import RefreshSchedule
from precond.runtime import Runtime
from precond.state import STEP, new_step

OPTIONS = ("state_dtype", "on_nonfinite", "stack", "stagger", "async_refresh", "tf32", "capture", "overlap_backward",
           "distributed", "drift_tolerance", "refresh_budget")
"""The optimizer-wide options (``precond.Optimizer``'s keywords besides the group hyperparameters)."""


def option_features(options: dict[str, Any]) -> frozenset[str]:
    """The compatibility table's features of the optimizer-wide ``options`` (``precond.compatibility``)."""
    return compatibility.option_features(
        capture=options["capture"], overlap_backward=options["overlap_backward"],
        on_nonfinite=options["on_nonfinite"], async_refresh=options["async_refresh"],
        distributed=options["distributed"], drift=options.get("drift_tolerance") is not None)


def check_options(options: dict[str, Any]) -> None:
    """Refuse option values that do not exist and combinations the compatibility table refuses (construction)."""
    if options["on_nonfinite"] not in ("raise", "skip", "ignore"):
        raise ValueError(f"on_nonfinite must be 'raise', 'skip' or 'ignore', got {options['on_nonfinite']!r}")
    if options["capture"] not in (False, True, "emulate"):
        raise ValueError(f"capture must be False, True (CUDA graphs) or 'emulate' (the same path without graphs), "
                         f"got {options['capture']!r}")
    tolerance = options.get("drift_tolerance")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not 0.0 <= tolerance <= 1.0):
        raise ValueError(f"drift_tolerance must be None (refresh every T steps) or a number in [0, 1] (refresh a due "
                         f"basis only when the relative off-diagonal norm of QᵀSQ is at least it; e.g. 0.1), got "
                         f"{tolerance!r}")
    budget = options.get("refresh_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"refresh_budget must be None (no cap) or a positive integer B (each step refreshes at most "
                         f"the work Σ d³ / B of a fixed schedule of period B, most drifted bases first), got "
                         f"{budget!r}")
    if budget is not None and tolerance is None:
        raise ValueError("refresh_budget ranks the due bases by their drift, so it needs drift_tolerance: pass "
                         "drift_tolerance=0.0 to make every due basis a candidate, or a tolerance such as 0.2")
    compatibility.check(option_features(options))
    if options["state_dtype"] not in (torch.float32, torch.float64):
        raise ValueError(f"state_dtype must be torch.float32 or torch.float64, got {options['state_dtype']}")


class Engine:
    """The buckets, schedule, runtime and executors of ``optimizer`` (module docstring). ``options``: the values of
    :data:`OPTIONS`; ``names``: ``id(p) → name``, the optimizer's (kept up to date by it)."""

    def __init__(self, optimizer: torch.optim.Optimizer, options: dict[str, Any], names: dict[int, str]) -> None:
        self._optimizer = weakref.ref(optimizer)  # no cycle through the optimizer: it is freed as soon as unused
        self.options = {key: options.get(key, False if key in ("capture", "overlap_backward") else None)
                        for key in OPTIONS}
        self.state_dtype, self.on_nonfinite, self.stack, self.tf32 = (
            options["state_dtype"], options["on_nonfinite"], options["stack"], options["tf32"])
        self.names = names
        self.attached: list[Any] = []  # parts attached to the optimizer's steps (keep_attached)
        self.schedule = RefreshSchedule(stagger=options["stagger"], asynchronous=options["async_refresh"])
        tolerance = self.options["drift_tolerance"]
        self.drift = None if tolerance is None else DriftMonitor(float(tolerance), self.options["refresh_budget"],
                                                                   self.refresh_units)
        self.fallbacks = FallbackCounter()
        self.bucket_step = BucketStep(self)
        self.refresh_graphs = RefreshGraphs(self.options["capture"])
        self.runtime: Optional[Runtime] = None
        self.features = option_features(self.options)
        self.check_groups(self.param_groups)
        params = [p for group in self.param_groups for p in group["params"]]
        found = self.features | (compatibility.parameter_features(params) if self.options["distributed"] else set())
        self.runtime = compatibility.runtime(found).load()(self.options["distributed"], self)
        self.buckets = Buckets(self.key, self.runtime.members.of_group, self.layout_of)
        self.executors: list[Executor] = [line.load()(self) for line in compatibility.executors(found)]
        self.add_params(params)

    # --- what the runtimes read (precond.runtime.Host) ------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Whether the optimizer still exists (gradient hooks outlive it)."""
        return self._optimizer() is not None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._optimizer().param_groups

    @property
    def state(self) -> Any:
        return self._optimizer().state

    def name(self, p: torch.Tensor) -> str:
        owner = None if self.runtime is None else self.runtime.members.owner(p)
        if owner is not None:
            return f"{self.name(owner[0])} (block {owner[1]})"
        return self.names.get(id(p), f"of shape {tuple(p.shape)}")

    def verdict(self, work: Work, values: list[float]) -> Optional[Work]:
        return verdict(work, values, self.on_nonfinite, self.name, self.fallbacks)

    def refresh_units(self) -> list[tuple[tuple[int, int], int, int]]:
        units = []
        for group in self.param_groups:
            preconditioner: Preconditioner = group["preconditioner"]
            for p in self.runtime.members.of_group(group):
                layout = self.layout_of(group, p)
                for k in preconditioner.refreshable_modes(layout):
                    units.append(((id(p), k), layout.view_shape[k], preconditioner.basis.every))
        return units

    def refresh_offset(self, key: tuple[int, int]) -> Optional[int]:
        return self.schedule.offset(key)

    def forget_buckets(self) -> None:
        self.buckets.invalidate()
        if self.drift is not None:  # the state may have been replaced: measure again from it
            self.drift.forget()

    # --- the optimizer's shell asks ---------------------------------------------------------------------------------
    def check_groups(self, groups: list[dict[str, Any]]) -> None:
        """Refuse param groups whose parts do not work with the options (``precond.compatibility``)."""
        compatibility.check_groups(self.features, groups, self.name)

    def add_params(self, params: list[torch.Tensor]) -> None:
        for executor in self.executors:
            executor.add_params(params)
        if self.drift is not None:
            self.drift.units_changed()

    def accumulating(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        for executor in self.executors:
            stack.enter_context(executor.accumulating())
        return stack

    def keep_attached(self, part: Any) -> None:
        if all(kept is not part for kept in self.attached):
            self.attached.append(part)

    def stats(self) -> dict[str, int]:
        counts = self.fallbacks.as_dict()
        if self.drift is not None:
            counts.update(self.drift.totals())
        return self.runtime.stats(counts)

    def refresh_counts(self) -> dict[str, dict[int, dict[str, int]]]:
        """``precond.Optimizer.refresh_counts``: the drift monitor's counts per unit, keyed by parameter label."""
        if self.drift is None:
            return {}
        labels: dict[int, str] = {}
        members = [p for group in self.param_groups for p in self.runtime.members.of_group(group)]
        for i, p in enumerate(members):
            label = self.name(p)
            labels[id(p)] = label if label not in labels.values() else f"{label} #{i}"  # unnamed: same shapes
        out: dict[str, dict[int, dict[str, int]]] = {}
        for (identity, k), checks in self.drift.checks.items():
            name = labels.get(identity, f"unit {identity}")
            out.setdefault(name, {})[k] = {"checks": checks, "refreshes": self.drift.refreshes[(identity, k)],
                                           "deferred": self.drift.deferred[(identity, k)]}
        return out

    # --- members and buckets ----------------------------------------------------------------------------------------
    @property
    def states(self) -> Any:
        """The state dict of every member the buckets stack (a parameter, or a block of one)."""
        return self.runtime.members.states(self.state)

    def layout_of(self, group: dict[str, Any], member: torch.Tensor) -> Layout:
        return self.runtime.members.layout(member, group["preconditioner"])

    def key(self, group_index: int, p: torch.Tensor) -> tuple:
        """Members stack when they share a group, a layout (a parameter's plan of its shape, or a block's layout:
        blocks of a parameter and parameters of the block's shape stack together when viewed alike), a dtype and a
        device."""
        layout = self.layout_of(self.param_groups[group_index], p)
        return (group_index, layout, p.dtype, p.device, None if self.stack else id(p))

    # --- the step ---------------------------------------------------------------------------------------------------
    def step(self) -> None:
        early = [pair for executor in self.executors for pair in executor.take()]
        try:
            self._step(early)
        finally:
            buckets = list(self.buckets)
            for executor in self.executors:
                executor.settle(buckets)

    def _step(self, early: list[tuple[Bucket, torch.Tensor]]) -> None:
        try:
            work = self._gather()  # may refuse or skip the step: nothing is touched before it
        except Exception:
            self._discard()
            raise
        if work is None:
            self._discard()
            return
        self.bucket_step.counts = []  # the step counts, advanced in one op at the end (BucketStep.count)
        self.runtime.begin()
        try:
            self._run(work, early)
        finally:
            self.runtime.end()
            self.bucket_step.count()

    def _discard(self) -> None:
        """The step is refused or skipped before anything is touched: the attached parts drop its records."""
        for part in self.attached:
            part.discard()

    def _gather(self) -> Optional[Work]:
        """The ``(group, p, grad)`` of every parameter with a gradient, judged by the runtime; None when the step is
        skipped. Raises before anything is touched when the step must be refused."""
        for group in self.param_groups:  # cheap checks, no synchronisation: values may have changed since
            check_hyperparameters(plain_hyperparameters(group), read_tensor=False)
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(f"parameter {self.name(p)} has a sparse gradient; "
                                       "precond needs dense gradients (use nn.Embedding(sparse=False))")
                if grad.is_complex():
                    raise RuntimeError(f"parameter {self.name(p)} has a complex gradient; "
                                       "precond supports real tensors only")
                work.append((group, p, grad))
        return self.runtime.gradients(work)

    def _run(self, work: Work, early: list[tuple[Bucket, torch.Tensor]]) -> None:
        self.schedule.flush()
        members = self.runtime.members
        work = members.expand(work)  # a blocked parameter: one entry per block (precond.blocking)
        if members.changed:  # a blocked parameter's storage was replaced: its views were made again
            members.changed = False
            self.buckets.invalidate()
        states = self.states
        fresh = [(group, p, grad) for group, p, grad in work if not states[p]]
        if not self.buckets.built:
            self.buckets.rebuild(self.param_groups, states)
        self.buckets.consolidate(states)
        for bucket, update in self._initialize(fresh) if fresh else []:
            self.runtime.move(bucket, update)
        buckets = list(self.buckets)
        for executor in self.executors:
            executor.prepare(buckets)
        self.refresh_graphs.prepare(buckets)
        done = {id(p) for _, p, _ in fresh} | {id(p) for bucket, _ in early for p in bucket.params}
        grads = {id(p): grad for _, p, grad in work if id(p) not in done}
        for bucket, update in early:  # stepped during the backward pass (overlap_backward)
            self.runtime.move(bucket, update)
        if self.drift is not None:  # every due unit measured before the first decision (refresh_budget ranks them all)
            due = [key for bucket in buckets if any(id(p) in grads for p in bucket.params)
                   for key in self.bucket_step.measure_drift(bucket, bucket.step + 1)]  # before the fold
            self.drift.begin([key for key in due if key[0] in grads])
        for bucket in buckets:
            present = [i for i, p in enumerate(bucket.params) if id(p) in grads]
            if not present:
                continue
            if len(present) < len(bucket.params):
                bucket = self.buckets.split(bucket, present, states)
            bucket_grads = [grads[id(p)] for p in bucket.params]
            next(executor for executor in self.executors if executor.takes(bucket)).run(bucket, bucket_grads)
        self.runtime.finish()

    def _initialize(self, fresh: Work) -> list[tuple[Bucket, torch.Tensor]]:
        """First gradient of new parameters: a stacked initial fill per bucket; a preconditioner that
        ``updates_on_first_gradient`` also takes step 1 with it at once (its ``(bucket, update)`` are returned)."""
        moves = []
        index = {id(group): i for i, group in enumerate(self.param_groups)}
        batches: dict[tuple, list] = {}
        for group, p, grad in fresh:
            batches.setdefault(self.key(index[id(group)], p), []).append((group, p, grad))
        for key, items in batches.items():
            group = items[0][0]
            params = [p for _, p, _ in items]
            preconditioner: Preconditioner = group["preconditioner"]
            layout = self.layout_of(group, params[0])
            grad = torch.stack([layout.view(g) for _, _, g in items]).to(self.state_dtype)
            ps = preconditioner.init_state(grad, layout, self.fallbacks, tuple(params))
            if group["momentum"] > 0:
                ps.momentum = torch.zeros_like(grad)
            states = self.states
            for p in params:
                states[p][STEP] = new_step()
            bucket = self.buckets.add(key, params, group, ps.storage(), [states[p] for p in params])
            if preconditioner.updates_on_first_gradient:
                moves.append((bucket, self.bucket_step.advance(bucket, [g for _, _, g in items])))
        return moves
