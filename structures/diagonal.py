"""``Diagonal``: no dense factor at all, the weight is one flat vector (Adam-like)."""

from __future__ import annotations

import math
from typing import Sequence

import attrs

from precond.layout import Layout
from structures._common import axis_names, group


@attrs.frozen
class Diagonal:
    """View the weight as a vector ``g ∈ R^D`` with no Kronecker factor; only a dense per-entry spectrum
    (an estimator that keeps one, e.g. SOAP's ``V``) or none at all preconditions it."""

    def plan(self, shape: Sequence[int]) -> Layout:
        left, kept = axis_names(shape)
        size = math.prod(shape) if len(shape) else 1
        return Layout(tuple(shape), (size,), ("none",), pattern=f"{left} -> {group([n for n, _ in kept])}")

    def blocks(self, shape: Sequence[int]) -> None:
        """Never cuts a weight into blocks: ``plan`` covers it whole (:class:`precond.parts.Structure`)."""
        return None
