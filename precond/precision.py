"""Matmul precision switches: opt-in TF32 for the per-step products, full float32 for the refresh products."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Within the block, float32 matmuls on CUDA may use TF32 when ``enabled`` (restored afterwards)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def full_precision() -> contextlib.AbstractContextManager:
    """Float32 products without TF32 (``S Q`` before an orthonormalisation: TF32 would cost the basis its accuracy)."""
    return tf32_matmuls(False)
