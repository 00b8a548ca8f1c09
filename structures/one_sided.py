"""``OneSided``: only one side of the matrix view gets a dense factor (ASGO / one-sided Shampoo)."""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import attrs

from precond.layout import Layout
from precond.validators import one_of
from structures._common import (
    LargeModePolicy,
    VectorPolicy,
    kind_for,
    large_field,
    max_dim_field,
    vector_kinds,
    vectors_field,
)
from structures.kronecker import matrix_view


@attrs.frozen
class OneSided:
    """``S = S_a ⊗ I`` (or ``I ⊗ S_b``) on the matrix view: Claim 1's one-sided preconditioner.

    ``side``: ``"smaller"`` (default, the cheaper factor, as ASGO), ``"first"`` or ``"last"``. If the chosen
    side is larger than ``max_dim`` the other side is tried; a side that is not chosen is identity.
    """

    max_dim: Optional[int] = max_dim_field
    side: Literal["smaller", "first", "last"] = attrs.field(
        default="smaller", validator=one_of(("smaller", "first", "last"))
    )
    large: LargeModePolicy = large_field
    vectors: VectorPolicy = vectors_field

    def plan(self, shape: Sequence[int]) -> Layout:
        pattern, view = matrix_view(shape)
        if len(view) == 1:
            order = [0]
        elif self.side == "first":
            order = [0, 1]
        elif self.side == "last":
            order = [1, 0]
        else:
            order = [0, 1] if view[0] <= view[1] else [1, 0]
        kinds = ["none"] * len(view)
        for k in order:
            kind = kind_for(view[k], self.max_dim, self.large)
            if kind == "dense":
                kinds[k] = "dense"
                break
        else:
            kinds[order[0]] = kind_for(view[order[0]], self.max_dim, self.large)
        return Layout(tuple(shape), view, vector_kinds(tuple(kinds), self.vectors), pattern=pattern)

    def blocks(self, shape: Sequence[int]) -> None:
        """Never cuts a weight into blocks: ``plan`` covers it whole (:class:`precond.parts.Structure`)."""
        return None
