"""One training run: a model of the task, one variant at one learning rate and seed, evaluated every N steps."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Literal, Optional

import attrs
import torch
from torch import nn

from precond.ablate import divergence, memory
from precond.ablate.schedule import multiplier
from precond.ablate.variants import Variant
from precond.tasks.base import Data, Task
from precond.validators import number

EvalCallback = Callable[[int, Optional[float], float, float], None]
"""Called after each evaluation with ``(step, mean train loss since the last one, val loss, train seconds)``."""


class OutOfTime(Exception):
    """The wall-clock budget ran out during a run (the run is dropped, not recorded)."""


@attrs.frozen
class Training:
    """The training protocol shared by every run of an ablation (part of each run's resume key).

    - ``steps`` optimizer updates; validation loss on ``eval_batches`` fixed batches every ``eval_every``
      steps (and at step 0 and at the end);
    - learning rate: linear ``warmup`` (a fraction of ``steps``), then ``schedule`` ``"cosine"`` (down to
      ``min_lr_ratio``) or ``"constant"``;
    - ``clip``: gradient-norm clipping (unset: none); ``weight_decay``: for every variant that does not set its
      own (unset: each variant's default), applied to weights of two or more dimensions only;
    - ``bf16``: autocast to bfloat16 on CUDA (ignored on the CPU).
    """

    steps: int = attrs.field(default=300, validator=number(low=1, integer=True, meaning="optimizer updates"))
    eval_every: int = attrs.field(default=50, validator=number(
        low=1, integer=True, meaning="steps between validations"))
    eval_batches: int = attrs.field(default=4, validator=number(
        low=1, integer=True, meaning="fixed batches of each validation"))
    schedule: Literal["cosine", "constant"] = attrs.field(
        default="cosine", validator=attrs.validators.in_(("cosine", "constant")))
    warmup: float = attrs.field(default=0.05, validator=number(
        low=0, high=1, meaning="share of the steps spent warming the learning rate up"))
    min_lr_ratio: float = attrs.field(default=0.1, validator=number(
        low=0, high=1, meaning="the cosine schedule's last learning rate over the peak"))
    clip: Optional[float] = attrs.field(default=None, validator=number(
        low=0, optional=True, meaning="largest gradient norm, unset for no clipping"))
    weight_decay: Optional[float] = attrs.field(default=None, validator=number(
        low=0, optional=True, meaning="decoupled weight decay of every variant without its own, unset for each one's"))
    bf16: bool = True


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


def train_run(task: Task, data: Data, variant: Variant, lr: float, seed: int, training: Training,
              device: torch.device, deadline: Optional[float] = None, on_eval: Optional[EvalCallback] = None,
              on_step: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    """Train one model and return its record (without the resume key): the validation curve, the final loss,
    whether it diverged, times and memory. Training stops early once it diverged: a step raised a numerical
    error, or a validation loss is not finite or above twice the initial one (:mod:`precond.ablate.divergence`).
    Raises :class:`OutOfTime` once ``time.monotonic()`` passes ``deadline``.
    """
    started = time.monotonic()
    model = task.build_model(seed).to(device)
    optimizer = variant.build(param_groups(model), lr, training.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, multiplier(training.steps, training.schedule, training.warmup, training.min_lr_ratio))
    generator = torch.Generator().manual_seed(seed)
    memory.reset_peak(device)
    curve: dict[str, list] = {"step": [], "train": [], "val": [], "seconds": []}
    train_seconds, error = 0.0, None

    def record(step: int, train_loss: Optional[float]) -> float:
        val = evaluate(task, model, data, training.eval_batches, device, training.bf16)
        for column, value in zip(curve, (step, train_loss, val, round(train_seconds, 4))):
            curve[column].append(value if value is None or math.isfinite(value) else None)
        if on_eval is not None:
            on_eval(step, train_loss, val, train_seconds)
        return val

    initial = record(0, None)
    running, count, segment, done = torch.zeros((), device=device), 0, time.monotonic(), 0
    for step in range(1, training.steps + 1):
        with _autocast(device, training.bf16):
            loss = task.loss(model, data.train_batch(generator))
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
        done = step
        running += loss.detach().float()
        count += 1
        if on_step is not None:
            on_step()
        if deadline is not None and step < training.steps and time.monotonic() > deadline:  # a finished run stays
            raise OutOfTime(f"time budget reached at step {step} of {variant.name} lr={lr:g} seed={seed}")
        if step % training.eval_every == 0 or step == training.steps:
            _sync(device)
            train_seconds += time.monotonic() - segment
            val = record(step, float(running) / count)
            running, count = torch.zeros((), device=device), 0
            reason = divergence.blown_up(val, initial)
            if reason is not None:
                error = f"step {step}: {reason}"
                break
            segment = time.monotonic()

    finals = [v for v in curve["val"] if v is not None]
    diverged = error is not None
    return {
        "variant": variant.name, "spec": variant.spec(), "lr": lr, "seed": seed,
        "steps": training.steps, "steps_done": done,
        "final_val": None if diverged else curve["val"][-1],
        "best_val": min(finals) if finals else None,
        "diverged": diverged, "error": error, "curve": curve,
        "train_seconds": round(train_seconds, 3), "wall_seconds": round(time.monotonic() - started, 3),
        "optimizer_state_bytes": memory.optimizer_state_bytes(optimizer),
        "peak_cuda_bytes": memory.peak_bytes(device),
        "params": sum(p.numel() for p in model.parameters()),
        "device": str(device), "torch": torch.__version__,
    }
