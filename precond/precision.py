"""Matmul precision switches: opt-in TF32 for the per-step products, full float32 for the refresh products, and the
check of the opt-in low-precision rotation dtype (``precond.Optimizer(rotation_dtype=...)``)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

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


def in_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``: ``x`` itself when it has it, with no operation issued (``Tensor.to`` would still dispatch
    one ``aten::to``, host time on an eager step; ``precond.bench.op_count``)."""
    return x if x.dtype == dtype else x.to(dtype)


def full_precision() -> contextlib.AbstractContextManager:
    """Float32 products without TF32 (``S Q`` before an orthonormalisation: TF32 would cost the basis its accuracy)."""
    return tf32_matmuls(False)


ROTATION_DTYPES = (torch.bfloat16, torch.float16)
"""The operand dtypes a low-precision rotation may use (``precond.Optimizer(rotation_dtype=...)``)."""


def check_rotation_dtype(value: Any) -> None:
    """``rotation_dtype`` must be ``None`` (rotations in the state dtype) or one of :data:`ROTATION_DTYPES`."""
    if value is not None and not (isinstance(value, torch.dtype) and value in ROTATION_DTYPES):
        raise ValueError(f"rotation_dtype must be torch.bfloat16 or torch.float16 (low-precision operands for the "
                         f"rotations into and out of the eigenbasis, accumulated in the state dtype) or None (the "
                         f"state dtype throughout, the default), got {value!r}")
