"""A bucket's steady-state step, and the executors that run it.

:class:`BucketStep` is the one step of a bucket (``docs/design.md``, "Step order", 5): :meth:`BucketStep.direction`
(momentum, the estimator's ``prepare``, the applier and the fold: the preconditioned direction ``U``),
:meth:`BucketStep.finish` (the due basis refreshes and the step count) and the move of its parameters (decay and
``W ← W − η U``, by the runtime). An *executor* decides how that step runs for the buckets it takes, in the spirit
of optax's wrappers around one update:

- :class:`Eager` (every configuration): direction, finish and move, one bucket after another;
- ``precond.captured.Captured`` (``capture=``): direction and move recorded once as a CUDA graph and replayed;
- ``precond.overlap.InBackward`` (``overlap_backward=True``): direction and finish started by gradient hooks inside
  the backward pass; ``step()`` only moves.

Which executors a configuration has, and which combinations are refused, is one table
(``precond.compatibility.EXECUTORS`` and ``RULES``); each bucket runs in the first executor that takes it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Optional

import torch

from precond.buckets import Bucket
from precond.ema import Step, momentum_direction
from precond.precision import in_dtype
from precond.preconditioner import Momentum
from precond.state import STEP


class BucketStep:
    """The steady-state step of one bucket, in the three phases the executors arrange (module docstring), for the
    engine ``engine`` (``precond.engine.Engine``: its state dtype, schedule, runtime, fallbacks and member states).
    ``counts`` collects the step counts to advance at the end of ``step()`` (None outside it: advanced at once)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.counts: Optional[list[torch.Tensor]] = None
        self._indices: dict[tuple, torch.Tensor] = {}  # refresh positions as device tensors (_index)

    def advance(self, bucket: Bucket, grads: list[torch.Tensor]) -> torch.Tensor:
        """Direction and finish of step ``bucket.step + 1``: the update (``(B, *view)``), to be moved."""
        step = bucket.step + 1
        update = self.direction(bucket, grads, step)
        self.finish(bucket, step)
        return update

    def run(self, bucket: Bucket, grads: list[torch.Tensor]) -> None:
        """The whole step of ``bucket``: :meth:`advance`, then the runtime moves its parameters."""
        self.engine.runtime.move(bucket, self.advance(bucket, grads))

    def direction(self, bucket: Bucket, grads: list[torch.Tensor], step: Step,
                  fold: Optional[bool] = None) -> torch.Tensor:
        """The preconditioned (momentum) direction of a bucket (``(B, *view)``); folds the gradient. ``step`` may be
        a device tensor (a captured step), whose host-side decision ``fold`` is then given."""
        group, layout = bucket.group, bucket.layout
        grad = in_dtype(layout.stack(grads), self.engine.state_dtype)
        beta1 = group["momentum"]
        preconditioner = bucket.preconditioner
        rotation_dtype = group.get("rotation_dtype")
        if preconditioner.momentum_in_basis:  # the momentum folds the gradient's rotation, inside the preconditioner
            momentum = Momentum(beta1, group["nesterov"], group["bias_correction"]) if beta1 > 0 else None
            return preconditioner.precondition_in_basis(bucket.state, grad, layout, step, momentum, fold=fold,
                                                        rotation_dtype=rotation_dtype)
        source = grad
        if beta1 > 0:
            source = momentum_direction(bucket.state.momentum, grad, beta1, group["nesterov"],
                                        group["bias_correction"], step)
        if not preconditioner.folds_before_apply:
            return preconditioner.precondition(bucket.state, grad, source, layout, step, fold=fold,
                                               rotation_dtype=rotation_dtype)
        # Meta's order: fold step t's gradient, refresh (and install) what is due at t, then precondition with them
        preconditioner.fold(bucket.state, grad, layout, step, fold)
        if preconditioner.refreshes_at(step):
            self.refresh(bucket, step)
            self.engine.schedule.flush()
        return preconditioner.apply(bucket.state, grad, source, layout, step, rotation_dtype)

    def finish(self, bucket: Bucket, step: int) -> None:
        """After the update of ``step``: the due refreshes, then the step counts (inside ``step()`` collected and
        advanced with all the others at its end, :meth:`count`)."""
        if bucket.preconditioner.refreshes_at(step) and not bucket.preconditioner.folds_before_apply:
            self.refresh(bucket, step)
        every = bucket.preconditioner.basis.every
        if self.engine.drift is not None and every is not None and every > 1:
            self.measure_drift(bucket, step + 1)  # a step early, read at the next refresh without waiting
        bucket.step = step
        states = self.engine.states
        counts = [states[p][STEP] for p in bucket.params]
        if self.counts is not None:  # inside step(): added with every other bucket's at its end
            self.counts.extend(counts)
        else:  # a gradient hook (overlap_backward): at once
            torch._foreach_add_(counts, 1)

    def count(self) -> None:
        """Add 1 to every step count collected during this ``step()`` (one ``_foreach_add_`` over all buckets
        instead of one per bucket) and go back to counting at once."""
        counts, self.counts = self.counts, None
        if counts:
            torch._foreach_add_(counts, 1)

    def _due(self, bucket: Bucket, step: int) -> Iterator[tuple[int, list, list[int], Any]]:
        """For each refreshable mode ``k`` of ``bucket``: its units' keys, the positions among them due after
        ``step`` and their refresh index (the schedule planned on first sight of the keys)."""
        schedule, preconditioner = self.engine.schedule, bucket.preconditioner
        for k in preconditioner.refreshable_modes(bucket.layout):
            keys = [(id(p), k) for p in bucket.params]
            if not schedule.knows(keys):
                schedule.plan(self.engine.refresh_units())
            due, refresh_index = schedule.due(keys, preconditioner.basis.every, step)
            yield k, keys, due, refresh_index

    def refresh(self, bucket: Bucket, step: int) -> None:
        """Refresh the modes of ``bucket``'s members that the schedule says are due after ``step``."""
        engine = self.engine
        schedule, preconditioner = engine.schedule, bucket.preconditioner
        for k, keys, due, refresh_index in self._due(bucket, step):
            if due and engine.drift is not None:
                self._measure(bucket, k, keys, due, step)  # only where the start of the step did not (see there)
                due = engine.drift.select(keys, due, step)  # the bases that drifted (precond.drift)
            if not due:
                continue
            if engine.runtime.refresh(bucket, k, due, refresh_index):
                continue  # e.g. replicate mode: one rank computes it, every rank installs it
            device = bucket.params[0].device
            index = self._subset(due, keys, device)
            factor, basis = bucket.refresh_inputs(k, index)
            if schedule.asynchronous:
                factor = factor.clone()  # a snapshot: the next step's fold must not reach the side stream

            def compute(factor=factor, basis=basis, refresh_index=refresh_index):
                return preconditioner.compute_refresh(factor, basis, engine.fallbacks, refresh_index)

            if engine.refresh_graphs.takes(preconditioner.basis, device):  # precond.captured_refresh
                compute = functools.partial(engine.refresh_graphs.compute, bucket, k, compute, factor, basis)

            schedule.run(device, compute, functools.partial(bucket.install_refresh, k, index), (factor, basis))

    def measure_drift(self, bucket: Bucket, step: int) -> list:
        """``drift_tolerance``: measure the drift (``precond.drift``) of ``bucket``'s units due after ``step`` that
        are not measured yet, from the state as it is now — before ``step``'s fold: at the end of the step before
        (:meth:`finish`) or at the start of this one (the engine). Returns the keys of every unit due then."""
        if self.engine.drift is None:
            return []
        found = []
        for k, keys, due, _ in self._due(bucket, step):
            self._measure(bucket, k, keys, due, step)
            found += [keys[i] for i in due]
        return found

    def _measure(self, bucket: Bucket, k: int, keys: list, due: list[int], step: int) -> None:
        drift = self.engine.drift
        missing = [i for i in due if not drift.has(keys[i], step)]
        if not missing:
            return
        index = self._subset(missing, keys, bucket.params[0].device)
        factor, basis = bucket.refresh_inputs(k, index)
        drift.measure([keys[i] for i in missing], step, factor, basis, bucket.tracked_diagonal(k, index))

    def _subset(self, positions: list[int], keys: list, device: torch.device) -> Optional[torch.Tensor]:
        """The index of ``positions`` among a mode's ``keys`` for ``Bucket.refresh_inputs`` (None: all of them)."""
        return None if len(positions) == len(keys) else self._index(positions, device)

    def _index(self, positions: list[int], device: torch.device) -> torch.Tensor:
        """``torch.tensor(positions)`` on ``device``, made once per distinct list (staggered refreshes repeat the same
        few every ``T`` steps): no host-to-device copy per refresh."""
        key = (tuple(positions), device)
        if key not in self._indices:
            self._indices[key] = torch.tensor(positions, device=device)
        return self._indices[key]


class Executor:
    """How the steps of the buckets it takes run (module docstring). Built with the engine; the defaults take no
    bucket and do nothing else."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.bucket_step = engine.bucket_step

    def takes(self, bucket: Bucket) -> bool:
        """Whether this executor runs the step of ``bucket`` now (its members all have a gradient)."""
        return False

    def run(self, bucket: Bucket, grads: list[torch.Tensor]) -> None:
        """The step of ``bucket`` with ``grads`` (one per member), parameters moved (through the runtime)."""
        raise NotImplementedError

    def take(self) -> list[tuple[Bucket, torch.Tensor]]:
        """Start of ``step()``: the buckets stepped before it (in the backward pass) and their updates, to move."""
        return []

    def prepare(self, buckets: list[Bucket]) -> None:
        """The buckets of this step, before any is stepped."""

    def settle(self, buckets: list[Bucket]) -> None:
        """End of ``step()`` (also after a failure): the buckets as they are now."""

    def add_params(self, params: list[torch.Tensor]) -> None:
        """Parameters added to the optimizer (construction, ``add_param_group``)."""

    def accumulating(self) -> contextlib.AbstractContextManager:
        """Backward passes inside this block only accumulate gradients (``optimizer.accumulating()``)."""
        return contextlib.nullcontext()


class Eager(Executor):
    """Every bucket, one after another: direction, finish and move (:meth:`BucketStep.run`)."""

    def takes(self, bucket: Bucket) -> bool:
        return True

    def run(self, bucket: Bucket, grads: list[torch.Tensor]) -> None:
        self.bucket_step.run(bucket, grads)
