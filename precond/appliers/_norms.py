"""Per-entry norms shared by the appliers that set the size of another applier's direction."""

from __future__ import annotations

import torch


def batch_norm(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each batch entry, shaped to broadcast against ``x``.

    A contiguous ``x`` of order ≥ 2 is reduced over its non-batch dimensions in place, one op (the same contiguous
    run of memory, so the same number as the norm of the flattened entry); otherwise the entry is flattened first."""
    if x.ndim > 1 and x.is_contiguous():
        return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).view(-1, *([1] * (x.ndim - 1)))
