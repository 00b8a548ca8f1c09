"""``LayerMatrix``: a layer's weight as the matrix ``(out, fan_in)`` and its bias as ``(out,)``, every mode kept."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from precond.layout import Layout
from structures._common import axis_names, group, max_dim_field


@attrs.frozen
class LayerMatrix:
    """The view K-FAC's factors act on (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions).

    A weight of shape ``(d_out, d_1, …)`` (``nn.Linear``: ``(out, in)``; ``nn.Conv2d``: ``(out, in, kh, kw)``) is
    viewed as ``W ∈ R^{d_out × fan_in}``, ``fan_in = ∏ d_i`` in the row-major order of ``torch.nn.functional.unfold``'s
    patches; mode 0 is the output side (K-FAC's ``G``), mode 1 the input side (``A``). A bias ``(d_out,)`` stays a
    vector whose only mode is the output side. Unlike :class:`structures.Kronecker`, unit modes are *kept* as dense
    ``1 × 1`` factors (a ``Linear(n, 1)`` still has a scalar ``G``), because K-FAC's factors are tied to the layer's
    two sides, not to the weight's non-trivial axes. A mode larger than ``max_dim`` gets a diagonal factor
    (``diag(A)`` or ``diag(G)`` in the fixed basis ``Q = I``) instead of a dense one.
    """

    max_dim: int | None = max_dim_field

    def plan(self, shape: Sequence[int]) -> Layout:
        shape = tuple(int(s) for s in shape)
        if not shape:
            raise ValueError("LayerMatrix views layer weights (2-D or more) and biases (1-D); got a scalar parameter")
        left, kept = axis_names(shape)
        first = "d0" if shape[0] != 1 else "1"
        if len(shape) == 1:
            pattern, view = f"{left} -> {first}", (shape[0],)
        else:
            rest = [name for name, _ in kept if name != "d0"]
            fan_in = 1
            for size in shape[1:]:
                fan_in *= size
            pattern, view = f"{left} -> {first} {group(rest)}", (shape[0], fan_in)
        kinds = tuple("dense" if self.max_dim is None or d <= self.max_dim else "diagonal" for d in view)
        return Layout(shape, view, kinds, pattern=pattern)

    def blocks(self, shape: Sequence[int]) -> None:
        """Never cuts a weight into blocks: ``plan`` covers it whole (:class:`precond.parts.Structure`)."""
        return None
