"""``precond.Optimizer``: a ``torch.optim.Optimizer`` that runs a :class:`Preconditioner` per parameter."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterable, Optional, Union

import attrs
import torch

from precond.buckets import Bucket, Buckets, map_leaves
from precond.precision import tf32_matmuls
from precond.refresh_schedule import RefreshSchedule
from precond.layout import Layout
from precond.preconditioner import Preconditioner
from precond.state import STEP, new_step
from precond.fallbacks import FallbackCounter
from precond.validators import is_number

_CONFIG_KEY = "preconditioner"
_GRADIENT_BOUND = 2.0**40
_PART_KEYS = ("structure", "estimator", "basis", "applier", "first_step")


def _check_lr(lr: Any, read_tensor: bool) -> None:
    """``lr`` must be a finite number ≥ 0 or a one-element floating tensor (its value is read only when
    ``read_tensor``: at construction; at ``step()`` it joins the gradients' finiteness check instead)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"lr as a tensor must hold one floating-point value, got shape {tuple(lr.shape)} and "
                             f"dtype {lr.dtype}; pass a float or e.g. torch.tensor(1e-3)")
        if not read_tensor:
            return
        value = float(lr.detach().reshape(()).item())
    elif is_number(lr):
        value = float(lr)
    else:
        raise ValueError(f"lr must be a number or a one-element tensor, got {type(lr).__name__} {lr!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"lr must be a finite number ≥ 0, got {lr!r}")


def _check_hyperparameters(group: dict[str, Any], read_tensor: bool = True) -> None:
    """Refuse a group whose hyperparameters would break the step, naming the field and what it accepts."""
    _check_lr(group["lr"], read_tensor)
    momentum, weight_decay = group["momentum"], group["weight_decay"]
    if not (is_number(momentum) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum (β₁ of the EMA m ← β₁m + (1−β₁)g) must be a number in [0, 1), got {momentum!r}")
    if group["nesterov"] and momentum == 0:
        raise ValueError("nesterov=True needs momentum > 0")
    if not (is_number(weight_decay) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number ≥ 0, got {weight_decay!r}")
    if group["decay_order"] not in ("before", "after"):
        raise ValueError(f"decay_order must be 'before' (AdamW) or 'after' (SOAP, KL prototype), got {group['decay_order']!r}")
    if not isinstance(group["bias_correction"], bool):
        raise ValueError(f"bias_correction must be True or False, got {group['bias_correction']!r}")
    if not isinstance(group[_CONFIG_KEY], Preconditioner):
        raise TypeError(f"preconditioner must be a precond.Preconditioner, got {type(group[_CONFIG_KEY]).__name__}")


def _split_names(params: Any) -> tuple[Any, dict[int, str]]:
    """Accept ``model.named_parameters()`` as well as parameters or param-group dicts."""
    params = list(params) if not isinstance(params, torch.Tensor) else [params]
    names: dict[int, str] = {}

    def strip(items):
        out = []
        for item in items:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                names[id(item[1])] = item[0]
                out.append(item[1])
            else:
                out.append(item)
        return out

    if params and isinstance(params[0], dict):
        groups = []
        for group in params:
            group = dict(group)
            group["params"] = strip(list(group["params"]) if not isinstance(group["params"], torch.Tensor) else [group["params"]])
            groups.append(group)
        return groups, names
    return strip(params), names


def _describe_config(obj: Any) -> Any:
    """Plain-data description of a frozen attrs configuration (kept in ``state_dict`` instead of objects)."""
    if attrs.has(type(obj)):
        return {"class": type(obj).__qualname__, **{f.name: _describe_config(getattr(obj, f.name)) for f in attrs.fields(type(obj))}}
    return obj


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
    ``None`` leaves torch's global setting alone.

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
        distributed: Optional[Any] = None,
    ) -> None:
        if on_nonfinite not in ("raise", "skip", "ignore"):
            raise ValueError(f"on_nonfinite must be 'raise', 'skip' or 'ignore', got {on_nonfinite!r}")
        if state_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"state_dtype must be torch.float32 or torch.float64, got {state_dtype}")
        params, self._names = _split_names(params)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        decay_order=decay_order, bias_correction=bias_correction, preconditioner=preconditioner)
        super().__init__(params, defaults)
        self._configure(dict(state_dtype=state_dtype, on_nonfinite=on_nonfinite, stack=stack, stagger=stagger,
                             async_refresh=async_refresh, tf32=tf32, distributed=distributed))

    def _configure(self, options: dict[str, Any]) -> None:
        """The optimizer-wide options and the run-time machinery built from them (also after unpickling)."""
        self.state_dtype = options["state_dtype"]
        self.on_nonfinite = options["on_nonfinite"]
        self.stack = options["stack"]
        self.tf32 = options["tf32"]
        self._schedule = RefreshSchedule(stagger=options["stagger"], asynchronous=options["async_refresh"])
        self._buckets = Buckets(self._bucket_key)
        self._fallbacks = FallbackCounter()
        # [distributed] the optional fifth part (precond.DataParallel): None is the single-process path
        self._distributed_config = options.get("distributed")
        self._distributed = None if self._distributed_config is None else self._distributed_config.attach(self)

    def _options(self) -> dict[str, Any]:
        return dict(state_dtype=self.state_dtype, on_nonfinite=self.on_nonfinite, stack=self.stack,
                    stagger=self._schedule.stagger, async_refresh=self._schedule.asynchronous, tf32=self.tf32,
                    distributed=self._distributed_config)

    def __getstate__(self) -> dict[str, Any]:
        """As ``torch.optim`` (``defaults``, ``state``, ``param_groups``) plus this optimizer's options and parameter
        names, so ``copy.deepcopy`` and pickling give an optimizer that steps exactly like this one. Pending
        asynchronous refreshes are installed first; buckets and streams are rebuilt on the copy's first step."""
        self._schedule.flush()
        params = [p for group in self.param_groups for p in group["params"]]
        return {**super().__getstate__(), "options": self._options(),
                "names": [self._names.get(id(p)) for p in params]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "options" not in state:  # torch.optim's load_state_dict passes only state and param_groups
            super().__setstate__(state)
            return
        options, names = state.pop("options"), state.pop("names", [])
        super().__setstate__(state)
        self._configure(options)
        params = [p for group in self.param_groups for p in group["params"]]
        self._names = {id(p): name for p, name in zip(params, names) if name is not None}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim``; the group is checked first, so a refused group leaves the optimizer unchanged.

        Besides a whole ``preconditioner``, a group may override single parts: ``structure``, ``estimator``,
        ``basis``, ``applier`` or ``first_step`` replace that part of the default preconditioner, e.g.
        ``{"params": embeddings, "structure": structures.OneSided()}``.
        """
        param_group = dict(param_group)
        overrides = {name: param_group.pop(name) for name in _PART_KEYS if name in param_group}
        if overrides:
            base = param_group.get(_CONFIG_KEY, self.defaults[_CONFIG_KEY])
            param_group[_CONFIG_KEY] = attrs.evolve(base, **overrides)
        _check_hyperparameters({**self.defaults, **param_group})
        params = param_group["params"]
        for p in [params] if isinstance(params, torch.Tensor) else list(params):
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise TypeError(f"parameter {self._name(p)} is complex; precond supports real parameters only")
        super().add_param_group(param_group)

    # --- helpers ---------------------------------------------------------------------------------
    def _name(self, p: torch.Tensor) -> str:
        return self._names.get(id(p), f"of shape {tuple(p.shape)}")

    def layout(self, p: torch.Tensor) -> Layout:
        """The plan of parameter ``p`` (its group's structure applied to its shape)."""
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group[_CONFIG_KEY].plan(p.shape)
        raise KeyError("parameter is not managed by this optimizer")

    def part_state(self, p: torch.Tensor, part: str) -> dict[str, Any]:
        """One part's state of parameter ``p``: ``part`` is ``"estimator"``, ``"basis"`` or ``"applier"``."""
        return self.state[p].get(part, {})

    def buckets(self) -> tuple[Bucket, ...]:
        """The current buckets (parameters stacked into one batched state each), for inspection: read, don't write."""
        return tuple(self._buckets)

    def refresh_offset(self, p: torch.Tensor, k: int) -> Optional[int]:
        """The stagger offset ``o`` of mode ``k`` of ``p`` (refreshed after steps with ``(t + o) mod T = 0``), or
        None before the schedule was planned (the first step) or for a mode without a refreshed basis."""
        return self._schedule.offset((id(p), k))

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
                layout = group[_CONFIG_KEY].plan(p.shape)
                numel = layout.state_numel()
                total += numel
                lines.append(f"group {i} {self._name(p)}: {layout.describe()}  factors {numel * size / 2**20:.2f} MiB")
        lines.append(f"total factor state: {total * size / 2**20:.2f} MiB ({str(self.state_dtype).removeprefix('torch.')})")
        return "\n".join(lines)

    # --- the step --------------------------------------------------------------------------------
    def _gather(self) -> Optional[list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]]:
        """The ``(group, p, grad)`` of every parameter with a gradient, checked; None when the step is skipped.
        Raises before anything is touched when the step must be refused."""
        for group in self.param_groups:  # cheap checks, no synchronisation: values may have changed since
            _check_hyperparameters(group, read_tensor=False)
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(f"parameter {self._name(p)} has a sparse gradient; precond needs dense gradients "
                                       "(use nn.Embedding(sparse=False))")
                if grad.is_complex():
                    raise RuntimeError(f"parameter {self._name(p)} has a complex gradient; precond supports real tensors only")
                work.append((group, p, grad))
        if self._distributed is not None:  # [distributed] this rank's share, the verdict agreed by all ranks
            return self._distributed.gathered(self, work)
        if self.on_nonfinite == "ignore" or not work:
            return work
        return self._checked(work)

    def _checked(self, work: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]):
        """One host synchronisation: the largest ``|g|`` of every gradient and every tensor ``lr``. Non-finite →
        raise or skip; finite beyond ``2⁴⁰`` → that gradient scaled down by a power of two (see the class doc)."""
        maxima = torch._foreach_norm([g for _, _, g in work], float("inf"))
        lrs = [group["lr"] for group in self.param_groups if isinstance(group["lr"], torch.Tensor)]
        device = maxima[0].device
        values = torch.stack([m.to(device=device, dtype=torch.float64) for m in maxima]
                             + [lr.detach().reshape(()).to(device=device, dtype=torch.float64) for lr in lrs]).tolist()
        return self._verdict(work, values)

    def _verdict(self, work: list[tuple[dict[str, Any], torch.Tensor, Optional[torch.Tensor]]], values: list[float]):
        """The check's decision from ``values`` (the largest ``|g|`` of each ``work`` entry, then each tensor lr):
        raise, skip (None), or the work with huge gradients scaled down. Entries whose gradient is None (another
        rank's, in a distributed run) are judged but not returned."""
        bad = [self._name(p) for (_, p, _), m in zip(work, values) if not math.isfinite(m)]
        bad += [f"lr of group {i}" for i, lr in enumerate(values[len(work):]) if not math.isfinite(lr) or lr < 0]
        if bad:
            if self.on_nonfinite == "skip":
                self._fallbacks.count("nonfinite_skipped", f"a step with a non-finite gradient or lr ({', '.join(bad)}) "
                                      "was skipped; nothing was changed")
                return None
            raise FloatingPointError(
                f"non-finite gradient (NaN or Inf) or lr in {', '.join(bad)}; the step was refused and no "
                "optimizer state was changed. Lower the learning rate, clip gradients, skip this batch, or build the "
                "optimizer with on_nonfinite='skip'.")
        out = []
        for (group, p, grad), largest in zip(work, values):
            if grad is None:
                continue
            if largest > _GRADIENT_BOUND:
                self._fallbacks.count("gradient_rescaled", f"a gradient of magnitude {largest:.3g} ({self._name(p)}) "
                                      f"was scaled down by a power of two to {_GRADIENT_BOUND:.3g}")
                grad = grad * 2.0 ** (math.frexp(_GRADIENT_BOUND)[1] - math.frexp(largest)[1])
            out.append((group, p, grad))
        return out

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimisation step; ``closure`` re-evaluates the loss (with gradients) and its value is returned.

        Parameters of one group, shape, dtype and device are stacked (``stack=True``) and updated together: one
        batched contraction per bucket instead of one per tensor. A bucket whose members do not all have a
        gradient this step is split: the members with one run as one batched call (``precond.buckets``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with contextlib.ExitStack() as stack:
            if self.tf32 is not None:
                stack.enter_context(tf32_matmuls(self.tf32))
            self._step()
        return loss

    def _step(self) -> None:
        work = self._gather()  # may refuse or skip the step: nothing is touched before it
        if work is None:
            return
        self._schedule.flush()
        fresh = [(group, p, grad) for group, p, grad in work if not self.state[p]]
        if not self._buckets.built:
            self._buckets.rebuild(self.param_groups, self.state)
        self._buckets.consolidate(self.state)
        moves = self._initialize(fresh) if fresh else []
        self._apply_moves(moves)
        just_initialized = {id(p) for _, p, _ in fresh}
        grads = {id(p): grad for _, p, grad in work if id(p) not in just_initialized}
        for bucket in list(self._buckets):
            present = [i for i, p in enumerate(bucket.params) if id(p) in grads]
            if not present:
                continue
            if len(present) < len(bucket.params):
                bucket = self._buckets.split(bucket, present, self.state)
            moves.append((bucket, self._advance(bucket, [grads[id(p)] for p in bucket.params])))
            self._apply_moves(moves)
        if self._distributed is not None:  # [distributed] exchange the updates (or refreshes), move the parameters
            self._distributed.finish(self)

    def _apply_moves(self, moves: list[tuple[Bucket, torch.Tensor]]) -> None:
        """Move the parameters of each ``(bucket, update)`` (and empty the list, freeing the updates at once)."""
        while moves:
            bucket, update = moves.pop(0)
            if self._distributed is not None and self._distributed.stage(self, bucket, update):  # [distributed]
                continue
            self._apply(bucket.group, bucket.params, update, bucket.layout)

    def _bucket_key(self, group_index: int, p: torch.Tensor) -> tuple:
        return (group_index, tuple(p.shape), p.dtype, p.device, None if self.stack else id(p))

    def _initialize(self, fresh: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]) -> list[tuple[Bucket, torch.Tensor]]:
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
            layout = preconditioner.plan(params[0].shape)
            grad = torch.stack([layout.view(g) for _, _, g in items]).to(self.state_dtype)
            ps = preconditioner.init_state(grad, layout, self._fallbacks, tuple(params))
            if group["momentum"] > 0:
                ps.momentum = torch.zeros_like(grad)
            for p in params:
                self.state[p][STEP] = new_step()
            bucket = self._buckets.add(key, params, group, ps.storage(), [self.state[p] for p in params])
            if preconditioner.updates_on_first_gradient:
                moves.append((bucket, self._advance(bucket, [g for _, _, g in items])))
        return moves

    def _advance(self, bucket: Bucket, grads: list[torch.Tensor]) -> torch.Tensor:
        """One step of the state of every member of ``bucket``: its update (returned, ``(B, *view)``), the due
        refreshes and the step counts; the parameters are moved afterwards (:meth:`_apply`)."""
        step = bucket.step + 1
        update = self._direction(bucket, grads, step)
        if bucket.preconditioner.folds_at(step):
            self._refresh(bucket, step)
        bucket.step = step
        for p in bucket.params:
            self.state[p][STEP] += 1
        return update

    def _direction(self, bucket: Bucket, grads: list[torch.Tensor], step: int) -> torch.Tensor:
        """The preconditioned (momentum) direction of a bucket (``(B, *view)``); folds the gradient."""
        group, layout = bucket.group, bucket.layout
        grad = torch.stack([layout.view(g) for g in grads]).to(self.state_dtype)
        beta1 = group["momentum"]
        source = grad
        if beta1 > 0:
            m = bucket.state.momentum
            m.lerp_(grad, 1.0 - beta1)
            source = grad.lerp(m, beta1) if group["nesterov"] else m
            if group["bias_correction"]:
                source = source / (1.0 - beta1**step)
        return bucket.preconditioner.precondition(bucket.state, grad, source, layout, step)

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
            index = None if len(due) == len(keys) else torch.tensor(due, device=device)
            factor, basis = bucket.refresh_inputs(k, index)
            if self._schedule.asynchronous:
                factor = factor.clone()  # a snapshot: the next step's fold must not reach the side stream

            def compute(factor=factor, basis=basis, refresh_index=refresh_index):
                return preconditioner.compute_refresh(factor, basis, self._fallbacks, refresh_index)

            self._schedule.run(device, compute, functools.partial(bucket.install_refresh, k, index), (factor, basis))

    def _refresh_units(self) -> list[tuple[tuple[int, int], int, int]]:
        """Every refreshable mode of every parameter, in parameter order: ``((id(p), k), d_k, T)``."""
        units = []
        for group in self.param_groups:
            preconditioner: Preconditioner = group[_CONFIG_KEY]
            for p in group["params"]:
                layout = preconditioner.plan(p.shape)
                for k in preconditioner.refreshable_modes(layout):
                    units.append(((id(p), k), layout.view_shape[k], preconditioner.basis.every))
        return units

    @staticmethod
    def _apply(group: dict[str, Any], params: list[torch.Tensor], update: torch.Tensor, layout: Layout) -> None:
        """Decoupled weight decay and ``W ← W − η U``: ``η U`` is formed in the state dtype and cast to the
        parameters' dtype last (one arithmetic path for a float and a tensor ``lr``)."""
        lr, wd = group["lr"], group["weight_decay"]
        scaled = update * (lr.to(device=update.device, dtype=update.dtype) if isinstance(lr, torch.Tensor) else lr)
        steps = [layout.unview(u) for u in scaled.to(params[0].dtype).unbind(0)]
        if wd and group["decay_order"] == "before":
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_sub_(params, steps)
        if wd and group["decay_order"] == "after":
            torch._foreach_mul_(params, 1 - lr * wd)

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim``; each group's preconditioner is stored as a plain description, never an object."""
        self._schedule.flush()
        result = super().state_dict()
        for group in result["param_groups"]:
            group[_CONFIG_KEY] = _describe_config(group[_CONFIG_KEY])
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim``, but the factor state keeps its saved dtype (float32 for bfloat16 parameters),
        and the preconditioners stay this optimizer's own (a different saved configuration is refused)."""
        current = [group[_CONFIG_KEY] for group in self.param_groups]
        for group, saved in zip(current, state_dict["param_groups"]):
            if _describe_config(group) != saved.get(_CONFIG_KEY):
                raise ValueError(
                    "the checkpoint was made with another preconditioner configuration:\n"
                    f"  saved:   {saved.get(_CONFIG_KEY)}\n  current: {_describe_config(group)}\n"
                    "build the optimizer with the saved configuration before loading")
        super().load_state_dict(state_dict)
        self._schedule.discard()
        self._buckets.invalidate()
        for group, preconditioner in zip(self.param_groups, current):
            group[_CONFIG_KEY] = preconditioner
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            if saved_id in state_dict["state"]:
                self.state[p] = map_leaves(state_dict["state"][saved_id],
                                           lambda t: t.to(device=p.device if t.ndim else t.device, copy=True))
