"""Time a real training step (forward + backward + ``optimizer.step()``) of a GPT and report tokens/s.

Per-iteration times come from CUDA events recorded at the start of each iteration on the main stream, with no
synchronisation inside the loop, so refreshes running on side streams overlap forward and backward as in a real
run. Tokens are random ids drawn on the device (the cost of the data pipeline is left out for every optimizer).
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any

import torch

from precond.bench.contenders import Factory
from precond.tasks.gpt import TinyGPT

GPT2_SMALL = dict(vocab=50257, context=1024, layers=12, width=768, heads=12)
GPT_TINY = dict(vocab=256, context=128, layers=2, width=64, heads=4)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
               autocast: Any) -> torch.Tensor:
    """One next-token step on ``tokens`` (batch, length + 1): forward under ``autocast``, float32 cross-entropy,
    backward, ``optimizer.step()``, gradients set to None; the loss, still on the device."""
    with autocast:
        logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def time_training(make: Factory, device: torch.device, model_size: dict[str, int], batch: int, length: int,
                  warmup: int, steps: int, seed: int = 0) -> dict[str, Any]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    model = TinyGPT(**model_size).to(device)
    optimizer = make(model.parameters())
    vocab = model_size["vocab"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    events, losses = [], []
    start_wall = None
    for i in range(warmup + steps + 1):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start_wall = time.perf_counter()
        if device.type == "cuda" and i >= warmup:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            events.append(event)
        if i == warmup + steps:
            break
        tokens = torch.randint(0, vocab, (batch, length + 1), device=device)
        losses.append(train_step(model, optimizer, tokens, autocast))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start_wall
    if events:
        per_step = [a.elapsed_time(b) for a, b in zip(events[:-1], events[1:], strict=True)]
    else:
        per_step = [wall * 1e3 / steps] * steps
    result = {
        "tokens_per_s": steps * batch * length / wall,
        "median_ms": statistics.median(per_step),
        "max_ms": max(per_step),
        "mean_ms": wall * 1e3 / steps,
        "final_loss": float(losses[-1]),
        "finite": bool(torch.isfinite(torch.stack(losses)).all()),
    }
    if device.type == "cuda":
        result["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    del optimizer, model
    return result
