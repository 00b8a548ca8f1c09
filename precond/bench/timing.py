"""Time ``optimizer.step()`` on fresh random gradients; measure the optimizer's extra peak memory."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Sequence

import torch

from precond.bench.contenders import Factory
from precond.state import state_bytes


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op on the CPU), so a host clock read after it times that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_with(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
              grads: Sequence[Sequence[torch.Tensor]]) -> None:
    """One ``optimizer.step()`` per entry of ``grads`` (the gradients of ``params`` for that step, made by the caller
    beforehand, so that a profile or a count of the steps holds ``step()`` alone)."""
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        optimizer.step()


def profiler_activities(device: torch.device) -> list[torch.profiler.ProfilerActivity]:
    """What the torch profiler records on ``device``: host operators, and on CUDA the kernels too."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def time_steps(make: Factory, shapes: Sequence[tuple[int, ...]], device: torch.device, warmup: int, steps: int,
               dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Any]:
    """Median, max and mean milliseconds of ``steps`` timed steps after ``warmup`` steps, and memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.empty_like(p)
    sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = make(params)
    times = []
    for i in range(warmup + steps):
        for p in params:  # fresh gradients every step, drawn outside the timed region
            if p.grad is None:  # some peers set p.grad to None after their step
                p.grad = torch.empty_like(p)
            p.grad.normal_(generator=gen).mul_(1e-3)
        sync(device)
        start = time.perf_counter()
        optimizer.step()
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    result = {
        "median_ms": statistics.median(times),
        "max_ms": max(times),
        "mean_ms": statistics.fmean(times),
        "state_gb": state_bytes(optimizer) / 1e9,
        "finite": bool(all(torch.isfinite(p).all() for p in params)),
    }
    if device.type == "cuda":
        result["extra_peak_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 1e9
    del optimizer, params
    return result
