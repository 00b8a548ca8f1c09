"""Data-parallel (DDP) and FSDP2 training with the preconditioner's work and state spread over ranks.

``precond.Optimizer(..., distributed=precond.DataParallel(mode="owner"))``; see :class:`DataParallel` and
``docs/scaling.md``. Modules: ``config`` (the part), ``owners`` (who does what), ``exchange`` (one flat collective),
``runtime`` (what both modes share), ``owner``, ``sharded`` (FSDP2) and ``replicate`` (the modes: runtimes of
``precond.runtime``, chosen by ``precond.compatibility.RUNTIMES``), ``checkpoint`` (DCP glue).
"""

from __future__ import annotations

from typing import Any

import torch

from precond.distributed.config import DataParallel

__all__ = ["DataParallel", "owner_of", "state_bytes", "traffic"]


def _runtime(optimizer: Any):
    if getattr(optimizer, "distributed", None) is None:
        raise ValueError("this optimizer was built without distributed=precond.DataParallel(...)")
    return optimizer.engine.runtime


def owner_of(optimizer: Any, p: torch.Tensor) -> int:
    """The rank that owns parameter ``p`` (owner mode; known after the first step)."""
    runtime = _runtime(optimizer)
    runtime.prepare()
    return runtime.owner_of(p)


def traffic(optimizer: Any) -> dict[str, int]:
    """What this rank sent and received in the optimizer's collectives during the last step: ``collectives``,
    ``early_collectives`` (owner mode: those started while the step was still computing, overlapping it),
    ``bytes_sent``, ``bytes_received`` (as issued, padding included)."""
    return dict(_runtime(optimizer).traffic)


def state_bytes(optimizer: Any) -> int:
    """Bytes of the tensors this rank keeps in ``optimizer.state`` (each stacked tensor counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.storage_offset())
            if key not in seen:
                seen.add(key)
                total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for state in optimizer.state.values():
        visit(state)
    return total
