"""Per-entry norms shared by the appliers that set the size of another applier's direction."""

from __future__ import annotations

import torch


def batch_norm(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each batch entry, shaped to broadcast against ``x``."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).view(-1, *([1] * (x.ndim - 1)))
