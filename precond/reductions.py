"""``max |x|`` over some dimensions, the reduction behind the all-zero masks and the orthogonality check."""

from __future__ import annotations

from typing import Sequence

import torch


def max_abs(x: torch.Tensor, dim: Sequence[int], keepdim: bool = False) -> torch.Tensor:
    """``max |x|`` over ``dim`` (NaN if any reduced entry is NaN).

    On CUDA one reduction kernel (``vector_norm(ord=∞)``: no full-size ``|x|`` is written); elsewhere ``abs`` then
    ``amax``, as torch's CPU ∞-norm kernel is about ten times slower than the two. The same number either way (a
    maximum of absolute values is exact), so only the number of operations differs by device."""
    if x.is_cuda:
        return torch.linalg.vector_norm(x, ord=float("inf"), dim=tuple(dim), keepdim=keepdim)
    return x.abs().amax(dim=tuple(dim), keepdim=keepdim)
