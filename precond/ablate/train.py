"""One training run: a model of the task, one variant at one learning rate and seed, evaluated every N steps."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Literal, Optional

import attrs
import torch
from torch import nn

from precond.ablate import board, divergence, memory
from precond.ablate.schedule import SCHEDULES, multiplier
from precond.ablate.variants import Variant
from precond.tasks.base import Data, Task, stream
from precond.validators import number, one_of

EvalCallback = Callable[[int, Optional[float], float, float], None]
"""Called after each evaluation with ``(step, mean train loss since the last one, val loss, train seconds)``."""

ScalarLog = Callable[[int, dict[str, Any]], None]
"""Receives ``(step, {tag: value})`` (see :func:`train_run`)."""


class OutOfTime(Exception):
    """The wall-clock budget ran out during a run (the run is dropped, not recorded)."""


@attrs.frozen
class Training:
    """The training protocol shared by every run of an ablation (part of each run's resume key).

    - ``steps`` optimizer updates; validation loss on ``eval_batches`` fixed batches every ``eval_every``
      steps (and at step 0 and at the end);
    - learning rate: linear ``warmup`` (a fraction of ``steps``), then ``schedule`` ``"cosine"`` or
      ``"linear"`` (down to ``min_lr_ratio``) or ``"constant"``, for every variant (peers included);
    - ``clip``: gradient-norm clipping (unset: none); ``weight_decay``: for every variant that does not set its
      own (unset: each variant's default), applied to weights of two or more dimensions only;
    - ``bf16``: autocast to bfloat16 on CUDA (ignored on the CPU);
    - ``sync_free``: our optimizers skip their per-step finiteness check (``on_nonfinite="ignore"``: no host
      sync per step on a GPU; the same updates, a blow-up is caught at the next validation instead).
    """

    steps: int = attrs.field(default=300, validator=number(low=1, integer=True, meaning="optimizer updates"))
    eval_every: int = attrs.field(default=50, validator=number(
        low=1, integer=True, meaning="steps between validations"))
    eval_batches: int = attrs.field(default=4, validator=number(
        low=1, integer=True, meaning="fixed batches of each validation"))
    schedule: Literal["cosine", "linear", "constant"] = attrs.field(
        default="cosine", validator=one_of(SCHEDULES))
    warmup: float = attrs.field(default=0.05, validator=number(
        low=0, high=1, meaning="share of the steps spent warming the learning rate up"))
    min_lr_ratio: float = attrs.field(default=0.1, validator=number(
        low=0, high=1, meaning="the cosine schedule's last learning rate over the peak"))
    clip: Optional[float] = attrs.field(default=None, validator=number(
        low=0, optional=True, meaning="largest gradient norm, unset for no clipping"))
    weight_decay: Optional[float] = attrs.field(default=None, validator=number(
        low=0, optional=True, meaning="decoupled weight decay of every variant without its own, unset for each one's"))
    bf16: bool = True
    sync_free: bool = False


ADDED_LATER = {"sync_free": False}
"""Protocol fields added after runs were recorded, with their defaults: left out of :func:`protocol` at the
default, so those runs keep their resume keys."""


def protocol(training: Training) -> dict[str, Any]:
    """The protocol as plain data for resume keys and records (fields of :data:`ADDED_LATER` only when set)."""
    data = attrs.asdict(training)
    return {key: value for key, value in data.items() if key not in ADDED_LATER or value != ADDED_LATER[key]}


def adam_routed(model: nn.Module) -> frozenset[str]:
    """Names of the matrices a Muon gives to Adam, as Muon's authors do: every ``nn.Embedding``'s weight and the
    output layer (the last ``nn.Linear`` registered: an LM head or a classifier)."""
    names = {f"{module_name}.{name}" if module_name else name
             for module_name, module in model.named_modules() if isinstance(module, nn.Embedding)
             for name, _ in module.named_parameters(recurse=False)}
    linears = [(module_name, module) for module_name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if linears:
        module_name, module = linears[-1]
        names |= {f"{module_name}.{name}" if module_name else name for name, p in module.named_parameters(recurse=False)
                  if p.ndim >= 2}
    return frozenset(names)


class StepTimer:
    """Time of every optimizer step (forward, backward, ``step()``, schedule), in milliseconds.

    On CUDA an event is recorded at each step boundary, without synchronising; the times are read at
    :meth:`collect`, called where the loop synchronises anyway (each validation). On the CPU, ``perf_counter``.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.times: list[float] = []
        self._marks: list[Any] = []

    def mark(self) -> None:
        """A step boundary (call before the first step and after each)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))  # the training device's stream, not cuda:0's
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def collect(self) -> None:
        """Turn the boundaries marked so far into step times (after a synchronisation on CUDA); keep the last."""
        if self.cuda:
            if self._marks:
                self._marks[-1].synchronize()
            self.times += [a.elapsed_time(b) for a, b in zip(self._marks[:-1], self._marks[1:], strict=True)]
        else:
            self.times += [1e3 * (b - a) for a, b in zip(self._marks[:-1], self._marks[1:], strict=True)]
        self._marks = self._marks[-1:]

    def restart(self) -> None:
        """Forget the last boundary (time outside training, such as a validation, follows)."""
        self._marks = []


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Named parameters in two groups: weights (decayed) and vectors such as biases and norm scales (not)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [{"params": [(n, p) for n, p in named if p.ndim >= 2]},
            {"params": [(n, p) for n, p in named if p.ndim < 2], "weight_decay": 0.0}]


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and enabled:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, data: Data, batches: int, device: torch.device, bf16: bool) -> float:
    """Mean loss over the fixed validation batches."""
    model.eval()
    with _autocast(device, bf16):
        total = sum(task.loss(model, batch).float() for batch in data.val_batches(batches))
    model.train()
    return float(total) / batches


def _ignore(step: int, values: dict[str, Any]) -> None:
    pass


def train_run(task: Task, data: Data, variant: Variant, lr: float, seed: int, training: Training,
              device: torch.device, deadline: Optional[float] = None, on_eval: Optional[EvalCallback] = None,
              on_step: Optional[Callable[[], None]] = None, stop_after: Optional[int] = None,
              log_scalars: Optional[ScalarLog] = None) -> dict[str, Any]:
    """Train one model and return its record (without the resume key): the validation curve, the final loss,
    whether it diverged, times and memory. Training stops early once it diverged: a step raised a numerical
    error, or a validation loss is not finite or above twice the initial one (:mod:`precond.ablate.divergence`).
    Raises :class:`OutOfTime` once ``time.monotonic()`` passes ``deadline``.

    ``stop_after``: stop after that many steps, under the schedule of the whole run (the timing pass,
    :mod:`precond.ablate.timing`: the same steps as the run's start, at the same learning rates).
    ``log_scalars(step, {tag: value})`` receives the learning rate at every step and the losses and
    ``optimizer.stats()`` at every validation (:mod:`precond.ablate.board`).
    """
    started = time.monotonic()
    model = task.build_model(seed).to(device)
    optimizer = variant.build(param_groups(model), lr, training.weight_decay, adam_params=adam_routed(model),
                              sync_free=training.sync_free)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, multiplier(training.steps, training.schedule, training.warmup, training.min_lr_ratio))
    generator = torch.Generator().manual_seed(seed)
    batches = stream(data, generator)
    timer = StepTimer(device)
    memory.reset_peak(device)
    curve: dict[str, list] = {"step": [], "train": [], "val": [], "seconds": []}
    train_seconds, error = 0.0, None
    scalars = log_scalars or _ignore

    def record(step: int, train_loss: Optional[float]) -> float:
        val = evaluate(task, model, data, training.eval_batches, device, training.bf16)
        for column, value in zip(curve, (step, train_loss, val, round(train_seconds, 4)), strict=True):
            curve[column].append(value if value is None or math.isfinite(value) else None)
        if on_eval is not None:
            on_eval(step, train_loss, val, train_seconds)
        if log_scalars is not None:  # optimizer.stats() may synchronise with the device: only when asked
            log_scalars(step, {"loss/val": val, "loss/train": train_loss, **board.optimizer_stats(optimizer)})
        return val

    last = training.steps if stop_after is None else max(1, min(stop_after, training.steps))
    initial = record(0, None)
    running, count, segment, done = torch.zeros((), device=device), 0, time.monotonic(), 0
    timer.mark()
    for step in range(1, last + 1):
        scalars(step, {"lr": optimizer.param_groups[0]["lr"]})
        with _autocast(device, training.bf16):
            loss = task.loss(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if training.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), training.clip)
        try:
            optimizer.step()
        except (FloatingPointError, torch.linalg.LinAlgError) as failure:
            error = f"step {step}: {type(failure).__name__}: {str(failure).splitlines()[0]}"
            break
        scheduler.step()
        timer.mark()
        done = step
        running += loss.detach().float()
        count += 1
        if on_step is not None:
            on_step()
        if deadline is not None and step < last and time.monotonic() > deadline:  # a finished run stays
            raise OutOfTime(f"time budget reached at step {step} of {variant.name} lr={lr:g} seed={seed}")
        if step % training.eval_every == 0 or step == last:
            _sync(device)
            train_seconds += time.monotonic() - segment
            timer.collect()
            timer.restart()
            val = record(step, float(running) / count)
            running, count = torch.zeros((), device=device), 0
            reason = divergence.blown_up(val, initial)
            if reason is not None:
                error = f"step {step}: {reason}"
                break
            segment = time.monotonic()
            timer.mark()

    _sync(device)
    timer.collect()
    finals = [v for v in curve["val"] if v is not None]
    diverged = error is not None
    return {
        "variant": variant.name, "spec": variant.spec(), "lr": lr, "seed": seed,
        "steps": training.steps, "steps_done": done,
        "final_val": None if diverged else curve["val"][-1],
        "best_val": min(finals) if finals else None,
        "diverged": diverged, "error": error, "curve": curve,
        "train_seconds": round(train_seconds, 3), "wall_seconds": round(time.monotonic() - started, 3),
        "step_ms": [round(t, 3) for t in timer.times],
        "optimizer_state_bytes": memory.optimizer_state_bytes(optimizer),
        "peak_cuda_bytes": memory.peak_bytes(device),
        "params": sum(p.numel() for p in model.parameters()),
        "device": str(device), "torch": torch.__version__,
        **_refresh_record(optimizer), **_fallback_record(optimizer),
    }


def _fallback_record(optimizer: Any) -> dict[str, Any]:
    """For a ``precond.Optimizer``: ``{"fallbacks": optimizer.stats()}`` at the end of the run, the counts of the
    numerical fallbacks it took (``eigh_jitter``, ``refine_kept_old_basis``, …; reading them synchronises once);
    nothing for other optimizers. A refresh that kept the old basis leaves the factor's basis stale, so a variant's
    loss is read together with these counts."""
    stats = getattr(optimizer, "stats", None)
    return {"fallbacks": {name: int(count) for name, count in stats().items()}} if callable(stats) else {}


def _refresh_record(optimizer: Any) -> dict[str, Any]:
    """With ``drift_tolerance``: ``{"refreshes": {parameter: {mode: {"checks": due, "refreshes": made, "deferred":
    passed over by the refresh budget}}}}`` at the end of the run (``precond.Optimizer.refresh_counts``; read on
    the host); nothing for other optimizers."""
    counts = getattr(optimizer, "refresh_counts", None)
    found = counts() if callable(counts) else {}
    if not found:
        return {}
    return {"refreshes": {name: {str(k): dict(v) for k, v in modes.items()} for name, modes in found.items()}}
