"""Memory measurements of a run: the optimizer's state (any device) and the CUDA allocator's peak."""

from __future__ import annotations

from typing import Any, Optional

import torch


def tensor_bytes(value: Any) -> int:
    """Bytes held by the tensors in ``value`` (nested dicts, lists and tuples), each counted once."""
    seen: set[int] = set()

    def walk(item: Any) -> int:
        if isinstance(item, torch.Tensor):
            if id(item) in seen:
                return 0
            seen.add(id(item))
            return item.numel() * item.element_size()
        if isinstance(item, dict):
            return sum(walk(v) for v in item.values())
        if isinstance(item, (list, tuple)):
            return sum(walk(v) for v in item)
        return 0

    return walk(value)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The sum of the sizes of every tensor in ``optimizer.state`` (factors, bases, spectra, moments)."""
    return tensor_bytes(list(optimizer.state.values()))


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> Optional[int]:
    """``torch.cuda.max_memory_allocated`` since :func:`reset_peak` on CUDA; ``None`` elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
