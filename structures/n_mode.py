"""``NMode``: every mode of the weight tensor gets its own Kronecker factor (tensor Shampoo / KL)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import attrs

from precond.layout import Layout
from structures._common import (
    LargeModePolicy,
    MergeDirection,
    VectorPolicy,
    axis_names,
    group,
    kind_for,
    large_field,
    max_dim_field,
    merge_field,
    merged_groups,
    vector_kinds,
    vectors_field,
)


@attrs.frozen
class NMode:
    """Precondition each mode ``k`` of ``G ∈ R^{d_1×…×d_N}`` with a dense ``S_k`` (size-1 modes dropped).

    ``max_dim``: a mode with ``d_k > max_dim`` gets no dense factor; ``large`` says what it gets instead:
    ``"none"`` (identity, as SOAP) or ``"diagonal"`` (a spectrum in the fixed basis ``Q_k = I``).

    ``merge`` (off by default): adjacent modes are merged into one while their product stays ``≤ max_dim``, before
    the kinds are chosen, greedily from the ``"first"`` mode (SOAP's ``merge_dims``) or from the ``"last"`` (Meta's
    Distributed Shampoo, which merges by default): a 24×16 weight at ``max_dim ≥ 384`` gets one 384×384 factor,
    a 4×5×6 kernel at 20 two factors (20 and 6). A matrix merged into one mode keeps its dense factor (the
    ``vectors`` policy is for weights that are vectors to begin with). Meta also *blocks* a mode larger than
    ``max_dim`` into ``≤ max_dim`` blocks with factors of their own; precond does not (such a mode follows
    ``large``), see ``docs/conventions.md``.
    """

    max_dim: Optional[int] = max_dim_field
    large: LargeModePolicy = large_field
    vectors: VectorPolicy = vectors_field
    merge: Optional[MergeDirection] = merge_field

    def __attrs_post_init__(self) -> None:
        if self.merge is not None and self.max_dim is None:
            raise ValueError(f"merge={self.merge!r} merges modes while their product stays ≤ max_dim, so it needs "
                             "max_dim (e.g. NMode(max_dim=1024, merge='last'))")

    def plan(self, shape: Sequence[int]) -> Layout:
        left, kept = axis_names(shape)
        if not kept:
            return Layout(tuple(shape), (1,), ("none",), pattern=f"{left} -> 1")
        if self.merge is None:
            groups = [[i] for i in range(len(kept))]
        else:
            groups = merged_groups([size for _, size in kept], self.max_dim, self.merge)
        right = " ".join(group([kept[i][0] for i in g]) for g in groups)
        view = tuple(math.prod(kept[i][1] for i in g) for g in groups)
        kinds = tuple(kind_for(d, self.max_dim, self.large) for d in view)
        if len(kept) == 1:
            kinds = vector_kinds(kinds, self.vectors)
        return Layout(tuple(shape), view, kinds, pattern=f"{left} -> {right}")
