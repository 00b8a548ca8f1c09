"""``NMode``: every mode of the weight tensor gets its own Kronecker factor (tensor Shampoo / KL)."""

from __future__ import annotations

from typing import Optional, Sequence

import attrs

from precond.layout import Layout
from structures._common import LargeModePolicy, axis_names, kind_for, large_field, max_dim_field, vector_kinds, vectors_field, VectorPolicy


@attrs.frozen
class NMode:
    """Precondition each mode ``k`` of ``G ∈ R^{d_1×…×d_N}`` with a dense ``S_k`` (size-1 modes dropped).

    ``max_dim``: a mode with ``d_k > max_dim`` gets no dense factor; ``large`` says what it gets instead:
    ``"none"`` (identity, as SOAP) or ``"diagonal"`` (a spectrum in the fixed basis ``Q_k = I``).
    """

    max_dim: Optional[int] = max_dim_field
    large: LargeModePolicy = large_field
    vectors: VectorPolicy = vectors_field

    def plan(self, shape: Sequence[int]) -> Layout:
        left, kept = axis_names(shape)
        if not kept:
            return Layout(tuple(shape), (1,), ("none",), pattern=f"{left} -> 1")
        right = " ".join(name for name, _ in kept)
        view = tuple(size for _, size in kept)
        kinds = tuple(kind_for(d, self.max_dim, self.large) for d in view)
        return Layout(tuple(shape), view, vector_kinds(kinds, self.vectors), pattern=f"{left} -> {right}")
