"""``Kronecker``: the weight viewed as a matrix (first dim × the rest), one factor per side."""

from __future__ import annotations

from typing import Optional, Sequence

import attrs

from precond.layout import Layout
from structures._common import (
    LargeModePolicy,
    VectorPolicy,
    axis_names,
    group,
    kind_for,
    large_field,
    max_dim_field,
    vector_kinds,
    vectors_field,
)


def matrix_view(shape: Sequence[int]) -> tuple[str, tuple[int, ...]]:
    """Pattern and shape viewing ``shape`` as ``d_first × ∏ rest`` (size-1 axes dropped; a vector stays 1-D)."""
    left, kept = axis_names(shape)
    if not kept:
        return f"{left} -> 1", (1,)
    if len(kept) == 1:
        return f"{left} -> {kept[0][0]}", (kept[0][1],)
    first, rest = kept[0], kept[1:]
    rest_size = 1
    for _, size in rest:
        rest_size *= size
    return f"{left} -> {first[0]} {group([n for n, _ in rest])}", (first[1], rest_size)


@attrs.frozen
class Kronecker:
    """Two-sided Kronecker preconditioner ``S_a ⊗ S_b`` on the matrix view ``G ∈ R^{d_a × d_b}``.

    ``d_a`` is the parameter's first (non-unit) dimension and ``d_b`` the product of the others, the usual
    view of linear and conv weights. ``max_dim`` and ``large`` as in :class:`structures.NMode`.
    """

    max_dim: Optional[int] = max_dim_field
    large: LargeModePolicy = large_field
    vectors: VectorPolicy = vectors_field

    def plan(self, shape: Sequence[int]) -> Layout:
        pattern, view = matrix_view(shape)
        kinds = tuple(kind_for(d, self.max_dim, self.large) for d in view)
        return Layout(tuple(shape), view, vector_kinds(kinds, self.vectors), pattern=pattern)

    def blocks(self, shape: Sequence[int]) -> None:
        """Never cuts a weight into blocks: ``plan`` covers it whole (:class:`precond.parts.Structure`)."""
        return None
