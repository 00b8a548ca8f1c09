"""Memory measurements of a run: the optimizer's state (any device) and the CUDA allocator's peak."""

from __future__ import annotations

from typing import Optional

import torch

from precond.state import state_bytes


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes of every tensor in ``optimizer.state`` (factors, bases, spectra, moments): ``precond.state``'s one
    counter."""
    return state_bytes(optimizer)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> Optional[int]:
    """``torch.cuda.max_memory_allocated`` since :func:`reset_peak` on CUDA; ``None`` elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
