"""``Matrix``: the weight viewed as a matrix ``(out, -1)`` with no factor at all (Muon's view)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from precond.layout import Layout
from structures._common import axis_names, group


@attrs.frozen
class Matrix:
    """View a weight of shape ``(d_0, d_1, …)`` as the matrix ``G ∈ R^{d_0 × ∏_{i≥1} d_i}`` and keep nothing for it
    (every mode ``"none"``): a linear weight stays ``(out, in)``, a conv kernel ``(out, in, kh, kw)`` becomes
    ``(out, in·kh·kw)`` as in Jordan's Muon. Unlike :class:`structures.Kronecker`, unit axes are kept, so a
    ``(1, n)`` weight is still a ``1 × n`` matrix. An applier that needs a matrix (``precond.NewtonSchulz``) reads
    the view; a weight of fewer than two dimensions has none and is refused here.
    """

    def plan(self, shape: Sequence[int]) -> Layout:
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(
                f"structures.Matrix views a weight of at least 2 dimensions as (out, -1); got shape {shape}. "
                "Send vectors and scalars to another group (precond.muon gives them its Adam part).")
        left, _ = axis_names(shape)
        names = left.split()
        rest = group([name for name in names[1:] if name != "1"])
        view = (shape[0], math.prod(shape[1:]))
        return Layout(shape, view, ("none", "none"), pattern=f"{left} -> {names[0]} {rest}")

    def blocks(self, shape: Sequence[int]) -> None:
        """Never cuts a weight into blocks: ``plan`` covers it whole (:class:`precond.parts.Structure`)."""
        return None
