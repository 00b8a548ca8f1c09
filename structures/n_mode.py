"""``NMode``: every mode of the weight tensor gets its own Kronecker factor (tensor Shampoo / KL)."""

from __future__ import annotations

import itertools
import math
from typing import Literal, Optional, Sequence

import attrs

from precond.layout import Blocks, Layout, split_sizes
from precond.validators import one_of
from structures._common import (
    MergeDirection,
    VectorPolicy,
    axis_names,
    group,
    kind_for,
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
    ``"none"`` (identity, as SOAP), ``"diagonal"`` (a spectrum in the fixed basis ``Q_k = I``) or ``"block"``
    (Meta's Distributed Shampoo: every axis above ``max_dim`` is cut into blocks of ``max_dim``, the last one
    shorter, and each block of the weight is preconditioned as a parameter of its own, with factors ``≤ max_dim``;
    :meth:`blocks`, ``precond.blocking``).

    ``merge`` (off by default): adjacent modes are merged into one while their product stays ``≤ max_dim``, before
    the kinds are chosen, greedily from the ``"first"`` mode (SOAP's ``merge_dims``) or from the ``"last"`` (Meta's
    Distributed Shampoo, which merges by default): a 24×16 weight at ``max_dim ≥ 384`` gets one 384×384 factor,
    a 4×5×6 kernel at 20 two factors (20 and 6). A matrix merged into one mode keeps its dense factor (the
    ``vectors`` policy is for weights that are vectors to begin with). With ``large="block"`` merging is decided on
    the whole weight first (as Meta does: an axis above ``max_dim`` is never merged), then that axis is blocked;
    every block keeps the weight's grouping of the other axes. See ``docs/conventions.md``.
    """

    max_dim: Optional[int] = max_dim_field
    large: Literal["none", "diagonal", "block"] = attrs.field(
        default="none", validator=one_of(("none", "diagonal", "block")))
    vectors: VectorPolicy = vectors_field
    merge: Optional[MergeDirection] = merge_field

    def __attrs_post_init__(self) -> None:
        if self.merge is not None and self.max_dim is None:
            raise ValueError(f"merge={self.merge!r} merges modes while their product stays ≤ max_dim, so it needs "
                             "max_dim (e.g. NMode(max_dim=1024, merge='last'))")
        if self.large == "block" and self.max_dim is None:
            raise ValueError("large='block' cuts the modes above max_dim into blocks of max_dim, so it needs max_dim "
                             "(e.g. NMode(max_dim=1024, large='block'))")

    def _groups(self, kept: list[tuple[str, int]]) -> list[list[int]]:
        """Indices of ``kept`` merged into the viewed modes."""
        if self.merge is None:
            return [[i] for i in range(len(kept))]
        return merged_groups([size for _, size in kept], self.max_dim, self.merge)

    def plan(self, shape: Sequence[int]) -> Layout:
        left, kept = axis_names(shape)
        if not kept:
            return Layout(tuple(shape), (1,), ("none",), pattern=f"{left} -> 1")
        groups = self._groups(kept)
        view = tuple(math.prod(kept[i][1] for i in g) for g in groups)
        if self.large == "block" and any(d > self.max_dim for d in view):
            raise ValueError(f"a weight of shape {tuple(shape)} has a mode above max_dim={self.max_dim}, which "
                             "large='block' cuts into blocks: it has no single layout; NMode.blocks(shape) gives "
                             "the blocks and their layouts")
        right = " ".join(group([kept[i][0] for i in g]) for g in groups)
        kinds = tuple(kind_for(d, self.max_dim, self.large) for d in view)
        if len(kept) == 1:
            kinds = vector_kinds(kinds, self.vectors)
        return Layout(tuple(shape), view, kinds, pattern=f"{left} -> {right}")

    def blocks(self, shape: Sequence[int]) -> Optional[Blocks]:
        """With ``large="block"``, the blocks of a weight with a mode above ``max_dim`` (None otherwise: :meth:`plan`
        covers it whole). Every axis ``d > max_dim`` is cut by :func:`precond.layout.split_sizes`; block ``i``
        (row-major over the grid) is viewed with the weight's grouping of its axes, its unit axes dropped, and each
        viewed mode (``≤ max_dim``) gets a dense factor (a vector's blocks follow ``vectors``)."""
        if self.large != "block":
            return None
        shape = tuple(shape)
        _, kept = axis_names(shape)
        if not any(size > self.max_dim for _, size in kept):
            return None
        groups = [[int(kept[i][0][1:]) for i in g] for g in self._groups(kept)]  # raw axis indices
        splits = tuple(split_sizes(d, self.max_dim) if d > self.max_dim else (d,) for d in shape)
        layouts = tuple(self._block_layout(block, groups, vector=len(kept) == 1)
                        for block in itertools.product(*splits))
        return Blocks(shape, splits, layouts)

    def _block_layout(self, shape: tuple[int, ...], groups: list[list[int]], vector: bool) -> Layout:
        left, _ = axis_names(shape)
        groups = [g for g in ([a for a in g if shape[a] != 1] for g in groups) if g]
        if not groups:
            return Layout(shape, (1,), ("none",), pattern=f"{left} -> 1")
        right = " ".join(group([f"d{a}" for a in g]) for g in groups)
        view = tuple(math.prod(shape[a] for a in g) for g in groups)
        kinds = tuple(kind_for(d, self.max_dim, "none") for d in view)
        if vector:
            kinds = vector_kinds(kinds, self.vectors)
        return Layout(shape, view, kinds, pattern=f"{left} -> {right}")
