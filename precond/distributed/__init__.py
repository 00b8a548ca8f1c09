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
from precond.state import state_bytes  # the one counter, re-exported: precond.distributed.state_bytes

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
